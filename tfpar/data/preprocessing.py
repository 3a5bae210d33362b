"""Preprocessing as Keras layers: standardization, mean-centering, missing-value imputation.

Each function computes its statistics from the data (numpy arrays, tensors, a ``tf.data.Dataset``
of examples or of batches, or a list of shards of those) and returns a Keras layer with the
statistics baked in as constants. Put the layer first in the model and the transform ships with it:
``model.save`` stores it, serving applies it, and training under any strategy sees exactly the
numbers computed here.

* :func:`standardization` -> ``keras.layers.Normalization(mean=m, variance=v)``: ``(x - m) / sqrt(v)``;
* :func:`mean_centering` -> ``keras.layers.Normalization(mean=m, variance=1)``: ``x - m``;
* :func:`imputation` -> :class:`Imputation`: missing values (NaN, or a sentinel such as -1)
  replaced by the feature's mean, median or a constant.

Statistics are exact. Means and variances are accumulated in float64 with Chan et al.'s pairwise
update, one pass, in chunks of 4,096 rows; medians keep every present value of every feature
(``8 * rows * features`` bytes). Missing values are left out of every statistic.

**Sharded data.** Pass several shards as a list and they are combined exactly. Under
``tf.distribute.MultiWorkerMirroredStrategy``, pass ``strategy=`` and each worker's statistics of
its own shard are combined across workers with the strategy's collectives, so every worker builds
the same layer from the statistics of the whole dataset without reading the other shards. (With a
single-worker strategy there is nothing to combine, and no collective runs.)
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import keras
import numpy as np
import tensorflow as tf

from tfpar._validation import check_int

METHODS = ("mean", "median", "constant")
CHUNK_ROWS = 4096

Data = Any  # np.ndarray | tf.Tensor | tf.data.Dataset | Sequence of those (shards)


@dataclasses.dataclass(frozen=True)
class FeatureStatistics:
    """Per-feature statistics of present (non-missing) values.

    Attributes:
        count: Present values per feature (float64 array; shape ``(features,)``, or ``()`` for
            ``axis=None``).
        missing: Missing values per feature.
        mean: Mean per feature.
        variance: Population variance per feature (divided by the count, as Keras' Normalization).
        median: Median per feature, or None if not asked for.
    """

    count: np.ndarray
    missing: np.ndarray
    mean: np.ndarray
    variance: np.ndarray
    median: np.ndarray | None = None


def compute_statistics(
    data: Data,
    *,
    axis: int | None = -1,
    missing_value: float = math.nan,
    median: bool = False,
    strategy: tf.distribute.Strategy | None = None,
) -> FeatureStatistics:
    """Computes count, mean, variance (and median) per feature, leaving missing values out.

    Args:
        data: Features as a numpy array or tensor, a ``tf.data.Dataset`` (examples or batches;
            for ``(x, y, ...)`` elements the first component is used), or a list of such shards.
        axis: The feature axis, counted from the end (``-1``: last axis, e.g. columns of a table
            or channels of an image), or None for one statistic over all values.
        missing_value: The value that marks a missing entry; NaN (the default) matches NaNs.
        median: Whether to compute medians too (keeps all values in memory).
        strategy: A ``MultiWorkerMirroredStrategy`` whose workers each pass their own shard; the
            result then covers all shards. Other strategies combine nothing.

    Returns:
        A :class:`FeatureStatistics`.

    Raises:
        TypeError: If `data` or `strategy` has an unsupported type.
        ValueError: If `axis` is not negative, or the data is empty.

    Example:
    >>> stats = tfpar.data.preprocessing.compute_statistics(np.array([[1.0, np.nan], [3.0, 4.0]]))
    >>> stats.mean
    array([2., 4.])
    """
    _check_axis(axis)
    _check_missing(missing_value)
    if strategy is not None and not isinstance(strategy, tf.distribute.Strategy):
        raise TypeError(
            f"Expected `strategy` to be a tf.distribute.Strategy or None. Received: {strategy!r}"
        )
    moments: _Moments | None = None
    values: list[np.ndarray] = []
    for chunk in _chunks(data, axis):
        present = ~_missing_mask(chunk, missing_value)
        part = _Moments.of(chunk, present)
        moments = part if moments is None else moments.merge(part)
        if median:
            values.append(np.where(present, chunk, np.nan))
    if moments is None:
        raise ValueError(f"Expected data with at least one row. Received: data={_describe(data)}")
    local_values = np.concatenate(values) if median else None
    workers = _worker_count(strategy)
    if workers > 1:
        moments, local_values = _combine_across_workers(strategy, moments, local_values)
    shape = () if axis is None else moments.count.shape
    median_values = None
    if local_values is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an all-missing feature -> NaN
            median_values = np.nanmedian(local_values, axis=0).reshape(shape)
    return FeatureStatistics(
        count=moments.count.reshape(shape),
        missing=moments.missing.reshape(shape),
        mean=moments.mean.reshape(shape),
        variance=moments.variance.reshape(shape),
        median=median_values,
    )


def standardization(
    data: Data,
    *,
    axis: int | None = -1,
    missing_value: float = math.nan,
    strategy: tf.distribute.Strategy | None = None,
) -> keras.layers.Normalization:
    """Returns a Keras ``Normalization`` layer computing ``(x - mean) / sqrt(variance)``.

    Args:
        data, axis, missing_value, strategy: As in :func:`compute_statistics`.

    Returns:
        ``keras.layers.Normalization`` with the data's mean and variance as constants.

    Raises:
        ValueError: If a feature has no present values.

    Example:
    >>> images, labels = tfpar.datasets.load_digits()
    >>> inputs = keras.Input((8, 8, 1))
    >>> x = tfpar.data.standardization(images)(inputs)
    """
    stats = compute_statistics(data, axis=axis, missing_value=missing_value, strategy=strategy)
    _require_present(stats, "standardization")
    return keras.layers.Normalization(
        axis=axis, mean=stats.mean.tolist(), variance=stats.variance.tolist()
    )


def mean_centering(
    data: Data,
    *,
    axis: int | None = -1,
    missing_value: float = math.nan,
    strategy: tf.distribute.Strategy | None = None,
) -> keras.layers.Normalization:
    """Returns a Keras ``Normalization`` layer computing ``x - mean`` (variance fixed at 1).

    Args:
        data, axis, missing_value, strategy: As in :func:`compute_statistics`.

    Returns:
        ``keras.layers.Normalization`` with the data's mean and a variance of 1.

    Raises:
        ValueError: If a feature has no present values.

    Example:
    >>> layer = tfpar.data.mean_centering(np.array([[1.0, 2.0], [3.0, 6.0]]))
    >>> layer(np.array([[2.0, 4.0]]))
    <tf.Tensor: shape=(1, 2), dtype=float32, numpy=array([[0., 0.]], dtype=float32)>
    """
    stats = compute_statistics(data, axis=axis, missing_value=missing_value, strategy=strategy)
    _require_present(stats, "mean-centering")
    return keras.layers.Normalization(
        axis=axis, mean=stats.mean.tolist(), variance=np.ones_like(stats.mean).tolist()
    )


def imputation(
    data: Data | None = None,
    *,
    method: Literal["mean", "median", "constant"] = "mean",
    fill_value: float | Sequence[float] | None = None,
    missing_value: float = math.nan,
    axis: int | None = -1,
    strategy: tf.distribute.Strategy | None = None,
) -> Imputation:
    """Returns an :class:`Imputation` layer that fills missing values.

    Args:
        data: The data the mean or median comes from (not needed for ``method="constant"``).
        method: ``"mean"``, ``"median"`` or ``"constant"``.
        fill_value: The constant (a number, or one per feature) for ``method="constant"``.
        missing_value: The value that marks a missing entry; NaN by default.
        axis, strategy: As in :func:`compute_statistics`.

    Returns:
        An :class:`Imputation` layer.

    Raises:
        ValueError: If `method` is unknown, `fill_value` is missing for (or given with the wrong
            method), `data` is missing for mean/median, or a feature has no present values.

    Example:
    >>> layer = tfpar.data.imputation(np.array([[1.0, np.nan], [3.0, 4.0]]), method="median")
    >>> layer(np.array([[np.nan, np.nan]]))
    <tf.Tensor: shape=(1, 2), dtype=float32, numpy=array([[2., 4.]], dtype=float32)>
    """
    if method not in METHODS:
        raise ValueError(f"Expected method to be one of {list(METHODS)}. Received: method={method!r}")
    _check_axis(axis)
    _check_missing(missing_value)
    if method == "constant":
        if fill_value is None:
            raise ValueError(
                "method='constant' needs fill_value, e.g. fill_value=0.0. Received: fill_value=None"
            )
        return Imputation(fill_value=fill_value, missing_value=missing_value, axis=axis)
    if fill_value is not None:
        raise ValueError(
            f"fill_value only applies to method='constant'. Received: method={method!r}, "
            f"fill_value={fill_value!r}"
        )
    if data is None:
        raise ValueError(
            f"method={method!r} computes its fill values from `data`. Received: data=None"
        )
    stats = compute_statistics(
        data, axis=axis, missing_value=missing_value, median=method == "median", strategy=strategy
    )
    _require_present(stats, "imputation")
    values = stats.median if method == "median" else stats.mean
    return Imputation(fill_value=np.asarray(values).tolist(), missing_value=missing_value, axis=axis)


@keras.saving.register_keras_serializable(package="tfpar")
class Imputation(keras.layers.Layer):
    """Replaces missing values with a per-feature (or single) fill value.

    Args:
        fill_value: A number, or one number per feature along `axis`.
        missing_value: The value that marks a missing entry; NaN matches NaNs.
        axis: The feature axis counted from the end (-1, -2, ...), or None for a single value.
        **kwargs: Standard ``keras.layers.Layer`` arguments (``name``, ``dtype``, ...).

    Example:
    >>> layer = tfpar.data.Imputation(fill_value=[0.5, 2.0])
    >>> layer(np.array([[np.nan, 1.0]]))
    <tf.Tensor: shape=(1, 2), dtype=float32, numpy=array([[0.5, 1. ]], dtype=float32)>
    """

    def __init__(
        self,
        fill_value: float | Sequence[float],
        missing_value: float = math.nan,
        axis: int | None = -1,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        _check_axis(axis)
        _check_missing(missing_value)
        fill = np.asarray(fill_value, dtype=np.float64)
        if fill.ndim > 1 or not np.all(np.isfinite(fill)):
            raise ValueError(
                "Expected fill_value to be a finite number or a list of them (one per feature). "
                f"Received: fill_value={fill_value!r}"
            )
        if axis is None and fill.ndim:
            raise ValueError(
                f"axis=None imputes with one value. Received: fill_value={fill_value!r}"
            )
        self.fill_value = fill
        self.missing_value = float(missing_value)
        self.axis = axis

    def build(self, input_shape: tuple) -> None:
        if self.fill_value.ndim and self.axis is not None:
            features = input_shape[self.axis] if len(input_shape) >= -self.axis else None
            if features is not None and features != self.fill_value.shape[0]:
                raise ValueError(
                    f"Expected inputs with {self.fill_value.shape[0]} features on axis "
                    f"{self.axis} (one per fill value). Received: input_shape={input_shape}"
                )
        self.built = True

    def call(self, inputs: Any) -> Any:
        x = keras.ops.convert_to_tensor(inputs, dtype=self.compute_dtype)
        if math.isnan(self.missing_value):
            missing = keras.ops.isnan(x)
        else:
            missing = keras.ops.equal(x, keras.ops.cast(self.missing_value, x.dtype))
        fill = keras.ops.cast(self.fill_value, x.dtype)
        if self.fill_value.ndim and self.axis is not None and self.axis != -1:
            fill = keras.ops.reshape(fill, (-1,) + (1,) * (-self.axis - 1))
        return keras.ops.where(missing, fill, x)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "fill_value": self.fill_value.tolist(),
                "missing_value": self.missing_value,
                "axis": self.axis,
            }
        )
        return config


# === internals ===


@dataclasses.dataclass
class _Moments:
    count: np.ndarray
    missing: np.ndarray
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def of(cls, chunk: np.ndarray, present: np.ndarray) -> _Moments:
        count = present.sum(axis=0).astype(np.float64)
        total = np.where(present, chunk, 0.0).sum(axis=0)
        mean = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
        m2 = (np.where(present, chunk - mean, 0.0) ** 2).sum(axis=0)
        missing = (~present).sum(axis=0).astype(np.float64)
        return cls(count, missing, mean, m2)

    def merge(self, other: _Moments) -> _Moments:
        # Chan, Golub & LeVeque: exact and stable pairwise combination of (n, mean, M2).
        count = self.count + other.count
        delta = other.mean - self.mean
        safe = np.where(count > 0, count, 1.0)
        mean = self.mean + delta * other.count / safe
        m2 = self.m2 + other.m2 + delta**2 * self.count * other.count / safe
        return _Moments(count, self.missing + other.missing, mean, m2)

    @property
    def variance(self) -> np.ndarray:
        return np.divide(self.m2, self.count, out=np.full_like(self.m2, np.nan),
                         where=self.count > 0)


def _check_axis(axis: object) -> None:
    if axis is None:
        return
    check_int("axis", axis, maximum=-1, expected="a negative int (counted from the end, the same for "
              "examples and batches; -1 is the last axis) or None")


def _check_missing(missing_value: object) -> None:
    if isinstance(missing_value, bool) or not isinstance(missing_value, numbers.Real):
        raise TypeError(
            f"Expected `missing_value` to be a number (NaN by default). "
            f"Received: missing_value={missing_value!r}"
        )


def _missing_mask(chunk: np.ndarray, missing_value: float) -> np.ndarray:
    if math.isnan(missing_value):
        return np.isnan(chunk)
    return np.isnan(chunk) | (chunk == missing_value)


def _require_present(stats: FeatureStatistics, what: str) -> None:
    empty = np.flatnonzero(np.asarray(stats.count).reshape(-1) == 0)
    if empty.size:
        raise ValueError(
            f"{what} needs at least one present value per feature, but feature(s) "
            f"{empty.tolist()[:10]} are missing everywhere. Fix: drop those features, or use "
            "tfpar.data.imputation(method='constant', fill_value=...)."
        )


def _describe(data: object) -> str:
    if isinstance(data, tf.data.Dataset):
        return f"Dataset({data.element_spec})"
    shape = getattr(data, "shape", None)
    return f"{type(data).__name__}(shape={shape})" if shape is not None else type(data).__name__


def _is_shard_list(data: object) -> bool:
    return (
        isinstance(data, (list, tuple))
        and len(data) > 0
        and all(isinstance(d, (np.ndarray, tf.data.Dataset)) or tf.is_tensor(d) for d in data)
    )


def _chunks(data: Data, axis: int | None) -> Iterator[np.ndarray]:
    """Yields float64 arrays of shape (rows, features), at most CHUNK_ROWS rows each."""
    if _is_shard_list(data):
        for shard in data:
            yield from _chunks(shard, axis)
        return
    if isinstance(data, tf.data.Dataset):
        yield from _dataset_chunks(data, axis)
        return
    if isinstance(data, dict):
        raise TypeError(
            "Expected one array of features, not a dict. Fix: pass data['x'] (the feature array). "
            f"Received: data with keys {sorted(data)}"
        )
    try:
        array = np.asarray(data, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(
            "Expected numeric data: a numpy array, a tensor, a tf.data.Dataset, or a list of "
            f"shards of those. Received: data={_describe(data)}"
        ) from error
    if array.ndim == 0 or array.size == 0:
        raise ValueError(f"Expected non-empty array data. Received: shape={array.shape}")
    rows = _as_rows(array, axis)
    for start in range(0, len(rows), CHUNK_ROWS):
        yield rows[start : start + CHUNK_ROWS]


def _as_rows(array: np.ndarray, axis: int | None) -> np.ndarray:
    if axis is None:
        return array.reshape(-1, 1)
    if array.ndim < -axis:
        raise ValueError(
            f"axis={axis} needs data with at least {-axis} dimensions. Received: shape={array.shape}"
        )
    return np.moveaxis(array, axis, -1).reshape(-1, array.shape[axis])


def _dataset_chunks(dataset: tf.data.Dataset, axis: int | None) -> Iterator[np.ndarray]:
    spec = dataset.element_spec
    if isinstance(spec, tuple):
        spec = spec[0]
        select: Callable[..., Any] = lambda *element: element[0]  # noqa: E731
    else:
        select = lambda element: element  # noqa: E731
    if not isinstance(spec, tf.TensorSpec):
        raise TypeError(
            "Expected dataset elements that are a tensor of features, or (features, ...) tuples. "
            f"Received elements of {dataset.element_spec}. Fix: dataset.map(lambda e: e['x'])."
        )
    if axis is None:
        features = 1
    else:
        if spec.shape.rank is None or spec.shape.rank < -axis or spec.shape[axis] is None:
            raise ValueError(
                f"axis={axis} needs a known feature dimension. Received element shape {spec.shape}"
            )
        features = int(spec.shape[axis])

    def to_rows(*element):
        x = tf.cast(select(*element), tf.float64)
        if axis is not None and axis != -1:
            rank = spec.shape.rank
            perm = [d for d in range(rank) if d != rank + axis] + [rank + axis]
            x = tf.transpose(x, perm)
        return tf.reshape(x, (-1, features))

    # Rows of features, re-chunked: the same for examples and for batches of any size.
    rows = dataset.map(to_rows).unbatch().batch(CHUNK_ROWS)
    empty = True
    for chunk in rows.as_numpy_iterator():
        empty = False
        yield chunk
    if empty:
        raise ValueError(f"Expected a non-empty dataset. Received: {_describe(dataset)}")


def _worker_count(strategy: tf.distribute.Strategy | None) -> int:
    if strategy is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return 1
    resolver = strategy.cluster_resolver
    spec = resolver.cluster_spec().as_dict() if resolver is not None else {}
    return sum(len(spec.get(job, [])) for job in ("chief", "worker")) or 1


def _combine_across_workers(
    strategy: tf.distribute.Strategy, moments: _Moments, values: np.ndarray | None
) -> tuple[_Moments, np.ndarray | None]:
    """All-gathers each worker's (count, missing, mean, M2) and, for medians, its values."""
    summary = np.stack([moments.count, moments.missing, moments.mean, moments.m2])[None]
    gathered = _gather_first_replica(strategy, summary, blank=0.0)  # count 0: merges as nothing
    combined: _Moments | None = None
    for row in gathered:
        part = _Moments(row[0], row[1], row[2], row[3])
        combined = part if combined is None else combined.merge(part)
    assert combined is not None, "the gather has a row for at least this worker"
    if values is None:
        return combined, None
    # Workers hold different numbers of rows: pad with NaN (= missing) to the longest first.
    lengths = _gather_first_replica(strategy, np.array([[len(values)]], np.float64), blank=0.0)
    longest = int(lengths.max())
    padded = np.full((longest, values.shape[1]), np.nan)
    padded[: len(values)] = values
    return combined, _gather_first_replica(strategy, padded, blank=np.nan)


def _gather_first_replica(
    strategy: tf.distribute.Strategy, array: np.ndarray, *, blank: float
) -> np.ndarray:
    """Concatenates `array` from every worker along axis 0.

    A worker with several replicas sends `array` from its first replica and a same-shaped array
    of `blank` (a value the caller ignores: zero counts, or NaN = missing) from the others, so
    every replica contributes the same shape.
    """
    calls: list[Any] = []

    def value_fn(context: tf.distribute.experimental.ValueContext) -> tf.Tensor:
        first = not calls
        calls.append(context.replica_id_in_sync_group)
        return tf.constant(array if first else np.full_like(array, blank))

    per_replica = strategy.experimental_distribute_values_from_function(value_fn)
    return strategy.gather(per_replica, axis=0).numpy()
