"""`hpqdeploy experiment CONFIG.toml`: the whole plan from one file, resumable step by step.

One TOML names a baseline, the compression methods, the export targets, the device and batch sizes to profile on,
and the report. Each step (`baseline`, `compress/<method>`, `export/<source>-<target>`,
`profile/<source>-<target>-b<batch>`, `report`) has an input hash: sha256 of its own settings (as written in the
file, defaults filled in) and the hashes of the steps it depends on; the baseline's also covers its input files
(the weights' content; a local model or baseline directory by file names, sizes and mtimes). The data is named,
not hashed. `experiment.json` in the output directory records per step its hash, output, status and seconds.

On a re-run a finished step is kept when its hash matches, the outputs it was made from are the ones on disk and
its own output exists; anything else runs again and replaces its stale output, and through the hash chain so does
everything downstream. An interrupted step (an exception or Ctrl-C) leaves no finished record: its next run
continues from the last epoch checkpoint in `<dir>.partial` (train and compress) when its inputs are unchanged.

A step that fails for a reason of this machine (a runtime package missing, no runner for the artifact on this
device, a device not attached) is recorded as `skipped` with the reason, and the steps that need it are skipped
too; any other error stops the run with one line, keeping what finished.

    [experiment]  name, out (default runs/<name>), seed
    [baseline]    model + data (+ weights, data_dir, epochs, lr, ...), or dir = an existing `train` output
    [compress]    methods = [...] and compress settings; [compress.<method>] overrides them for one method
    [export]      targets = [...], mixed, batch_size, eval_limit, ...
    [profile]     device, batch_sizes = [...], iters, repeats, warmup, ... (targets: which exports to profile)
    [report]      html

Paths are relative to the TOML file's directory.

Modules: `schema` (the keys each section takes), `config` (reading and validating the TOML), `steps` (the step
definitions, their hashes and stage calls), `state` (experiment.json and its lock), `run` (running the steps).
"""

from hpqdeploy.experiment.config import ExperimentConfig, load_config
from hpqdeploy.experiment.run import run_experiment, summary_table

__all__ = ["ExperimentConfig", "load_config", "run_experiment", "summary_table"]
