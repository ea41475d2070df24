"""Turns finished train.py runs into the paper's tables (results.md, results.json).

    python evaluate.py runs/demo_s0 runs/demo_s1 runs/demo_s2
    python evaluate.py runs/c100_s* --evals=generalization,calibration,churn
    python evaluate.py runs/c100_s* --evals=transfer --transfer_dataset=cifar10
    python evaluate.py runs/demo_s0 --evals=posthoc   # needs train.py --snapshot_every

Pass the run directories of the seeds of one configuration. See
`zoo/evaluation.py` and `zoo/evals/` for what each evaluation computes.
"""

import os
import sys

import _cli

# First: Ctrl-C and SIGTERM end in one line from here on, also in the
# seconds TensorFlow takes to import.
if __name__ == "__main__":
    _cli.handle_interrupts("evaluate.py", "results.md, results.json and the "
                           "figures are written all or none: rerun the same "
                           "command.")

from absl import flags  # noqa: E402

from zoo.evals import EVALS  # noqa: E402 (names and help; imports no Keras)

flags.DEFINE_list("evals", ["generalization", "calibration", "churn"],
                  "Comma-separated evaluations: " + "; ".join(
                      f"{name}: {what}" for name, what in EVALS.items()) + ".")
flags.DEFINE_boolean("bn_recompute", True, "Recompute the EMA models' BatchNorm "
                     "statistics on the training split first (the paper's protocol).")
flags.DEFINE_string("decay", "largest", "The EMA decay to evaluate: largest "
                    "(the paper's tables), best_on_validation (per criterion, the "
                    "decay best on the validation split), or a number such as 0.998.")
flags.DEFINE_string("transfer_dataset", None, "Target dataset of --evals=transfer "
                    "(digits, cifar10, cifar100, folder:PATH, ...).")
flags.DEFINE_string("transfer_data_dir", None, "data_dir of the transfer dataset.")
flags.DEFINE_integer("probe_epochs", 50, "Epochs of the linear probe.")
flags.DEFINE_string("output_dir", None, "Where to write results.md, results.json "
                    "and the figures; default: results/ beside the first run.")

FLAGS = flags.FLAGS


def main(argv):
    with _cli.quiet_start_up():
        from zoo import evaluation
    from zoo.data import DatasetError
    from zoo.run import run_dir
    from zoo.run.run_dir import RunDirError

    paths = argv[1:]
    try:
        if FLAGS.probe_epochs < 1:
            raise evaluation.EvaluationError(
                f"--probe_epochs={FLAGS.probe_epochs}: must be >= 1.")
        decay = evaluation.parse_decay(FLAGS.decay)
        runs = evaluation.load_runs(paths)
        output_dir = FLAGS.output_dir or os.path.join(
            os.path.dirname(os.path.abspath(paths[0])), "results")
        from zoo.run.run_dir import check_output_dir

        check_output_dir(output_dir)
        print(f"Evaluating {len(runs)} run(s): {', '.join(paths)}", flush=True)
        evals = [e.strip() for e in FLAGS.evals if e.strip()]
        if len(runs) < 2 and "churn" in evals and not FLAGS["evals"].present:
            evals.remove("churn")
            print("Skipping churn (the default --evals): it compares seeds, "
                  "so it needs two or more runs.", flush=True)
        results, figures = evaluation.evaluate(
            runs, evals,
            bn_recompute=FLAGS.bn_recompute,
            decay=decay,
            transfer_dataset=FLAGS.transfer_dataset,
            transfer_data_dir=FLAGS.transfer_data_dir,
            probe_epochs=FLAGS.probe_epochs,
            log=lambda line: print(line, flush=True),
        )
        # A full disk: one line; an interrupt: after the last file.
        with run_dir.disk_errors(output_dir), _cli.interrupts_deferred():
            path = evaluation.write_results(results, figures, output_dir)
    except (evaluation.EvaluationError, DatasetError, RunDirError) as error:
        _cli.fail(f"evaluate.py: error: {error}")
    print()
    print(open(path).read(), end="")
    print(f"Written: {path}, {os.path.join(output_dir, 'results.json')}")


if __name__ == "__main__":
    _cli.run(main)
