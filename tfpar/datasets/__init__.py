"""Small real datasets bundled with tfpar, so examples and `tfpar train` need no download."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

_HERE = Path(__file__).parent


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """Loads the UCI handwritten digits (1,797 real 8x8 grayscale images, 10 classes).

    The data is the copy scikit-learn ships (``sklearn.datasets.load_digits``; UCI ML hand-written
    digits, BSD-3-Clause), bundled so nothing is downloaded.

    Returns:
        ``(images, labels)``: float32 images of shape ``(1797, 8, 8, 1)`` with values in 0..16, and
        int64 labels of shape ``(1797,)``.

    Example:
    >>> images, labels = tfpar.datasets.load_digits()
    >>> images.shape, labels[:5]
    ((1797, 8, 8, 1), array([0, 1, 2, 3, 4]))
    """
    with gzip.open(_HERE / "digits.csv.gz", "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float32)
    images = table[:, :64].reshape(-1, 8, 8, 1)
    labels = table[:, 64].astype(np.int64)
    return images, labels
