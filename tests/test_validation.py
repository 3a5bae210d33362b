"""tfpar._validation: TypeError for a wrong type, ValueError for a wrong value, one message format."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tfpar._validation import check_choice, check_fraction, check_int, check_positive_number


def test_check_int():
    assert check_int("n", 3, minimum=1) == 3 and type(check_int("n", np.int64(3))) is int
    assert check_int("n", None, allow_none=True) is None
    with pytest.raises(TypeError, match=r"^Expected `n` to be an int >= 1\. Received: n=True \(of type bool\)$"):
        check_int("n", True, minimum=1)
    with pytest.raises(TypeError, match=r"Expected `n` to be an int or None\. Received: n=2\.0 \(of type float\)"):
        check_int("n", 2.0, allow_none=True)
    with pytest.raises(ValueError, match=r"Expected `n` to be an int in \[1, 4\]\. Received: n=5 \(of type int\)\. Use 4\.$"):
        check_int("n", 5, minimum=1, maximum=4, hint="Use 4.")


def test_check_positive_number():
    assert check_positive_number("lr", 1) == 1.0 and check_positive_number("lr", 0, allow_zero=True) == 0.0
    with pytest.raises(TypeError, match=r"Received: lr='1' \(of type str\)"):
        check_positive_number("lr", "1")
    for bad in (0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match=r"Expected `lr` to be a finite number > 0\. Received: lr="):
            check_positive_number("lr", bad)


def test_check_fraction_and_choice():
    assert check_fraction("f", 1) == 1.0
    with pytest.raises(TypeError, match=r"f=None"):
        check_fraction("f", None)
    with pytest.raises(ValueError, match=r"Expected `f` to be a fraction in \[0, 1\]\. Received: f=nan"):
        check_fraction("f", math.nan)
    assert check_choice("mode", "random", ("sequential", "random")) == "random"
    with pytest.raises(TypeError, match=r"Expected `mode` to be one of 'sequential', 'random'\. Received: mode=1"):
        check_choice("mode", 1, ("sequential", "random"))
    with pytest.raises(ValueError, match=r"Received: mode='rand' \(of type str\)"):
        check_choice("mode", "rand", ("sequential", "random"))
