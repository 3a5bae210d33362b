"""Training helpers for data parallelism: global batch size, learning-rate scaling, warmup, throughput.

With synchronous data parallelism over R replicas, each step consumes R per-replica batches, so the
effective (global) batch is R times larger. Goyal et al. 2017 ("Accurate, Large Minibatch SGD")
keep accuracy by scaling the learning rate linearly with the batch size and warming it up over the
first epochs; for adaptive optimizers a square-root rule is common.
"""

from __future__ import annotations

import math
import time
from typing import Any

import keras
import tensorflow as tf

from tfpar._validation import check_int, check_positive_number
from tfpar.profiling import StepProfiler  # noqa: F401  (public here: tfpar.training.StepProfiler)

LR_SCALING_RULES = ("linear", "sqrt")


def _replicas(strategy: tf.distribute.Strategy | None) -> int:
    strategy = strategy if strategy is not None else tf.distribute.get_strategy()
    return int(strategy.num_replicas_in_sync)


def global_batch_size(per_replica_batch_size: int, strategy: tf.distribute.Strategy | None = None) -> int:
    """Returns the global batch size for a per-replica batch size.

    Args:
        per_replica_batch_size: Examples each replica processes per step.
        strategy: The strategy (default: the current one, e.g. inside ``tfpar.scope``).

    Returns:
        ``per_replica_batch_size * strategy.num_replicas_in_sync``.

    Example:
    >>> with tfpar.scope("mirrored", devices=["cpu:0", "cpu:1"]):
    ...     tfpar.training.global_batch_size(32)
    64
    """
    return check_int("per_replica_batch_size", per_replica_batch_size, minimum=1) * _replicas(strategy)


def per_replica_batch_size(global_batch_size: int, strategy: tf.distribute.Strategy | None = None) -> int:
    """Returns the per-replica batch size for a global batch size.

    Args:
        global_batch_size: Examples per step over all replicas.
        strategy: The strategy (default: the current one).

    Returns:
        ``global_batch_size // strategy.num_replicas_in_sync``.

    Raises:
        ValueError: If the global batch size does not divide evenly over the replicas (the message
            names the nearest sizes that do).

    Example:
    >>> with tfpar.scope("mirrored", devices=["cpu:0", "cpu:1"]):
    ...     tfpar.training.per_replica_batch_size(64)
    32
    """
    size = check_int("global_batch_size", global_batch_size, minimum=1)
    replicas = _replicas(strategy)
    if size % replicas:
        lower = max(replicas, size - size % replicas)
        upper = size - size % replicas + replicas
        raise ValueError(
            f"Expected global_batch_size to be a multiple of the {replicas} replicas. "
            f"Received: global_batch_size={size}. Use {lower} or {upper}."
        )
    return size // replicas


def compute_average_loss(per_example_loss: Any, sample_weight: Any = None) -> tf.Tensor:
    """The exact mean loss of a step, for custom training loops, also on a partial last batch.

    Use it in the replica function of ``strategy.run`` where TensorFlow's tutorials call
    ``tf.nn.compute_average_loss(per_example_loss, global_batch_size=GLOBAL_BATCH_SIZE)``. That
    divides by the *full* global batch, so a final batch of 3 examples gets a loss (and gradients)
    3/32 as large as it should; without ``global_batch_size`` it assumes every replica holds as
    many examples as this one. This helper divides the sum of this replica's (weighted) losses by
    the number of examples the step actually has on all replicas (one scalar all-reduce), so the
    summed gradients are exactly those of the mean loss over the global batch, as on one device.

    Args:
        per_example_loss: This replica's per-example losses, shape ``(local_batch, ...)`` (a Keras
            loss with ``reduction=None``); further dimensions are summed per example.
        sample_weight: Optional weights, broadcastable to `per_example_loss`. As in
            ``tf.nn.compute_average_loss``, the weighted sum is divided by the number of examples,
            not by the sum of the weights.

    Returns:
        A scalar: ``sum(weighted losses of this replica) / examples in the step on all replicas``
        (0 for a step without examples). Summed over replicas, it is the global mean loss.

    Example:
    >>> loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    >>> def train_step(images, labels):       # called through strategy.run
    ...     with tf.GradientTape() as tape:
    ...         loss = tfpar.training.compute_average_loss(loss_fn(labels, model(images, training=True)))
    ...     grads = tape.gradient(loss, model.trainable_variables)
    ...     optimizer.apply_gradients(zip(grads, model.trainable_variables))
    ...     return loss
    """
    losses = tf.convert_to_tensor(per_example_loss)
    if losses.shape.rank == 0:
        raise ValueError(
            "Expected per-example losses of shape (batch, ...), as a Keras loss returns with "
            "reduction=None. Received: a scalar per_example_loss (already reduced)."
        )
    if sample_weight is not None:
        losses = losses * tf.cast(sample_weight, losses.dtype)
    local_count = tf.cast(tf.shape(losses)[0], losses.dtype)
    context = tf.distribute.get_replica_context()
    if context is None:
        raise RuntimeError(
            "tfpar.training.compute_average_loss is called in cross-replica context; expected a "
            "replica context: call it inside the function given to strategy.run."
        )
    global_count = context.all_reduce(tf.distribute.ReduceOp.SUM, local_count)
    return tf.math.divide_no_nan(tf.reduce_sum(losses), global_count)


def scale_learning_rate(
    base_learning_rate: float,
    *,
    factor: float | None = None,
    rule: str = "linear",
    strategy: tf.distribute.Strategy | None = None,
) -> float:
    """Scales a single-device learning rate for a larger global batch.

    Args:
        base_learning_rate: The learning rate tuned for one replica's batch.
        factor: Global batch / base batch. Default: the number of replicas of `strategy`.
        rule: ``"linear"`` (Goyal et al. 2017, for SGD) or ``"sqrt"`` (often used with Adam).
        strategy: The strategy (default: the current one) when `factor` is not given.

    Returns:
        ``base * factor`` (linear) or ``base * sqrt(factor)`` (sqrt).

    Raises:
        TypeError: If the learning rate or factor is not a number.
        ValueError: For an unknown rule, or a learning rate or factor that is not a finite
            number > 0 (NaN and infinity included).

    Example:
    >>> tfpar.training.scale_learning_rate(0.1, factor=4)
    0.4
    >>> tfpar.training.scale_learning_rate(1e-3, factor=4, rule="sqrt")
    0.002
    """
    if rule not in LR_SCALING_RULES:
        raise ValueError(f"Expected rule to be one of {list(LR_SCALING_RULES)}. Received: rule={rule!r}")
    base = check_positive_number("base_learning_rate", base_learning_rate)
    factor = check_positive_number("factor", _replicas(strategy) if factor is None else factor)
    return base * (factor if rule == "linear" else math.sqrt(factor))


_RATES_UNSET = (
    "LearningRateWarmup.learning_rate_at needs {}: pass it to the constructor or call this after "
    "training has begun."
)


class LearningRateWarmup(keras.callbacks.Callback):
    """Linearly warms the learning rate up to its target over the first steps (Goyal et al. 2017).

    The rate at step ``t`` (counted by ``optimizer.iterations``, so a resumed run continues where
    it stopped) is ``initial + (target - initial) * t / warmup_steps``; after warmup it is
    ``target``. The optimizer's learning rate must be a number, not a schedule.

    Args:
        warmup_steps: Number of optimizer steps to reach the target (e.g. 5 epochs' worth).
        target_learning_rate: The rate after warmup, a finite number >= 0. Default: the
            optimizer's rate at train start.
        initial_learning_rate: The rate at step 0, a finite number >= 0. Default: ``target / 10``.

    Raises:
        TypeError: If `warmup_steps` is not an int or a rate is not a number.
        ValueError: If `warmup_steps` < 1 or a rate is negative, NaN or infinite.

    Example:
    >>> lr = tfpar.training.scale_learning_rate(0.1)   # 0.1 x replicas
    >>> model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
    >>> model.fit(x, y, callbacks=[tfpar.training.LearningRateWarmup(warmup_steps=500)])
    """

    def __init__(
        self,
        warmup_steps: int,
        target_learning_rate: float | None = None,
        initial_learning_rate: float | None = None,
    ) -> None:
        super().__init__()
        self.warmup_steps = check_int("warmup_steps", warmup_steps, minimum=1)
        self.target_learning_rate = (
            None if target_learning_rate is None
            else check_positive_number("target_learning_rate", target_learning_rate, allow_zero=True)
        )
        self.initial_learning_rate = (
            None if initial_learning_rate is None
            else check_positive_number("initial_learning_rate", initial_learning_rate, allow_zero=True)
        )

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        optimizer = self.model.optimizer
        if isinstance(getattr(optimizer, "_learning_rate", None), keras.optimizers.schedules.LearningRateSchedule):
            raise ValueError(
                "LearningRateWarmup needs an optimizer with a constant learning rate; this one uses "
                f"a schedule ({type(optimizer._learning_rate).__name__}). Put the warmup into the "
                "schedule instead (e.g. keras.optimizers.schedules.CosineDecay(warmup_steps=...))."
            )
        if self.target_learning_rate is None:
            self.target_learning_rate = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
        if self.initial_learning_rate is None:
            self.initial_learning_rate = self.target_learning_rate / 10.0

    def learning_rate_at(self, step: int) -> float:
        """The warmup learning rate at optimizer step `step`."""
        # Both rates are set by the constructor or else by on_train_begin.
        target = self.target_learning_rate
        if target is None:
            raise TypeError(_RATES_UNSET.format("target_learning_rate"))
        if step >= self.warmup_steps:
            return float(target)
        initial = self.initial_learning_rate
        if initial is None:
            raise TypeError(_RATES_UNSET.format("initial_learning_rate"))
        fraction = step / self.warmup_steps
        return float(initial + (target - initial) * fraction)

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        if step <= self.warmup_steps:
            self.model.optimizer.learning_rate = self.learning_rate_at(step)


class Throughput(keras.callbacks.Callback):
    """Adds ``samples_per_second`` (training examples per wall-clock second) to each epoch's logs.

    Every timed step counts as a full global batch, so a final partial batch is counted as full.

    Args:
        global_batch_size: Examples per step over all replicas.
        skip_first_steps: Steps of the first epoch not timed (tracing and warm-up).

    Example:
    >>> throughput = tfpar.training.Throughput(global_batch_size=64)
    >>> history = model.fit(x, y, batch_size=64, callbacks=[throughput])
    >>> history.history["samples_per_second"]
    """

    def __init__(self, global_batch_size: int, skip_first_steps: int = 1) -> None:
        super().__init__()
        self.global_batch_size = check_int("global_batch_size", global_batch_size, minimum=1)
        self.skip_first_steps = check_int("skip_first_steps", skip_first_steps, minimum=0)
        self._epoch = 0
        self._skip = 0
        self._start: float | None = None
        self._first_step = self._last_step = -1
        self._last_time = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._skip = self.skip_first_steps if self._epoch == 0 else 0
        # Keras reports the index of the last step of each execution (steps_per_execution >= 1).
        self._first_step, self._last_step = -1, -1
        self._start = time.perf_counter() if self._skip == 0 else None

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        now = time.perf_counter()
        self._last_step, self._last_time = batch, now
        if self._start is None and batch + 1 >= self._skip:
            self._first_step, self._start = batch, now

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        # Timed up to the last training step: validation (which runs before on_epoch_end) and
        # callbacks after it do not count.
        self._epoch += 1
        steps = self._last_step - self._first_step
        if logs is not None and self._start is not None and steps > 0:
            elapsed = self._last_time - self._start
            logs["samples_per_second"] = steps * self.global_batch_size / elapsed
