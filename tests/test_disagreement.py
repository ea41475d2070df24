"""churn and jensen_shannon against numpy formulas written here."""

import math

import numpy as np
import pytest

from keras_ema.disagreement import churn
from keras_ema.disagreement import jensen_shannon

pytestmark = pytest.mark.all_backends

LN2 = math.log(2.0)


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    """Overrides conftest's Keras reset: these tests are numpy only, and the
    reset costs a garbage collection (~0.2 s) before and after each test."""
    yield


def random_probs(rng, n=200, k=6, scale=2.0):
    logits = rng.normal(scale=scale, size=(n, k))
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_js(p, q):
    """Per-sample JS divergence in nats, 0 log 0 = 0, via entropies:
    JS = H(m) - (H(p) + H(q)) / 2 with m = (p + q) / 2."""
    def entropy(r):
        with np.errstate(divide="ignore", invalid="ignore"):
            return -np.where(r > 0, r * np.log(r), 0.0).sum(axis=1)
    return entropy((p + q) / 2) - (entropy(p) + entropy(q)) / 2


def test_churn_by_hand():
    # Top-1: a -> 0, 1, 2, 0 (tie [.5, .5] -> 0); b -> 0, 2, 2, 1.
    # Two of four differ: churn 0.5.
    a = [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.5, 0.5, 0.0]]
    b = [[0.6, 0.3, 0.1], [0.1, 0.4, 0.5], [0.0, 0.1, 0.9], [0.2, 0.7, 0.1]]
    assert churn(a, b) == 0.5
    assert churn(b, a) == 0.5
    assert churn(a, a) == 0.0


def test_churn_matches_numpy_and_accepts_logits():
    rng = np.random.default_rng(0)
    p, q = random_probs(rng), random_probs(rng)
    expected = np.mean(np.argmax(p, axis=1) != np.argmax(q, axis=1))
    assert 0 < expected < 1
    assert churn(p, q) == pytest.approx(expected, abs=0)
    # The argmax of log-probabilities (logits) is the same.
    assert churn(np.log(p) + 3.0, np.log(q)) == pytest.approx(expected, abs=0)
    assert churn(p, p) == 0.0


def test_jensen_shannon_by_hand():
    # Disjoint supports: p = [1, 0], q = [0, 1], m = [.5, .5]:
    #   KL(p || m) = 1 * ln(1 / .5) = ln 2, same for q: JS = ln 2, the maximum.
    assert jensen_shannon([[1.0, 0.0]], [[0.0, 1.0]]) == pytest.approx(LN2)
    # p = [1, 0], q = [.5, .5], m = [.75, .25]:
    #   KL(p || m) = ln(1 / .75) = ln(4/3)
    #   KL(q || m) = .5 ln(.5 / .75) + .5 ln(.5 / .25) = .5 ln(2/3) + .5 ln 2
    #   JS = .5 ln(4/3) + .25 ln(2/3) + .25 ln 2
    by_hand = (0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3)
               + 0.25 * math.log(2))
    assert jensen_shannon([[1.0, 0.0]], [[0.5, 0.5]]) == pytest.approx(
        by_hand, rel=1e-12)
    # The mean over samples: (ln 2 + by_hand + 0) / 3.
    got = jensen_shannon([[1.0, 0.0], [1.0, 0.0], [0.3, 0.7]],
                         [[0.0, 1.0], [0.5, 0.5], [0.3, 0.7]])
    assert got == pytest.approx((LN2 + by_hand) / 3, rel=1e-12)


def test_jensen_shannon_matches_numpy_is_symmetric_and_bounded():
    rng = np.random.default_rng(1)
    p, q = random_probs(rng, scale=3.0), random_probs(rng, scale=3.0)
    q[:20] = 0.0  # some one-hot rows: zeros on one side only
    q[np.arange(20), rng.integers(0, 6, 20)] = 1.0
    expected = np_js(p, q).mean()
    assert jensen_shannon(p, q) == pytest.approx(expected, rel=1e-10)
    assert jensen_shannon(q, p) == pytest.approx(jensen_shannon(p, q),
                                                 rel=1e-12)
    assert 0 < jensen_shannon(p, q) <= LN2
    assert jensen_shannon(p, p) == 0.0
    assert jensen_shannon(q, q) == 0.0


@pytest.mark.parametrize("fn", [churn, jensen_shannon])
@pytest.mark.parametrize(
    "a,b,match",
    [
        (np.full((3, 2), 0.5), np.full((4, 2), 0.5), "same shape"),
        (np.full((3, 2), 0.5), np.full((3, 3), 1 / 3), "same shape"),
        (np.full((3,), 0.5), np.full((3,), 0.5), "2D"),
        (np.full((3, 2, 1), 0.5), np.full((3, 2, 1), 0.5), "2D"),
        (np.zeros((0, 2)), np.zeros((0, 2)), "at least one"),
        (np.full((3, 2), np.nan), np.full((3, 2), 0.5), "NaN"),
    ],
)
def test_bad_shapes_raise(fn, a, b, match):
    with pytest.raises(ValueError, match=match) as info:
        fn(a, b)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "a,match",
    [
        (np.array([[1.5, -0.5]]), "non-negative"),  # negative entry
        (np.array([[2.0, 1.0]]), "sum to 1"),  # logits-like, non-negative
        (np.array([[0.2, 0.2]]), "sum to 1"),
    ],
)
def test_jensen_shannon_refuses_non_probabilities(a, match):
    with pytest.raises(ValueError, match=match):
        jensen_shannon(a, np.array([[0.5, 0.5]]))
    with pytest.raises(ValueError, match=match):
        jensen_shannon(np.array([[0.5, 0.5]]), a)


def test_jensen_shannon_takes_rounding_below_zero_as_zero():
    # A softmax output rounded a hair below 0 (within the 1e-6 that
    # expected_calibration_error also accepts) counts as 0, as a probability:
    # the result is the one of the rows with that entry set to 0, by hand:
    # p = (1, 0), q = (0.5, 0.5), m = (0.75, 0.25),
    # KL(p || m) = ln(4 / 3), KL(q || m) = 0.5 ln(2 / 3) + 0.5 ln 2.
    p = np.array([[1.0, -1e-9]])
    q = np.array([[0.5, 0.5]])
    expected = 0.5 * math.log(4 / 3) + 0.5 * (
        0.5 * math.log(2 / 3) + 0.5 * math.log(2.0))
    assert jensen_shannon(p, q) == pytest.approx(expected, rel=1e-9)
    assert jensen_shannon(q, p) == pytest.approx(expected, rel=1e-9)
    # Beyond rounding, a negative entry is refused in the same words as by
    # expected_calibration_error.
    with pytest.raises(ValueError, match=r"non-negative probabilities in \[0, 1\]"):
        jensen_shannon(np.array([[1.001, -0.001]]), q)
