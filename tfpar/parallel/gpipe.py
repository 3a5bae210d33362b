"""Micro-batch pipelining (GPipe): the schedule, its bubble, and batch slicing inside a step.

With ``m`` micro-batches over ``p`` stages, GPipe runs the forward passes of all micro-batches
through the stages, then the backward passes in reverse; stage ``s`` works on micro-batch ``i``
while stage ``s + 1`` works on ``i - 1``. Each stage is idle for ``p - 1`` of its ``m + p - 1``
slots, the *bubble* ``(p - 1) / (m + p - 1)`` (Huang et al., arXiv:1811.06965, section 2.3).

tfpar does not run a hand-written scheduler: a split model cuts the batch into micro-batches inside
one traced step, and TensorFlow's dataflow executor starts each (stage, micro-batch) as soon as its
inputs exist, which is exactly the GPipe order. :func:`schedule` and :func:`simulate` model that
order so plans can predict the bubble and step time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import tensorflow as tf

from tfpar._validation import check_int

AUTO = "auto"
AUTO_CANDIDATES = (1, 2, 4, 8, 16)


def check_microbatches(microbatches: Any, *, allow_none: bool = False) -> None:
    """Raises TypeError/ValueError unless `microbatches` is an int >= 1 or ``"auto"``.

    Example:
    >>> tfpar.parallel.gpipe.check_microbatches("auto")
    """
    if microbatches is None and allow_none:
        return
    if microbatches == AUTO and isinstance(microbatches, str):
        return
    check_int("microbatches", microbatches, minimum=1, expected="an int >= 1 or 'auto'")


def bubble_fraction(num_stages: int, microbatches: int) -> float:
    """GPipe's idle fraction ``(p - 1) / (m + p - 1)`` of ``p`` stages and ``m`` micro-batches.

    Example:
    >>> tfpar.parallel.bubble_fraction(4, 8)
    0.2727272727272727
    """
    check_int("num_stages", num_stages, minimum=1)
    check_int("microbatches", microbatches, minimum=1)
    return (num_stages - 1) / (microbatches + num_stages - 1)


def schedule(num_stages: int, microbatches: int) -> list[list[tuple[str, int] | None]]:
    """The GPipe timetable with unit-time slots: ``table[stage][slot]`` is ``(phase, mb)`` or None.

    Forward slots ``("F", i)`` come first, then backward slots ``("B", i)`` in reverse order;
    stage ``s`` runs forward micro-batch ``i`` at slot ``s + i`` and backward micro-batch ``i`` at
    slot ``(m + p - 1) + (p - 1 - s) + (m - 1 - i)``.

    Example:
    >>> tfpar.parallel.gpipe.schedule(2, 2)[0]
    [('F', 0), ('F', 1), None, None, ('B', 1), ('B', 0)]
    """
    bubble_fraction(num_stages, microbatches)  # validates
    p, m = num_stages, microbatches
    forward_slots = m + p - 1
    table: list[list[tuple[str, int] | None]] = [[None] * (2 * forward_slots) for _ in range(p)]
    for s in range(p):
        for i in range(m):
            table[s][s + i] = ("F", i)
            table[s][forward_slots + (p - 1 - s) + (m - 1 - i)] = ("B", i)
    return table


@dataclasses.dataclass(frozen=True)
class Simulation:
    """Result of :func:`simulate`: step makespan and the idle fraction of the stage-time.

    Example:
    >>> tfpar.parallel.gpipe.simulate([1.0], 1)
    Simulation(makespan=3.0, bubble=0.0)
    """

    makespan: float
    bubble: float


def simulate(stage_times: Sequence[float], microbatches: int, *, backward_ratio: float = 2.0) -> Simulation:
    """Simulates one GPipe step of stages with given full-batch forward times.

    Each stage spends ``t / m`` per micro-batch forward and ``backward_ratio * t / m`` backward; a
    (stage, micro-batch) starts when its input and its stage are free, as in TensorFlow's executor.

    Args:
        stage_times: Forward time (any unit) of each stage for the whole batch.
        microbatches: Micro-batches ``m``.
        backward_ratio: Backward time over forward time.

    Returns:
        The makespan (same unit) and ``1 - busy / (p * makespan)``; with equal stage times the
        latter is exactly :func:`bubble_fraction`.

    Example:
    >>> round(tfpar.parallel.gpipe.simulate([1.0, 1.0], 4).bubble, 6)
    0.2
    """
    p, m = len(stage_times), microbatches
    bubble_fraction(max(p, 1), m)
    fwd = [t / m for t in stage_times]
    bwd = [backward_ratio * t / m for t in stage_times]
    free = [0.0] * p
    done = [[0.0] * m for _ in range(p)]
    for i in range(m):
        for s in range(p):
            start = max(free[s], done[s - 1][i] if s else 0.0)
            done[s][i] = free[s] = start + fwd[s]
    back = [[0.0] * m for _ in range(p)]
    for i in reversed(range(m)):
        for s in reversed(range(p)):
            ready = back[s + 1][i] if s + 1 < p else done[p - 1][m - 1]
            start = max(free[s], ready)
            back[s][i] = free[s] = start + bwd[s]
    makespan = max(free)
    busy = sum(stage_times) * (1 + backward_ratio)
    return Simulation(makespan, 1 - busy / (p * makespan) if makespan > 0 else 0.0)


def microbatch_bounds(batch: tf.Tensor, microbatches: int) -> list[tf.Tensor]:
    """Start offsets ``floor(i * B / m)`` for ``i = 0..m`` of a dynamic batch size ``B``.

    Example:
    >>> [int(b) for b in tfpar.parallel.gpipe.microbatch_bounds(tf.constant(7), 3)]
    [0, 2, 4, 7]
    """
    return [(batch * i) // microbatches for i in range(microbatches + 1)]


def split_batch(tensor: tf.Tensor, bounds: Sequence[tf.Tensor]) -> list[tf.Tensor]:
    """Cuts a batch-major tensor into the micro-batches given by `bounds` (sizes differ by <= 1).

    Example:
    >>> x = tf.zeros((7, 2))
    >>> [p.shape[0] for p in tfpar.parallel.gpipe.split_batch(x, [0, 2, 4, 7])]
    [2, 2, 3]
    """
    return [tensor[bounds[i]:bounds[i + 1]] for i in range(len(bounds) - 1)]


@contextlib.contextmanager
def placed_step() -> Iterator[None]:
    """Places the ops of a traced training step that TensorFlow would leave to the default device.

    Gradient sums, the loss and the optimizer's update arithmetic are created without a device,
    so TensorFlow runs them all on the default device, pulling every stage's tensors there. Inside
    this context (while tracing a ``tf.function``), such an op goes where its largest placed input
    is: each variable's update with its gradient on the variable's stage, the loss after the last
    stage. Ops that already have a device, and ops on variables (colocated by TensorFlow), are left
    alone; eagerly it does nothing. ``SplitModel.train_step`` uses it; wrap a custom training step
    in it too.

    Example:
    >>> @tf.function
    ... def train_step(x, y):
    ...     with tfpar.parallel.gpipe.placed_step():
    ...         with tf.GradientTape() as tape:
    ...             loss = loss_fn(y, placed(x, training=True))
    ...         optimizer.apply(tape.gradient(loss, placed.trainable_variables), placed.trainable_variables)
    """
    if tf.executing_eagerly():
        yield
        return
    with tf.compat.v1.device(_follow_inputs):
        yield


def _follow_inputs(op: Any) -> str:
    """Device function: an unplaced op goes where its largest placed input is."""
    if op.device:
        return op.device
    if op.type == "IdentityN" or any(t.dtype == tf.resource for t in op.inputs):
        # IdentityN wraps every gradient at once (Keras's all-reduce); resource ops are colocated
        # with their variable by TensorFlow. Neither should pull tensors to one device.
        return ""
    best, size = "", -1
    for tensor in op.inputs:
        device = _device_of(tensor)
        elements = tensor.shape.num_elements()
        elements = 1 << 62 if elements is None else elements
        if device and elements > size:
            best, size = device, elements
    return best


def _device_of(tensor: Any, depth: int = 0) -> str:
    """The device of a tensor, looking through identity ops that were left unplaced."""
    if tensor.device or depth > 8:
        return _local(tensor.device)
    op = tensor.op
    if op.type == "Identity":
        return _device_of(op.inputs[0], depth + 1)
    if op.type == "IdentityN":
        return _device_of(op.inputs[tensor.value_index], depth + 1)
    if op.type == "ReadVariableOp":
        return _resource_device(op.inputs[0])
    return ""


def _local(device: str) -> str:
    """``/job:localhost/replica:0/task:0/device:CPU:1`` -> ``/device:CPU:1`` (one spelling)."""
    prefix = "/job:localhost/replica:0/task:0"
    return device[len(prefix):] if device.startswith(prefix + "/device:") else device


def _resource_device(handle: Any) -> str:
    """Device of the variable behind a resource handle captured into a traced function."""
    for _ in range(8):  # a handle may be captured through nested function graphs
        if handle.device:
            return _local(handle.device)
        outer = next((ext for ext, inner in getattr(handle.graph, "captures", ()) if inner is handle), None)
        if outer is None:
            return ""
        handle = outer
    return ""



def tune_microbatches(
    step_for: Callable[[int], Callable[[], Any]],
    batch_size: int,
    *,
    candidates: Sequence[int] = AUTO_CANDIDATES,
    repeats: int = 3,
) -> dict[int, float]:
    """Measures a training step per micro-batch count, interleaved; returns median seconds.

    Args:
        step_for: ``step_for(m)`` returns a no-argument callable running one forward + backward
            pass of the model with ``m`` micro-batches (already bound to its input batch).
        batch_size: Examples per step; candidates above it are skipped.
        candidates: Micro-batch counts to try.
        repeats: Timed rounds; each round runs every candidate once, so drift in machine load
            affects them alike.

    Returns:
        ``{m: median seconds per step}``.
    """
    steps = {m: step_for(m) for m in candidates if m <= batch_size}
    for step in steps.values():  # trace and warm up
        _block(step())
        _block(step())
    samples: dict[int, list[float]] = {m: [] for m in steps}
    for _ in range(repeats):
        for m, step in steps.items():
            start = time.perf_counter()
            _block(step())
            samples[m].append(time.perf_counter() - start)
    return {m: statistics.median(values) for m, values in samples.items()}


def _block(result: Any) -> None:
    for t in tf.nest.flatten(result):
        if t is not None:
            t.numpy()
