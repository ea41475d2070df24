"""A training run of the experiment kit, one concept per module.

- `config`: `Config`, the one schema of the settings, and the flag file.
- `run_dir`: the run directory: layout, atomic files, locks, damage checks.
- `backup`: `AtomicBackupAndRestore`, the kill-safe backup of training.
- `log`: `history.csv`, `summary.json` and the printed summary.
- `summary_schema`: what a finished run's `summary.json` must hold, checked on load.
- `processes`: runs of several processes and devices (tf.distribute, JAX).
- `experiment`: `train(Config(...))`, the paper's protocol.
- `runs`: `Run` and `load_runs`, the finished runs that evaluate.py reads.

Importing `zoo.run` and `zoo.run.config` imports no Keras, so that
`train.py --help` answers at once.
"""
