"""Post-hoc EMA: profiles, solver, snapshots, synthesis (keras_ema.posthoc)."""

import json
import math
import os

import keras
import numpy as np
import pytest

import keras_ema
from keras_ema import posthoc
from ema_reference import Recorder
from ema_reference import flip_middle_bytes
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
    _, report = posthoc.synthesize(snap, posthoc.PowerProfile(0.10), step=55,
                                   max_error=None)
    assert max(s for s, _ in report.coefficients) <= 50
    # Iterates 51..55 hold weight no snapshot at or before 55 can match.
    with pytest.raises(posthoc.UnmatchedTargetError, match="choose a snapshot's step"):
        posthoc.synthesize(snap, posthoc.PowerProfile(0.10), step=55)
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
        a, b = str(tmp_path / "a" / name), os.path.join(snap, name)
        assert posthoc.read_log(a) == posthoc.read_log(b)
        with np.load(a) as fa, np.load(b) as fb:
            for key in fa.files:
                if key not in ("meta", "log"):
                    np.testing.assert_allclose(fa[key], fb[key], rtol=1e-6, atol=1e-7)
    # The resumed run kept the killed one's run id: one run in the directory.
    ids = {posthoc.read_meta(os.path.join(snap, n))["run_id"] for n in names}
    assert len(ids) == 1 and None not in ids, ids


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


# === Period P, the sum-to-one constraint, refusals (numpy references) ===


def power_average(iterates, sigma_rel, step, period):
    """EDM2's n^gamma weights on the iterates an EMA of period P reads
    (0 and the multiples of P), renormalized, as a numpy reference."""
    gamma = posthoc.sigma_rel_to_gamma(sigma_rel)
    read = np.arange(0, step + 1, period)
    w = (read / step) ** gamma
    return (w / w.sum()) @ iterates[read]


@pytest.mark.parametrize("sigma_rel", [0.05, 0.10])
def test_power_target_at_period_16_within_bar(tmp_path, sigma_rel):
    # The paper's decays and period, 400 EMA updates, a snapshot every 20.
    iterates = random_walk(6400, 200, seed=5)
    snap = write_simulated_snapshots(
        tmp_path, iterates, (0.968, 0.984, 0.992, 0.996, 0.998), 320, period=16)
    (w,), report = posthoc.synthesize(snap, posthoc.PowerProfile(sigma_rel))
    ref = power_average(iterates, sigma_rel, 6400, 16)
    ratio = np.abs(w - ref).max() / np.abs(ref - iterates[-1]).max()
    assert ratio < 0.02, ratio
    assert sum(report.coefficients.values()) == pytest.approx(1.0, abs=1e-9)
    assert report.error_bound < 0.05


def test_fit_at_period_16_power_targets_and_refusals(tmp_path):
    # 640 SGD steps of a real fit, EMAs every 16 steps, snapshots every 32.
    keras.utils.set_random_seed(0)
    model = tiny_model()
    x, y = data(n=64)
    snap = str(tmp_path / "snaps")
    ema = keras_ema.MultiEMA((0.5, 0.7, 0.8, 0.9), period=16, verbose=0,
                             snapshot_dir=snap, snapshot_every=32)
    rec = Recorder()
    model.fit(x, y, batch_size=4, epochs=40, callbacks=[ema, rec], verbose=0)
    by_step = dict(rec.records)
    assert max(by_step) == 640
    index = {v.path: j for j, v in enumerate(model.weights)}
    for sigma_rel in (0.05, 0.10):
        arrays, report = posthoc.synthesize(snap, posthoc.PowerProfile(sigma_rel))
        assert sum(report.coefficients.values()) == pytest.approx(1.0, abs=1e-9)
        num = den = 0.0
        for path, got in zip(report.paths, arrays):
            j = index[path]
            traj = np.stack([np.asarray(by_step[n][j], np.float64) for n in range(641)])
            ref = power_average(traj.reshape(641, -1), sigma_rel, 640, 16)
            num = max(num, np.abs(got.ravel() - ref).max())
            den = max(den, np.abs(ref - traj[-1].ravel()).max())
        assert num / den < 0.02, (sigma_rel, num / den)
    # Past the last snapshot: a one-line refusal naming the range; the model
    # is left as it was.
    before = [keras.ops.convert_to_numpy(v) for v in model.weights]
    with pytest.raises(ValueError, match=r"past the last snapshot \(step 640\).*\[32, 640\]"):
        posthoc.synthesize_into(model, snap, posthoc.PowerProfile(0.10), step=680)
    # Between snapshots the iterate read at step 624 is in none at or before
    # 630: refused, the model untouched.
    with pytest.raises(posthoc.UnmatchedTargetError, match="choose a snapshot's step"):
        posthoc.synthesize_into(model, snap, posthoc.PowerProfile(0.05), step=630)
    for v, b in zip(model.weights, before):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(v), b)


def test_ill_conditioned_basis_stays_accurate_and_bounded(tmp_path):
    # Decays 0.8..0.995 at period 1 give nearly dependent profiles: plain
    # least squares reaches coefficients ~3e7 that multiply the float32
    # rounding of the snapshots (the weights 300x the gap off).
    iterates = random_walk(1000, 2000, seed=0)
    snap = write_simulated_snapshots(
        tmp_path, iterates, (0.8, 0.9, 0.95, 0.98, 0.99, 0.995), 10)
    ref = simulate_ema(iterates, 0.5, 1, True)
    (w,), report = posthoc.synthesize(snap, posthoc.EMAProfile(0.5), max_error=None)
    ratio = np.abs(w - ref).max() / np.abs(ref - iterates[-1]).max()
    assert ratio < 0.05, ratio
    assert report.coefficient_norm < 1e4
    # The reported bound holds, and a threshold below it refuses.
    assert report.error_bound >= ratio
    assert report.rounding_bound > 0
    with pytest.raises(posthoc.UnmatchedTargetError, match="error bound|matched only"):
        posthoc.synthesize(snap, posthoc.EMAProfile(0.5), max_error=report.error_bound / 2)
    with pytest.raises(ValueError, match="max_error=-1"):
        posthoc.synthesize(snap, posthoc.EMAProfile(0.5), max_error=-1)


def test_ema_without_warmup_from_warmup_emas_is_refused(tmp_path):
    # EMA(0.999) without warm-up keeps 0.999^300 = 74% on the initial
    # weights; EMAs in warm-up keep almost nothing there.
    iterates = random_walk(300, 50)
    snap = write_simulated_snapshots(tmp_path, iterates, (0.9, 0.99), 10)
    with pytest.raises(posthoc.UnmatchedTargetError, match="max_error=0.05"):
        posthoc.synthesize(snap, posthoc.EMAProfile(0.999, warmup=False))
    _, report = posthoc.synthesize(snap, posthoc.EMAProfile(0.999, warmup=False),
                                   max_error=None)
    assert sum(report.coefficients.values()) == pytest.approx(1.0, abs=1e-9)
    assert report.profile_error > 0.5


def test_uniform_target_at_period_4_is_on_the_iterates_read(tmp_path):
    iterates = random_walk(400, 50, seed=2)
    snap = write_simulated_snapshots(tmp_path, iterates, (0.9, 0.95, 0.98), 20, period=4)
    (w,), report = posthoc.synthesize(snap, posthoc.UniformProfile(300), max_error=None)
    ref = iterates[np.arange(300, 401, 4)].mean(axis=0)
    ratio = np.abs(w - ref).max() / np.abs(ref - iterates[-1]).max()
    assert ratio < 0.1, ratio
    assert sum(report.coefficients.values()) == pytest.approx(1.0, abs=1e-9)
    assert report.length == pytest.approx(50.0)  # mean age of 300, 304, ..., 400


def test_ema_profile_is_linear_time():
    import time

    t0 = time.perf_counter()
    p = posthoc.EMAProfile(0.9999, period=1).weights(300_000)
    elapsed = time.perf_counter() - t0
    assert p.sum() == pytest.approx(1.0)
    assert elapsed < 5.0, elapsed  # quadratic: minutes


# === Damaged snapshots and snapshots of two runs ===


def test_damaged_snapshots_are_named_and_left_out(tmp_path):
    iterates = random_walk(300, 200)
    snap = write_simulated_snapshots(tmp_path, iterates, (0.9, 0.99), 10)
    flip_middle_bytes(posthoc.snapshot_path(snap, 150))
    open(posthoc.snapshot_path(snap, 300), "wb").close()  # zero length
    with pytest.warns(UserWarning, match=r"snapshot_000000000150\.npz: it is damaged") as w:
        (got,), report = posthoc.synthesize(snap, posthoc.EMAProfile(0.95))
    assert any("000000000300.npz" in str(x.message) and "EOFError" in str(x.message)
               for x in w)
    assert report.step == 290  # the last readable snapshot
    ref = simulate_ema(iterates[:291], 0.95, 1, True)
    ratio = np.abs(got - ref).max() / np.abs(ref - iterates[290]).max()
    assert ratio < 0.02, ratio
    assert sorted(report.damaged) == [posthoc.snapshot_path(snap, 150),
                                      posthoc.snapshot_path(snap, 300)]
    # The damaged last step itself cannot be synthesized: one line naming it.
    with pytest.raises(ValueError) as e:
        posthoc.synthesize(snap, posthoc.EMAProfile(0.95), step=300)
    assert "past the last snapshot (step 290)" in str(e.value)
    assert "snapshot_000000000300.npz" in str(e.value) and "\n" not in str(e.value)
    assert {p for p, _ in posthoc.damaged_snapshots(snap)} == set(report.damaged)


def test_all_damaged_is_one_line(tmp_path):
    iterates = random_walk(20, 5)
    snap = write_simulated_snapshots(tmp_path, iterates, (0.9, 0.99), 10)
    for s in (10, 20):
        open(posthoc.snapshot_path(snap, s), "wb").close()
    with pytest.raises(ValueError, match="Every snapshot in .* is damaged") as e:
        posthoc.synthesize(snap, posthoc.EMAProfile(0.97))
    assert "\n" not in str(e.value)


def test_snapshots_of_two_runs_are_refused(tmp_path):
    iterates = random_walk(100, 10)
    a = write_simulated_snapshots(tmp_path / "a", iterates, (0.9, 0.99), 10)
    for _, path in posthoc.list_snapshots(a):  # stamp run "A"
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
        meta = json.loads(str(arrays["meta"]))
        meta["run_id"] = "A" if meta["step"] <= 50 else "B"
        arrays["meta"] = np.asarray(json.dumps(meta))
        with open(path, "wb") as f:
            np.savez(f, **arrays)
    with pytest.raises(ValueError, match=r"mixes snapshots of two runs.*run A.*run B"):
        posthoc.synthesize(a, posthoc.EMAProfile(0.97))


def test_multi_ema_refuses_another_runs_snapshot_dir(tmp_path):
    x, y = data(n=16)
    snap = str(tmp_path / "snaps")
    keras.utils.set_random_seed(1)
    model = tiny_model()
    model.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[
        keras_ema.MultiEMA((0.5, 0.9), verbose=0, snapshot_dir=snap, snapshot_every=2)])
    first = {n: os.path.getmtime(os.path.join(snap, n)) for n in os.listdir(snap)}
    ids = {posthoc.read_meta(os.path.join(snap, n))["run_id"] for n in first}
    assert len(ids) == 1 and None not in ids
    # A second run (same model class, fresh EMAs) into the same directory.
    other = tiny_model()
    with pytest.raises(ValueError, match="holds snapshots of another run"):
        other.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[
            keras_ema.MultiEMA((0.5, 0.9), verbose=0, snapshot_dir=snap,
                               snapshot_every=2)])
    assert {n: os.path.getmtime(os.path.join(snap, n)) for n in os.listdir(snap)} == first


def test_resume_reports_a_damaged_snapshot_before_the_resume_point(tmp_path):
    from ema_reference import StopAtEpoch

    x, y = data()

    def run(extra):
        keras.utils.set_random_seed(7)
        model = tiny_model()
        ema = keras_ema.MultiEMA((0.5, 0.9), period=2, backup_dir=str(tmp_path / "b"),
                                 verbose=0, snapshot_dir=str(tmp_path / "s"),
                                 snapshot_every=3)
        model.fit(x, y, batch_size=4, epochs=3, shuffle=False, verbose=0,
                  callbacks=[ema, keras.callbacks.BackupAndRestore(str(tmp_path / "b"))]
                  + extra)

    with pytest.raises(KeyboardInterrupt):
        run([StopAtEpoch(2)])  # killed at step 20: snapshots 3..18 written
    flip_middle_bytes(posthoc.snapshot_path(str(tmp_path / "s"), 9))
    with pytest.warns(UserWarning, match=r"snapshot_000000000009\.npz \(before the resume "
                                         r"point, step 20\) is damaged"):
        run([])
