"""Calibration: ECE on bins worked out by hand, temperature scaling vs numpy."""

import os

import numpy as np
import pytest

from keras_ema.calibration import apply_temperature
from keras_ema.calibration import calibration_bins
from keras_ema.calibration import expected_calibration_error
from keras_ema.calibration import fit_temperature
from keras_ema.calibration import reliability_diagram

pytestmark = pytest.mark.all_backends


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    """Overrides conftest's Keras reset: these tests are numpy only, and the
    reset costs a garbage collection (~0.2 s) before and after each test."""
    yield


# Eight samples, four classes. The confidence is the row's largest
# probability, the prediction its argmax (the first one on ties).
#
#   sample  probs                      conf  pred  label  correct
#   p1      [0.3, 0.3, 0.2, 0.2]       0.30  0     0      yes (tie -> 0)
#   p2      [0.4, 0.2, 0.2, 0.2]       0.40  0     1      no
#   p3      [0.1, 0.6, 0.2, 0.1]       0.60  1     1      yes
#   p4      [0.8, 0.1, 0.05, 0.05]     0.80  0     0      yes
#   p5      [0.1, 0.1, 0.1, 0.7]       0.70  3     2      no
#   p6      [0.0, 0.0, 0.0, 1.0]       1.00  3     3      yes
#   p7      [0.25, 0.25, 0.25, 0.25]   0.25  0     2      no
#   p8      [0.75, 0.25, 0.0, 0.0]     0.75  0     0      yes
PROBS = np.array([
    [0.3, 0.3, 0.2, 0.2],
    [0.4, 0.2, 0.2, 0.2],
    [0.1, 0.6, 0.2, 0.1],
    [0.8, 0.1, 0.05, 0.05],
    [0.1, 0.1, 0.1, 0.7],
    [0.0, 0.0, 0.0, 1.0],
    [0.25, 0.25, 0.25, 0.25],
    [0.75, 0.25, 0.0, 0.0],
])
LABELS = np.array([0, 1, 1, 0, 2, 3, 2, 0])


def test_ece_equal_width_by_hand():
    # 4 equal-width bins [0, .25), [.25, .5), [.5, .75), [.75, 1]:
    #   bin 0: empty                            -> contributes nothing
    #   bin 1: p7 (.25, edge), p1 (.3), p2 (.4): acc 1/3, conf .95/3
    #          |1/3 - .95/3| = .05/3, weight 3/8 -> .05/8
    #   bin 2: p3 (.6), p5 (.7): acc 1/2, conf .65 -> .15, weight 2/8 -> .3/8
    #   bin 3: p8 (.75, edge), p4 (.8), p6 (1.0, the last bin holds 1):
    #          acc 1, conf 2.55/3 = .85 -> .15, weight 3/8 -> .45/8
    #   ECE = (.05 + .3 + .45) / 8 = 0.1
    ece = expected_calibration_error(PROBS, LABELS, num_bins=4,
                                     binning="equal_width")
    assert ece == pytest.approx(0.1, abs=1e-12)
    counts, accuracy, confidence = calibration_bins(
        PROBS, LABELS, num_bins=4, binning="equal_width")
    np.testing.assert_array_equal(counts, [0, 3, 2, 3])
    assert np.isnan(accuracy[0]) and np.isnan(confidence[0])
    np.testing.assert_allclose(accuracy[1:], [1 / 3, 0.5, 1.0])
    np.testing.assert_allclose(confidence[1:], [0.95 / 3, 0.65, 0.85])


def test_ece_equal_mass_by_hand():
    # Sorted by confidence: p7 .25, p1 .3, p2 .4, p3 .6, p5 .7, p8 .75,
    # p4 .8, p6 1.0. Eight samples in 3 bins as np.array_split: 3, 3, 2.
    #   bin 0: p7, p1, p2: acc 1/3, conf .95/3 -> .05/3, weight 3/8 -> .05/8
    #   bin 1: p3, p5, p8: acc 2/3, conf 2.05/3 -> .05/3, weight 3/8 -> .05/8
    #   bin 2: p4, p6:     acc 1,   conf .9    -> .1,    weight 2/8 -> .2/8
    #   ECE = (.05 + .05 + .2) / 8 = 0.0375
    # (Bins of 2, 3, 3 would give 0.2 instead.)
    ece = expected_calibration_error(PROBS, LABELS, num_bins=3,
                                     binning="equal_mass")
    assert ece == pytest.approx(0.0375, abs=1e-12)
    counts, accuracy, _ = calibration_bins(PROBS, LABELS, 3, "equal_mass")
    np.testing.assert_array_equal(counts, [3, 3, 2])
    np.testing.assert_allclose(accuracy, [1 / 3, 2 / 3, 1.0])
    # The default binning is equal-mass.
    assert expected_calibration_error(PROBS, LABELS, num_bins=3) == ece


def test_ece_one_bin_and_more_bins_than_samples():
    # One bin: |accuracy 5/8 - mean confidence 4.8/8| = .2/8 = 0.025.
    for binning in ("equal_mass", "equal_width"):
        assert expected_calibration_error(
            PROBS, LABELS, num_bins=1, binning=binning
        ) == pytest.approx(0.025, abs=1e-12)
    # 100 equal-mass bins for 8 samples: each sample alone, ECE = mean of
    # |correct - conf| = (.7 + .4 + .4 + .2 + .7 + 0 + .25 + .25) / 8 = 0.3625.
    assert expected_calibration_error(PROBS, LABELS) == pytest.approx(
        0.3625, abs=1e-12)


def test_equal_width_bin_edges_are_exact():
    # Bin b of 100 holds [b / 100, (b + 1) / 100): confidence 0.57 is in bin
    # 57, 0.58 in bin 58 and 0.71 in bin 71, although 0.57 * 100 is
    # 56.99999999999999 and 0.58 * 100 is 57.99999999999999 in floating point.
    probs = np.array([[0.57, 0.43], [0.29, 0.71], [0.58, 0.42]])
    counts, _, _ = calibration_bins(probs, [0, 0, 0], 100, "equal_width")
    assert list(np.flatnonzero(counts)) == [57, 58, 71]


def test_perfectly_calibrated_predictions_have_zero_ece():
    # 10 samples at confidence .8 of which 8 right, 10 at .6 of which 6 right:
    # in every bin accuracy equals mean confidence.
    probs = np.array([[0.8, 0.2]] * 10 + [[0.4, 0.6]] * 10)
    labels = np.array([0] * 8 + [1] * 2 + [1] * 6 + [0] * 4)
    for binning, bins in (("equal_width", 10), ("equal_width", 15),
                          ("equal_mass", 2)):
        assert expected_calibration_error(
            probs, labels, num_bins=bins, binning=binning
        ) == pytest.approx(0.0, abs=1e-12)
    # ...and the same confidences with all predictions right are not.
    assert expected_calibration_error(
        probs, np.array([0] * 10 + [1] * 10), num_bins=10,
        binning="equal_width") == pytest.approx(0.3)


def test_ece_matches_a_numpy_loop_on_random_predictions():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=2.0, size=(1000, 10))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = rng.integers(0, 10, size=1000)
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    # Equal width, 15 bins, written as the usual loop over bin edges.
    expected = 0.0
    for b in range(15):
        lo, hi = b / 15, (b + 1) / 15
        members = (conf >= lo) & ((conf < hi) if b < 14 else (conf <= hi))
        if members.any():
            expected += members.mean() * abs(
                correct[members].mean() - conf[members].mean())
    assert expected_calibration_error(
        probs, labels, 15, "equal_width") == pytest.approx(expected, rel=1e-9)
    # Equal mass, 100 bins of 10 consecutive sorted samples.
    order = np.argsort(conf)
    expected = np.mean([
        abs(correct[chunk].mean() - conf[chunk].mean())
        for chunk in order.reshape(100, 10)
    ])
    assert expected_calibration_error(probs, labels) == pytest.approx(
        expected, rel=1e-9)


def test_apply_temperature_matches_numpy():
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=3.0, size=(50, 7))
    for t in (0.5, 1.0, 2.5):
        expected = np.exp(logits / t)
        expected /= expected.sum(axis=1, keepdims=True)
        np.testing.assert_allclose(apply_temperature(logits, t), expected,
                                   rtol=1e-12, atol=1e-15)
    # By hand: softmax([0, ln 3]) = [1/4, 3/4]; at T = 2, [1, sqrt 3] / (1 +
    # sqrt 3); huge logits do not overflow.
    np.testing.assert_allclose(apply_temperature([[0.0, np.log(3.0)]], 1.0),
                               [[0.25, 0.75]])
    r3 = 3 ** 0.5
    np.testing.assert_allclose(apply_temperature([[0.0, np.log(3.0)]], 2.0),
                               [[1 / (1 + r3), r3 / (1 + r3)]])
    np.testing.assert_allclose(apply_temperature([[1000.0, 1000.0]], 0.1),
                               [[0.5, 0.5]])


def _nll(logits, labels, t):
    z = logits / t
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -log_p[np.arange(len(labels)), labels].mean()


@pytest.mark.parametrize("t_true", [0.5, 2.0])
def test_fit_temperature_recovers_a_known_temperature(t_true):
    # Labels drawn from softmax(z / T_true): the NLL-optimal temperature for
    # the logits z is T_true, up to sampling noise (n = 20000).
    rng = np.random.default_rng(2)
    z = rng.normal(scale=3.0, size=(20000, 5))
    p = np.exp(z / t_true)
    p /= p.sum(axis=1, keepdims=True)
    labels = (rng.random((20000, 1)) > p.cumsum(axis=1)).sum(axis=1)
    labels = np.minimum(labels, 4)
    t = fit_temperature(z, labels)
    assert t == pytest.approx(t_true, rel=0.02)
    # And it is the minimum of the NLL: moving it either way costs.
    for factor in (0.99, 1.01):
        assert _nll(z, labels, t) < _nll(z, labels, t * factor)


def test_fit_temperature_is_one_for_calibrated_logits():
    rng = np.random.default_rng(3)
    z = rng.normal(scale=2.0, size=(20000, 3))
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    labels = (rng.random((20000, 1)) > p.cumsum(axis=1)).sum(axis=1)
    labels = np.minimum(labels, 2)
    # Labels as a column (samples, 1) are accepted too.
    assert fit_temperature(z, labels[:, None]) == pytest.approx(1.0, rel=0.02)


def test_reliability_diagram_writes_a_png_atomically(tmp_path):
    rng = np.random.default_rng(4)
    logits = rng.normal(scale=2.0, size=(300, 10))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = rng.integers(0, 10, size=300)
    directory = tmp_path / "plots" / "deep"  # created on the way
    for binning in ("equal_width", "equal_mass"):
        path = directory / f"{binning}.png"
        returned = reliability_diagram(probs, labels, str(path), num_bins=10,
                                       binning=binning, title="test")
        assert returned == str(path)
        data = path.read_bytes()
        assert len(data) > 1000
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
    # Nothing else is left in the directory: no temporary file.
    assert sorted(os.listdir(directory)) == ["equal_mass.png",
                                             "equal_width.png"]


def test_reliability_diagram_bad_input_writes_nothing(tmp_path):
    path = tmp_path / "r.png"
    with pytest.raises(ValueError):
        reliability_diagram(PROBS * 2, LABELS, str(path))
    assert os.listdir(tmp_path) == []


def test_reliability_diagram_without_matplotlib_is_one_line(tmp_path, monkeypatch):
    import sys

    # `None` in sys.modules makes `import matplotlib.figure` raise ImportError.
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="pip install matplotlib") as error:
        reliability_diagram(PROBS, LABELS, str(tmp_path / "r.png"))
    assert "\n" not in str(error.value)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "probs,labels,kwargs,match",
    [
        (PROBS * 0.5, LABELS, {}, "sum to 1"),  # rows sum to 0.5
        (np.array([[0.5, 0.6]]), [0], {}, "sum to 1"),  # sums to 1.1
        (np.array([[2.0, -1.0]]), [0], {}, r"\[0, 1\]"),  # logits
        (PROBS, LABELS[:5], {}, "labels.shape"),
        (PROBS[0], LABELS[:1], {}, "2D"),
        (PROBS, LABELS, {"num_bins": 0}, "num_bins=0"),
        (PROBS, LABELS, {"num_bins": 2.5}, "num_bins=2.5"),
        (PROBS, LABELS, {"binning": "uniform"}, "uniform"),
        (PROBS, LABELS + 4, {}, "labels must lie"),
        (PROBS, LABELS + 0.5, {}, "integer"),
        (np.full((2, 2), np.nan), [0, 1], {}, "NaN"),
    ],
)
def test_bad_inputs_raise_value_error(probs, labels, kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        expected_calibration_error(probs, labels, **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("t", [0, -1.0, float("nan"), float("inf"), "hot",
                               None])
def test_bad_temperature_raises(t):
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(PROBS, t)


def test_fit_temperature_bad_inputs_raise():
    with pytest.raises(ValueError, match="labels.shape"):
        fit_temperature(np.zeros((4, 3)), [0, 1])
    with pytest.raises(ValueError, match="logits"):
        fit_temperature(np.zeros(4), [0, 1, 1, 0])
    with pytest.raises(ValueError, match="logits"):
        apply_temperature(np.zeros(4), 1.0)


def test_fit_temperature_refuses_probabilities():
    rng = np.random.default_rng(5)
    z = rng.normal(scale=3.0, size=(2000, 4))
    labels = rng.integers(0, 4, size=2000)
    p = np.exp(z / 2.0) / np.exp(z / 2.0).sum(axis=1, keepdims=True)
    for probs in (p, p.astype(np.float32)):
        with pytest.raises(ValueError, match="probabilities") as info:
            fit_temperature(probs, labels)
        assert "\n" not in str(info.value)
    # Logits that happen to lie in [0, 1] but are not probability rows pass.
    small = rng.random((2000, 4))
    assert np.isfinite(fit_temperature(small, labels))
    # A single probability-like row among logits does not trigger it.
    mixed = z.copy()
    mixed[0] = [0.25, 0.25, 0.25, 0.25]
    assert np.isfinite(fit_temperature(mixed, labels))


def _ece_100_equal_mass(probs, labels):
    """ECE with 100 equal-mass bins, written out: the number results.md reports."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    order = np.argsort(confidence, kind="stable")
    total = 0.0
    for members in np.array_split(order, 100):
        if len(members):
            total += len(members) / len(labels) * abs(
                correct[members].mean() - confidence[members].mean())
    return total


def test_reliability_figure_counts_ece_and_legend_placement():
    from keras_ema.calibration import reliability_figure

    rng = np.random.default_rng(5)
    logits = rng.normal(scale=3.0, size=(2000, 10))
    labels = rng.integers(0, 10, size=2000)
    labels[:1200] = logits[:1200].argmax(1)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    fig = reliability_figure(probs, labels, num_bins=15, title="EMA, seed 3")
    bars, hist = fig.axes
    assert bars.get_title() == "EMA, seed 3"
    # The histogram: one bar per non-empty equal-width bin, as high as the
    # number of predictions whose confidence falls in it.
    counts, _ = np.histogram(probs.max(axis=1), bins=15, range=(0.0, 1.0))
    heights = [p.get_height() for p in hist.patches]
    np.testing.assert_array_equal(heights, counts[counts > 0])
    # The legend's ECE is the tables' (100 equal-mass bins), not that of the
    # 15 equal-width bins drawn.
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    want = f"ECE {100 * _ece_100_equal_mass(probs, labels):.2f}% (100 equal-mass bins)"
    assert want in texts
    width_ece = expected_calibration_error(probs, labels, 15, "equal_width")
    assert f"{100 * width_ece:.2f}%" not in want
    # The legend lies outside both plots.
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    legend = fig.legends[0].get_window_extent(renderer)
    for ax in (bars, hist):
        assert not legend.overlaps(ax.get_window_extent(renderer))
