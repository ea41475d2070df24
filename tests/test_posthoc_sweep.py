"""evaluate.py --evals=posthoc on a tiny digits run trained with --snapshot_every."""

import os
import sys

import pytest
import subprocesses

from keras_ema import posthoc
from ema_reference import flip_middle_bytes
from zoo import evaluation
from zoo.run import experiment


def tiny_config(output_dir, **overrides):
    settings = dict(
        output_dir=str(output_dir), dataset="digits", model="resnet18",
        width=0.0625, epochs=2, batch_size=128, lr=0.05, warmup_epochs=1,
        ema_decays=(0.5, 0.8), ema_period=1, seed=0,
    )
    settings.update(overrides)
    return experiment.Config(**settings)


def test_posthoc_sweep_end_to_end(tmp_path, monkeypatch):
    from zoo import posthoc_sweep

    # A short grid keeps the test fast (each candidate: BN recompute + predict).
    monkeypatch.setattr(posthoc_sweep, "HALF_LIVES_FRACTIONS", (0.05, 0.2))
    monkeypatch.setattr(posthoc_sweep, "SIGMA_RELS", (0.05, 0.28))
    grid = posthoc_sweep.targets

    def with_unmatched(step, period, warmup):
        # An EMA without warm-up keeps 0.999^18 = 98% on the initial weights,
        # which the warm-up EMAs cannot: skipped, with the reason.
        return grid(step, period, warmup) + [
            ("no warm-up", "ema", posthoc.EMAProfile(0.999, warmup=False))]

    monkeypatch.setattr(posthoc_sweep, "targets", with_unmatched)
    run = tmp_path / "run"
    experiment.train(tiny_config(run, snapshot_every=3), verbose=0)
    # 1150 training images / 128 = 9 steps per epoch, 18 steps: 6 snapshots.
    assert sorted(os.listdir(run / "snapshots")) == [
        f"snapshot_{s:012d}.npz" for s in range(3, 19, 3)]
    # A damaged snapshot in the middle is named and left out.
    flip_middle_bytes(str(run / "snapshots" / "snapshot_000000000009.npz"))
    runs = evaluation.load_runs([str(run)])
    logged = []
    with pytest.warns(UserWarning, match=r"snapshot_000000000009\.npz: it is damaged"):
        ev_results, figures = evaluation.evaluate(runs, ["posthoc", "generalization"],
                                                  log=logged.append)
    skipped = [c for c in ev_results["evals"]["posthoc"]["per_run"]["run"]["candidates"]
               if c.get("skipped")]
    assert skipped[-1]["target"] == "no warm-up"
    assert all("max_error=0.05" in c["skipped"] for c in skipped)
    assert any("no warm-up: skipped: post-hoc EMA" in line for line in logged)
    out = tmp_path / "results"
    evaluation.write_results(ev_results, figures, str(out))
    r = ev_results["evals"]["posthoc"]["per_run"]["run"]
    assert r["step"] == 18 and r["split"] == "validation"
    reachable = [c for c in r["candidates"] if c["reachable"]]
    assert reachable and all(c["profile_error"] <= 0.05 for c in reachable)
    assert r["best_loss"]["loss"] == min(c["loss"] for c in reachable)
    assert os.path.getsize(out / "posthoc_run.png") > 1000
    assert "## Post-hoc EMA sweep" in (out / "results.md").read_text()
    assert "- no warm-up: post-hoc EMA: EMAProfile" in (out / "results.md").read_text()
    assert "no warm-up" not in (r["best_loss"]["target"], r["best_accuracy"]["target"])
    # The sweep restores the final weights: the baseline evaluated after it
    # in the same evaluation equals the baseline evaluated alone.
    alone, _ = evaluation.evaluate(runs, ["generalization"], log=lambda *a: None)
    assert (ev_results["evals"]["generalization"]["table"]["baseline"]
            == alone["evals"]["generalization"]["table"]["baseline"])
    # Without snapshots: a one-line error that says how to get them.
    os.rename(run / "snapshots", tmp_path / "elsewhere")
    with pytest.raises(evaluation.EvaluationError, match="--snapshot_every"):
        evaluation.evaluate(runs, ["posthoc"], log=lambda *a: None)


def test_plot_sweep_leaves_the_backend_and_pyplot_alone(tmp_path):
    # matplotlib's Figure API: no matplotlib.use() that would switch the
    # backend of a notebook that imports the zoo, no figure left in pyplot.
    code = (
        "import matplotlib\n"
        "from zoo import posthoc_sweep\n"
        "matplotlib.use('svg')\n"
        "import matplotlib.pyplot as plt\n"
        "rows = [{'kind': 'ema', 'length': 10.0, 'accuracy': 90.0, 'loss': 0.3},\n"
        "        {'kind': 'power', 'length': 30.0, 'accuracy': 91.0, 'loss': 0.2}]\n"
        f"posthoc_sweep.plot_sweep(rows, {{'0.9': 20.0}}, {str(tmp_path / 'p.png')!r}, 't')\n"
        "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend()\n"
        "assert plt.get_fignums() == [], plt.get_fignums()\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocesses.run([sys.executable, "-c", code], cwd=root,
                            capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=root))
    assert result.returncode == 0, result.stderr[-2000:]
    with open(tmp_path / "p.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_sweep_step_is_the_last_readable_snapshot(tmp_path):
    from zoo.posthoc_sweep import _last_readable_step

    paths = []
    for step in (3, 6, 9):
        path = posthoc.snapshot_path(str(tmp_path), step)
        posthoc.write_snapshot(str(tmp_path), step, [[[0.0]]], {
            "run_id": "a", "decays": [0.5], "paths": ["w"],
            "log": {"start": 0, "steps": [], "decays": []}})
        paths.append((step, path))
    open(paths[-1][1], "wb").close()  # zero length
    assert _last_readable_step(paths) == 6


@pytest.mark.slow
def test_run_killed_before_its_first_backup_restarts_its_snapshots(tmp_path):
    import keras

    class KillAtStep(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 4:
                raise KeyboardInterrupt("simulated kill")

    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        experiment.train(tiny_config(run, epochs=1, warmup_epochs=0, snapshot_every=3), verbose=0,
                         callbacks=(KillAtStep(),))
    assert os.listdir(run / "snapshots")  # step 3, of EMAs that no longer exist
    experiment.train(tiny_config(run, epochs=1, warmup_epochs=0, snapshot_every=3), verbose=0)
    names = sorted(os.listdir(run / "snapshots"))
    assert names == [f"snapshot_{s:012d}.npz" for s in (3, 6, 9)]
    ids = {posthoc.read_meta(str(run / "snapshots" / n))["run_id"] for n in names}
    assert len(ids) == 1
