"""A training run of the experiment kit, one concept per module.

- `config`: `Config`, the one schema of the settings, and the flag file.
- `run_dir`: the run directory: layout, atomic files, damage checks, and
  `locked`, the lock and state a training run holds.
- `lock`: the directory's `.lock`; `errors`: `RunDirError` and its kinds.
- `backup`: `AtomicBackupAndRestore`, the kill-safe backup of training.
- `log`: `history.csv`, `summary.json` and the printed summary.
- `summary_schema`: what a finished run's `summary.json` must hold, checked on load.
- `processes`: runs of several processes and devices (tf.distribute, JAX).
- `experiment`: `train(Config(...))`, the paper's protocol.
- `divergence`: a run whose loss becomes NaN or infinite.
- `runs`: `Run` and `load_runs`, the finished runs that evaluate.py reads.

Importing `zoo.run` and `zoo.run.config` imports no Keras, so that
`train.py --help` answers at once.
"""
