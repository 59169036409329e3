"""Stand-in for NVIDIA's `tegrastats` in tests: prints recorded lines every --interval ms, forever.

The tests copy it onto PATH as `tegrastats` with this interpreter as its shebang. Environment:
FAKE_TEGRASTATS_LINES       file of recorded lines to print (cycled)
FAKE_TEGRASTATS_ARGS        file to write this invocation's arguments to, one per line
FAKE_TEGRASTATS_EXIT_AFTER  print this many lines, then an error on stderr, and exit with code 3
"""

import os
import sys
import time

args = sys.argv[1:]
if os.environ.get("FAKE_TEGRASTATS_ARGS"):
    with open(os.environ["FAKE_TEGRASTATS_ARGS"], "w") as f:
        f.write("\n".join(args) + "\n")
interval = int(args[args.index("--interval") + 1]) / 1000 if "--interval" in args else 1.0
with open(os.environ["FAKE_TEGRASTATS_LINES"]) as f:
    lines = [line.rstrip("\n") for line in f if line.strip()]
limit = int(os.environ.get("FAKE_TEGRASTATS_EXIT_AFTER", "0"))
printed = 0
while True:
    for line in lines:
        print(line, flush=True)
        printed += 1
        if limit and printed >= limit:
            print("Error: cannot read /sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon1/in1_input: No such device",
                  file=sys.stderr, flush=True)
            sys.exit(3)
        time.sleep(interval)
