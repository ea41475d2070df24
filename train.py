"""Trains a model with SGD and EMAs of its weights, the paper's protocol.

    python train.py --flagfile=configs/demo.cfg
    python train.py --flagfile=configs/cifar100_resnet18_tune.cfg --seed=1

Rerunning the same command resumes an interrupted run; `--flagfile=RUN/flags.cfg`
replays a finished one. See README.md for the flags and the run directory.
"""

import signal
import sys
import types

from absl import flags

import _cli

# `zoo.experiment.Config`'s defaults, repeated so that `--help` and a bad
# flag answer without importing Keras and TensorFlow (seconds);
# tests/test_cli.py checks that they agree with Config.
_D = types.SimpleNamespace(
    dataset="digits", data_dir="", image_size=0, model="resnet18", width=1.0,
    epochs=200, batch_size=128, lr=0.1, weight_decay=-1.0, momentum=0.9,
    nesterov=True, warmup_epochs=5,
    ema_decays=(0.968, 0.984, 0.992, 0.996, 0.998), ema_period=16,
    ema_warmup=True, average_batch_norm=True, label_noise="",
    val_fraction=0.2, seed=0, mixed_precision="", distribution="none",
    export=False, export_decay=0.0, export_from="final", averaging="ema",
    sema_every_epochs=1, sema_start_epoch=0, belay_coupling=0.1,
    selection_from="", snapshot_every=0,
)
_CONNECT_TIMEOUT = 120.0  # zoo.experiment.DEFAULT_CONNECT_TIMEOUT

flags.DEFINE_string("output_dir", None, "Run directory (created; rerun to resume).")
flags.DEFINE_string("dataset", _D.dataset, "digits, cifar10, cifar100, cifar10n, "
                    "cifar100n, tiny_imagenet or folder:PATH.")
flags.DEFINE_string("data_dir", _D.data_dir, "TFDS data dir, or the dataset folder.")
flags.DEFINE_integer("image_size", _D.image_size, "Resize folder: and "
                     "tiny_imagenet images to this many pixels square; 0: keep.")
flags.DEFINE_string("model", _D.model, "resnet18, resnet34, wrn28_10 or vgg16.")
flags.DEFINE_float("width", _D.width, "Width multiplier of the model (1 = paper).")
flags.DEFINE_integer("epochs", _D.epochs, "Training epochs.")
flags.DEFINE_integer("batch_size", _D.batch_size, "Training batch size.")
flags.DEFINE_float("lr", _D.lr, "Peak learning rate (after the warm-up).")
flags.DEFINE_float("weight_decay", _D.weight_decay, "SGD weight decay on kernels; "
                   "negative: the paper's (1e-4 ResNet, 5e-4 WRN and VGG).")
flags.DEFINE_float("momentum", _D.momentum, "SGD momentum.")
flags.DEFINE_boolean("nesterov", _D.nesterov, "Nesterov momentum.")
flags.DEFINE_integer("warmup_epochs", _D.warmup_epochs, "Epochs of linear "
                     "learning-rate warm-up before the cosine decay.")
flags.DEFINE_list("ema_decays", [repr(d) for d in _D.ema_decays], "EMA decays.")
flags.DEFINE_integer("ema_period", _D.ema_period, "Optimizer steps per EMA update.")
flags.DEFINE_boolean("ema_warmup", _D.ema_warmup, "EMA warm-up min(a, (t+1)/(t+10)).")
flags.DEFINE_boolean("average_batch_norm", _D.average_batch_norm,
                     "Average the BatchNorm moving statistics too.")
flags.DEFINE_string("label_noise", _D.label_noise, "symmetric:R, or a CIFAR-N "
                    "label set (aggre, worse, random1-3, noise); empty: clean.")
flags.DEFINE_float("val_fraction", _D.val_fraction, "Held-out share of the "
                   "training set; 0 trains on all of it and validates on test.")
flags.DEFINE_integer("seed", _D.seed, "Seed of the split, noise, data order, init.")
flags.DEFINE_string("mixed_precision", _D.mixed_precision,
                    "mixed_float16 or mixed_bfloat16; empty: float32.")
flags.DEFINE_string("distribution", _D.distribution, "none, mirrored or "
                    "multiworker (TensorFlow), data_parallel (JAX); several "
                    "processes: TF_CONFIG or KERAS_DISTRIBUTION_JOB_ADDRESSES, "
                    "_NUM_PROCESSES, _PROCESS_ID (README: Several machines).")
flags.DEFINE_boolean("export", _D.export, "Export the chosen EMA model as a "
                     "SavedModel and a .keras file to RUN/export.")
flags.DEFINE_float("export_decay", _D.export_decay,
                   "The decay to export; 0: the largest.")
flags.DEFINE_string("export_from", _D.export_from, "Which EMA weights to "
                    "export: final, best_accuracy or best_loss.")
flags.DEFINE_string("averaging", _D.averaging, "ema (MultiEMA), sema (Switch "
                    "EMA) or belay (two-way coupled EMA).")
flags.DEFINE_integer("sema_every_epochs", _D.sema_every_epochs,
                     "SEMA: copy the EMA into the model every this many epochs.")
flags.DEFINE_integer("sema_start_epoch", _D.sema_start_epoch,
                     "SEMA: first epoch (0-based) that may end with a switch.")
flags.DEFINE_float("belay_coupling", _D.belay_coupling,
                   "BELAY: pull k of the model toward the EMA at each update.")
flags.DEFINE_string("selection_from", _D.selection_from, "A finished tuning run "
                    "(--val_fraction>0) of this configuration: with --val_fraction=0, "
                    "keep the weights at the epochs its validation split chose.")
flags.DEFINE_integer("snapshot_every", _D.snapshot_every, "Write post-hoc EMA "
                     "snapshots to RUN/snapshots every this many optimizer "
                     "steps (0: off); see evaluate.py --evals=posthoc.")

flags.DEFINE_float("connect_timeout", _CONNECT_TIMEOUT, "Several "
                   "processes (TF_CONFIG, KERAS_DISTRIBUTION_*): seconds to "
                   "wait for the others to join before failing.")

FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        sys.exit(f"train.py: unexpected arguments {argv[1:]}; flags start with --.")
    with _cli.quiet_start_up():
        from zoo import experiment
    from zoo.data import DatasetError
    from zoo.run_dir import RunDirError

    signal.signal(signal.SIGTERM, _interrupt)
    try:
        config = experiment.config_from_flags(FLAGS)
        experiment.train(config, connect_timeout=FLAGS.connect_timeout)
    except (experiment.ConfigError, DatasetError, RunDirError,
            experiment.TrainingDiverged, experiment.ExportError) as error:
        sys.exit(f"train.py: error: {error}")
    except KeyboardInterrupt as interrupt:
        how = str(interrupt) or "SIGINT"
        print(f"train.py: stopped by {how}; what was trained is kept: rerun the "
              "same command to resume.", file=sys.stderr, flush=True)
        sys.exit(143 if how == "SIGTERM" else 130)


def _interrupt(signum, frame):
    """SIGTERM ends the run like Ctrl-C: files stay whole, the run resumable."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


if __name__ == "__main__":
    _cli.run(main)
