"""Runs train.py and kills it with SIGKILL at a chosen moment of the run.

    python tests/scripts/kill_at.py PHASE [train.py flags]

PHASE is one of:

- `startup`: the run directory is locked and flags.cfg written, the model
  not yet built.
- `mid_epoch`: after the second batch of epoch 1.
- `results`: sgd_last.weights.h5 written, before the curves.
- `export`: the export written under its temporary name, not renamed yet.
- `cleanup`: summary.json says completed, half of backup/ removed.

Used by tests/test_kill_resume.py; the shipped code has no test hooks, this
script patches functions of `zoo.run.experiment` before running train.py's main.
"""

import os
import runpy
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

PHASES = ("startup", "mid_epoch", "results", "export", "cleanup")


def die(*args, **kwargs):
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def patch(phase):
    from zoo.run import experiment

    if phase == "startup":
        experiment._fit = die
    elif phase == "mid_epoch":
        import keras

        class KillMidEpoch(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self.epoch = epoch

            def on_train_batch_end(self, batch, logs=None):
                if self.epoch == 1 and batch == 1:
                    die()

        train = experiment.train
        experiment.train = lambda config, **kw: train(
            config, callbacks=[KillMidEpoch()], **kw)
    elif phase == "results":
        experiment.plot_curves = die
    elif phase == "export":
        import keras_ema.export

        export_model = keras_ema.export.export_model

        def export_then_die(model, directory, *args, **kwargs):
            export_model(model, directory, *args, **kwargs)
            die()

        keras_ema.export.export_model = export_then_die
    elif phase == "cleanup":
        import shutil
        import types

        def rmtree(path, *args, **kwargs):
            if os.path.basename(path) == "backup":
                names = sorted(os.listdir(path))
                for name in names[: len(names) // 2 + 1]:
                    os.remove(os.path.join(path, name))
                die()
            shutil.rmtree(path, *args, **kwargs)

        experiment.shutil = types.SimpleNamespace(rmtree=rmtree)
    else:
        sys.exit(f"kill_at.py: unknown phase {phase!r}; use one of {PHASES}")


if __name__ == "__main__":
    patch(sys.argv.pop(1))
    sys.argv[0] = os.path.join(ROOT, "train.py")
    runpy.run_path(sys.argv[0], run_name="__main__")
