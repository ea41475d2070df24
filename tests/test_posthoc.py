"""Post-hoc EMA: profiles, solver, snapshots, synthesis (keras_ema.posthoc)."""

import math
import os

import keras
import numpy as np
import pytest

import keras_ema
from keras_ema import posthoc
from ema_reference import Recorder
from ema_reference import data
from ema_reference import tiny_model

pytestmark = pytest.mark.all_backends


def simulate_ema(iterates, decay, period, warmup, skip=()):
    """Brute force: run the EMA rule on explicit iterates (rows of `iterates`)."""
    s = iterates[0].astype(np.float64).copy()
    for t in range(len(iterates) - 1):
        if (t + 1) % period or t + 1 in skip:
            continue
        a = min(decay, (t + 1) / (t + 10)) if warmup else decay
        s = a * s + (1 - a) * iterates[t + 1]
    return s


# === Profiles (numpy) ===


def test_sigma_rel_gamma_values_from_edm2():
    assert posthoc.sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    assert posthoc.sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    # Eq. 123 by hand for gamma = 1: sqrt(2 / (9 * 4)).
    assert posthoc.gamma_to_sigma_rel(1.0) == pytest.approx(math.sqrt(2 / 36))
    for g in (0.5, 3.0, 30.0):
        assert posthoc.sigma_rel_to_gamma(posthoc.gamma_to_sigma_rel(g)) == pytest.approx(g)
    with pytest.raises(ValueError, match="sigma_rel=0.5"):
        posthoc.sigma_rel_to_gamma(0.5)


@pytest.mark.parametrize("period,warmup", [(1, True), (3, True), (2, False)])
def test_ema_profile_matches_brute_force_simulation(period, warmup):
    rng = np.random.default_rng(0)
    iterates = rng.normal(size=(121, 5))
    p = posthoc.EMAProfile(0.95, period=period, warmup=warmup).weights(120)
    assert p.shape == (121,)
    assert p.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(
        p @ iterates, simulate_ema(iterates, 0.95, period, warmup), rtol=1e-12
    )


def test_power_and_uniform_profiles_by_hand():
    p = posthoc.PowerProfile(0.10).weights(4)
    g = posthoc.sigma_rel_to_gamma(0.10)
    expected = np.array([0.0, 1.0, 2.0**g, 3.0**g, 4.0**g])
    np.testing.assert_allclose(p, expected / expected.sum(), rtol=1e-12)
    np.testing.assert_allclose(
        posthoc.UniformProfile(2, 4).weights(5), [0, 0, 1 / 3, 1 / 3, 1 / 3, 0]
    )
    with pytest.raises(ValueError, match="after the target step"):
        posthoc.UniformProfile(2, 9).weights(5)


def test_log_profiles_match_simulation_with_skips_and_combined_updates():
    rng = np.random.default_rng(1)
    iterates = rng.normal(size=(41, 3))
    # Updates at steps 2, 4 (two due updates applied together: decays
    # multiply), 8 skipped, 10, ...: replay them by hand.
    steps = [2, 4, 10, 12, 20, 40]
    decays = [[0.5, 0.9], [0.25, 0.81], [0.5, 0.9], [0.6, 0.95], [0.5, 0.9], [0.7, 0.99]]
    iters, prof = posthoc.log_profiles(0, steps, decays, [12, 40])
    for r, at in enumerate([12, 40]):
        for i in range(2):
            s = iterates[0].copy()
            for n, a in zip(steps, decays):
                if n <= at:
                    s = a[i] * s + (1 - a[i]) * iterates[n]
            np.testing.assert_allclose(prof[r, i] @ iterates[iters], s, rtol=1e-12)


# === Solver on numpy-written snapshots ===


def write_simulated_snapshots(tmp_path, iterates, decays, every, period=1, dtype="float32"):
    """Snapshots of EMAs of explicit iterates, as MultiEMA writes them."""
    n = len(iterates) - 1
    log_steps, log_decays = [], []
    s = np.repeat(iterates[0][None], len(decays), axis=0).astype(np.float64)
    for t in range(n):
        if (t + 1) % period == 0:
            a = np.array([min(d, (t + 1) / (t + 10)) for d in decays])
            s = a[:, None] * s + (1 - a[:, None]) * iterates[t + 1]
            log_steps.append(t + 1)
            log_decays.append(list(a))
        if (t + 1) % every == 0:
            meta = {"decays": list(decays), "period": period, "warmup": True,
                    "paths": ["w"], "log": {"start": 0, "steps": list(log_steps),
                                            "decays": [list(x) for x in log_decays]}}
            posthoc.write_snapshot(str(tmp_path), t + 1, [s.astype(np.float32)], meta, dtype)
    return str(tmp_path)


def random_walk(steps, size, seed=0):
    rng = np.random.default_rng(seed)
    return np.cumsum(rng.normal(size=(steps + 1, size)), axis=0) * 0.01 + 1.0


@pytest.mark.parametrize("period", [1, 2])
def test_untracked_ema_is_synthesized_within_bar(tmp_path, period):
    iterates = random_walk(300, 200)
    snap = write_simulated_snapshots(tmp_path, iterates, (0.9, 0.99), 10, period)
    (w,), report = posthoc.synthesize(snap, posthoc.EMAProfile(0.97, period=period))
    direct = simulate_ema(iterates, 0.97, period, True)
    live = iterates[-1]
    ratio = np.abs(w - direct).max() / np.abs(direct - live).max()
    assert ratio < 0.02, ratio
    assert report.profile_error < 0.02
    assert report.step == 300 and os.listdir(snap)  # default: the last snapshot


def test_target_in_basis_reproduces_snapshot_exactly(tmp_path):
    iterates = random_walk(100, 50, seed=3)
    snap = write_simulated_snapshots(tmp_path, iterates, (0.9, 0.99), 10)
    # At step 100 the 0.9 EMA is past its warm-up (step 80), 0.99 is not.
    (w,), report = posthoc.synthesize(snap, posthoc.EMAProfile(0.9), step=100)
    with np.load(posthoc.snapshot_path(snap, 100)) as f:
        stored = f["s0"][0]
    np.testing.assert_array_equal(w, stored)
    assert report.coefficients == {(100, 0.9): 1.0}
    assert report.profile_error < 1e-12


def test_only_snapshots_up_to_the_target_step_are_used(tmp_path):
    iterates = random_walk(100, 10)
    snap = write_simulated_snapshots(tmp_path, iterates, (0.9, 0.99), 10)
    _, report = posthoc.synthesize(snap, posthoc.PowerProfile(0.10), step=55)
    assert max(s for s, _ in report.coefficients) <= 50
    with pytest.raises(ValueError, match="no snapshot at or before"):
        posthoc.synthesize(snap, posthoc.EMAProfile(0.9), step=5)


def test_float16_snapshots_reconstruction_error(tmp_path):
    iterates = random_walk(300, 200)
    a = write_simulated_snapshots(tmp_path / "a", iterates, (0.9, 0.99), 10)
    b = write_simulated_snapshots(tmp_path / "b", iterates, (0.9, 0.99), 10, dtype="float16")
    target = posthoc.EMAProfile(0.97)
    (w32,), _ = posthoc.synthesize(a, target)
    (w16,), _ = posthoc.synthesize(b, target)
    rel = np.abs(w16 - w32).max() / np.abs(w32).max()
    assert 0 < rel < 2e-3, rel  # float16: 11-bit mantissa


# === MultiEMA snapshots in a real fit (TF and JAX) ===


@pytest.mark.parametrize("period", [1, 2])
def test_fit_snapshots_synthesize_untracked_ema(tmp_path, period):
    model = tiny_model()
    x, y = data(n=40)
    snap = str(tmp_path / "snaps")
    ema = keras_ema.MultiEMA((0.9, 0.99), period=period, verbose=0,
                             snapshot_dir=snap, snapshot_every=10)
    direct = keras_ema.MultiEMA((0.97,), period=period, verbose=0)
    model.fit(x, y, batch_size=4, epochs=30, callbacks=[ema, direct], verbose=0)
    files = sorted(os.listdir(snap))
    assert files == [f"snapshot_{s:012d}.npz" for s in range(10, 301, 10)]
    live = [keras.ops.convert_to_numpy(v) for v in ema._variables]
    tracked = direct.ema_weights(0.97)
    report = posthoc.synthesize_into(model, snap, posthoc.EMAProfile(0.97, period=period))
    assert report.step == 300
    by_path = {v.path: np.asarray(w) for v, w in zip(model.weights, tracked)}
    num = den = 0.0
    for v, w_live in zip(ema._variables, live):
        got = keras.ops.convert_to_numpy(v)
        num = max(num, np.abs(got - by_path[v.path]).max())
        den = max(den, np.abs(by_path[v.path] - w_live).max())
    assert num / den < 0.02, (num, den)


def test_update_log_survives_get_state_and_skips_nonfinite(tmp_path):
    model = tiny_model()
    x, y = data(n=16)
    ema = keras_ema.MultiEMA((0.9,), period=1, verbose=0)
    model.fit(x, y, batch_size=4, epochs=2, callbacks=[ema], verbose=0)
    state = ema.get_state()
    assert state["update_log"]["start"] == 0
    assert state["update_log"]["steps"] == list(range(1, 9))
    np.testing.assert_allclose(
        [a[0] for a in state["update_log"]["decays"]],
        [min(0.9, (t + 1) / (t + 10)) for t in range(8)],
    )
    other = keras_ema.MultiEMA((0.9,), period=1, verbose=0)
    other._build(model)
    other.set_state(state)
    assert other.get_state()["update_log"] == state["update_log"]
    # A skipped (non-finite) update is not in the log.
    ema._log_pending.append((9, [0.5]))
    ema._pending.append((9, keras.ops.convert_to_tensor(False)))
    with pytest.warns(UserWarning, match="skipped"):
        ema._flush_pending()
    assert 9 not in ema.get_state()["update_log"]["steps"]


def test_resumed_run_rewrites_snapshots_identically(tmp_path):
    from ema_reference import StopAtEpoch

    x, y = data()

    def run(extra, backup, snap):
        keras.utils.set_random_seed(7)
        model = tiny_model()
        ema = keras_ema.MultiEMA((0.5, 0.9), period=2, backup_dir=backup, verbose=0,
                                 snapshot_dir=snap, snapshot_every=3)
        callbacks = [ema]
        if backup:
            callbacks.append(keras.callbacks.BackupAndRestore(backup))
        model.fit(x, y, batch_size=4, epochs=4, shuffle=False, verbose=0,
                  callbacks=callbacks + extra)

    run([], None, str(tmp_path / "a"))
    backup, snap = str(tmp_path / "backup"), str(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        run([StopAtEpoch(2)], backup, snap)
    assert len(os.listdir(snap)) == 6  # steps 3..18, before the kill at step 20
    run([], backup, snap)
    names = sorted(os.listdir(snap))
    assert names == sorted(os.listdir(tmp_path / "a"))
    assert names == [f"snapshot_{s:012d}.npz" for s in range(3, 40, 3)]
    for name in names:
        a, b = posthoc.read_meta(str(tmp_path / "a" / name)), posthoc.read_meta(os.path.join(snap, name))
        assert a["log"] == b["log"]
        with np.load(str(tmp_path / "a" / name)) as fa, np.load(os.path.join(snap, name)) as fb:
            for key in fa.files:
                if key != "meta":
                    np.testing.assert_allclose(fa[key], fb[key], rtol=1e-6, atol=1e-7)


def test_snapshot_arguments_are_checked():
    with pytest.raises(ValueError, match="snapshot_every=0"):
        keras_ema.MultiEMA(snapshot_dir="x", snapshot_every=0)
    with pytest.raises(ValueError, match="both"):
        keras_ema.MultiEMA(snapshot_dir="x")
    with pytest.raises(ValueError, match="snapshot_dtype='int8'"):
        keras_ema.MultiEMA(snapshot_dir="x", snapshot_every=1, snapshot_dtype="int8")


# === train.py flag and the sweep's plot ===


def test_snapshot_every_flag_is_checked():
    from zoo.run.config import Config
    from zoo.run.config import ConfigError

    with pytest.raises(ConfigError, match="--snapshot_every=-1"):
        Config(output_dir="x", snapshot_every=-1).resolved()
    with pytest.raises(ConfigError, match="averaging=ema"):
        Config(output_dir="x", snapshot_every=10, averaging="sema").resolved()


def test_sweep_plot_is_written(tmp_path):
    from zoo.posthoc_sweep import plot_sweep
    from zoo.posthoc_sweep import targets

    labels = targets(1000, 1, True)
    assert len(labels) == 13
    rows = [{"kind": kind, "length": t.length(1000), "accuracy": 90.0 + i,
             "loss": 0.5 - 0.01 * i, "reachable": True}
            for i, (_, kind, t) in enumerate(labels)]
    path = str(tmp_path / "sweep.png")
    plot_sweep(rows, {"0.99": 99.0}, path, "title")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(tmp_path) == ["sweep.png"]


def test_bad_targets_and_dirs_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="target=0.97"):
        posthoc.synthesize(str(tmp_path), 0.97)
    with pytest.raises(ValueError, match="No snapshots"):
        posthoc.synthesize(str(tmp_path), posthoc.EMAProfile(0.97))
    with pytest.raises(ValueError, match="not a directory"):
        posthoc.synthesize(str(tmp_path / "missing"), posthoc.EMAProfile(0.97))
    (tmp_path / "snapshot_000000000010.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="damaged"):
        posthoc.synthesize(str(tmp_path), posthoc.EMAProfile(0.97))
