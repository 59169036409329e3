from hpqdeploy.cli.app import main

main()
