"""The assertions tfpar.testing offers for portable exactness tests and upstream-bug pins."""

from __future__ import annotations

import numpy as np
import pytest

import tfpar.testing


def _runs(seed=0):
    rng = np.random.default_rng(seed)
    reference = [rng.normal(size=(5, 3)), rng.normal(size=(3,))]
    baseline = [r + rng.normal(scale=1e-6, size=r.shape) for r in reference]
    return reference, baseline


def test_a_result_with_round_off_like_the_baseline_passes():
    reference, baseline = _runs()
    actual = [r + np.random.default_rng(1).normal(scale=1e-6, size=r.shape) for r in reference]
    tolerance = tfpar.testing.assert_within_float32_noise(actual, baseline, reference)
    assert 1e-6 < tolerance < 1e-4


def test_a_real_difference_fails_and_says_by_how_much():
    reference, baseline = _runs()
    actual = [r.copy() for r in reference]
    actual[1][2] += 1e-3  # far above the baseline's round-off
    with pytest.raises(AssertionError, match=r"Array 1 of 2 differs from the float64 reference by 0\.001"):
        tfpar.testing.assert_within_float32_noise(actual, baseline, reference)


def test_nan_and_shape_mismatches_fail():
    reference, baseline = _runs()
    actual = [r.copy() for r in reference]
    actual[0][0, 0] = np.nan
    with pytest.raises(AssertionError, match="differs"):
        tfpar.testing.assert_within_float32_noise(actual, baseline, reference)
    with pytest.raises(AssertionError, match="shapes differ"):
        tfpar.testing.assert_within_float32_noise([reference[0].T, reference[1]], baseline, reference)
    with pytest.raises(AssertionError, match="same number of arrays"):
        tfpar.testing.assert_within_float32_noise(reference[:1], baseline, reference)


def test_a_bitwise_equal_baseline_still_allows_the_floor():
    reference, _ = _runs()
    actual = [r * (1 + 1e-8) for r in reference]
    tfpar.testing.assert_within_float32_noise(actual, reference, reference)  # floor 1e-6 of the scale


def test_skip_unless_reproduced_names_the_versions_and_cpu():
    tfpar.testing.skip_unless_reproduced(True, "anything")  # reproduced: the test goes on
    with pytest.raises(pytest.skip.Exception) as skipped:
        tfpar.testing.skip_unless_reproduced(False, "an upstream crash (example#1)")
    message = str(skipped.value)
    assert "an upstream crash (example#1)" in message
    assert "TensorFlow 2." in message and "Keras 3." in message and "CPU " in message
