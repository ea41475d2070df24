"""Trains a model with SGD and EMAs of its weights, the paper's protocol.

    python train.py --flagfile=configs/demo.cfg
    python train.py --flagfile=configs/cifar100_resnet18_tune.cfg --seed=1

Rerunning the same command resumes an interrupted run; `--flagfile=RUN/flags.cfg`
replays a finished one. See README.md for the flags and the run directory.
"""

import dataclasses
import os
import sys

import _cli

# First: Ctrl-C and SIGTERM end in one line from here on, also in the
# seconds TensorFlow takes to import.
if __name__ == "__main__":
    _cli.handle_interrupts("train.py", "what was trained is kept: rerun the "
                           "same command to resume.")

from absl import flags  # noqa: E402

from zoo.run import config as run_config  # noqa: E402

# One flag per field of `zoo.run.config.Config`, from its metadata; that
# module imports no Keras, so `--help` and a bad flag answer at once.
run_config.define_flags()
flags.adopt_module_key_flags(run_config)  # listed by --help, not only --helpfull
flags.DEFINE_float("connect_timeout", run_config.DEFAULT_CONNECT_TIMEOUT,
                   "Several processes (TF_CONFIG, KERAS_DISTRIBUTION_*): "
                   "seconds to wait for the others to join before failing.")

FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        sys.exit(f"train.py: unexpected arguments {argv[1:]}; flags start with --.")
    with _cli.quiet_start_up():
        from zoo.run import experiment
    from zoo.data import DatasetError
    from zoo.run.processes import PeerStopped
    from zoo.run.run_dir import RunDirError

    try:
        config = run_config.config_from_flags(FLAGS)
        run = _cli.replayed_run(sys.argv[1:], config.output_dir)
        if run != config.output_dir:
            print(f"The run is in {run}, where its flags.cfg is, not in "
                  f"{config.output_dir}, the --output_dir that flags.cfg "
                  "records (the run was copied or moved).", flush=True)
            config = dataclasses.replace(config, output_dir=run)
        experiment.train(config, connect_timeout=FLAGS.connect_timeout)
    except (run_config.ConfigError, DatasetError, RunDirError,
            experiment.TrainingDiverged, experiment.ExportError) as error:
        _cli.fail(f"train.py: error: {error}")
    except PeerStopped as error:
        print(f"train.py: error: {error}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # Not sys.exit: the backend's exit handlers would wait for the peer.
        os._exit(1)


if __name__ == "__main__":
    _cli.run(main)
