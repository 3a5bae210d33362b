"""Placement plans: which contiguous run of layers each device gets, and why.

:func:`plan` is the planning step of model parallelism. It reads the model's layer graph, weighs
every layer with the cost model (:mod:`tfpar.parallel.cost`), and splits the topological layer order
into one stage per device with the optimal partition (:mod:`tfpar.parallel.partition`). The result
is a frozen :class:`Plan`: plain data that prints as a table (``plan.summary()``), plots
(``plan.plot()``) and builds a placed model (:func:`tfpar.parallel.split`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tfpar import devices as devices_lib
from tfpar._validation import check_int
from tfpar.parallel import cost as cost_lib
from tfpar.parallel import gpipe, layer_graph, report
from tfpar.parallel import partition as partition_lib


class MemoryLimitError(ValueError):
    """No split of the model over the devices fits their memory limits (a planning result).

    The message says which stage overflows by how much. A ``ValueError``, as before; ``tfpar
    plan`` tells it from a bad argument by this class (exit 1, not 2).

    Example:
    >>> try:
    ...     tfpar.parallel.plan(model, 2, memory_limits="1MB")
    ... except tfpar.parallel.planner.MemoryLimitError as error:
    ...     print(error)
    No split of model 'alexnet' over 2 devices fits memory_limits. ...
    """


class FrozenDict(dict):
    """A ``dict`` that cannot be changed: the plan's per-layer tables (JSON-serializable).

    Example:
    >>> costs = tfpar.parallel.planner.FrozenDict({"fc1": 1.0})
    >>> costs["fc1"] = 2.0
    Traceback (most recent call last):
    TypeError: A plan is frozen: ...
    """

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(
            "A plan is frozen: its layer tables cannot be changed. Received: a write to "
            f"{type(self).__name__}. Fix: build a new plan with tfpar.parallel.plan(...)."
        )

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _refuse  # type: ignore[assignment]
    __ior__ = _refuse  # type: ignore[assignment]

    def __reduce__(self) -> Any:
        return (type(self), (dict(self),))


@dataclasses.dataclass(frozen=True)
class Stage:
    """One pipeline stage: a contiguous run of layers on one device.

    Attributes:
        index: Position in the pipeline, from 0.
        device: Canonical device name, e.g. ``"/device:GPU:1"``.
        layers: Names of the stage's layers, in topological order.
        cost: Sum of the layers' costs, in the plan's balance unit.
        load: ``cost / speed``: what the partition balances.
        speed: Relative speed of the device (``device_speeds``; 1.0 by default).
        memory: Training-step memory of the stage in bytes (cost model, see
            :func:`tfpar.parallel.cost.layer_memory`).
        memory_limit: The device's memory limit in bytes, or None.
        receives: Bytes per example the stage receives from earlier stages and the model inputs.

    Example:
    >>> stage = tfpar.parallel.plan(model, ["cpu:0", "cpu:1"]).stages[1]
    >>> stage.device, stage.layers[0]
    ('/device:CPU:1', 'block3_conv3')
    """

    index: int
    device: str
    layers: tuple[str, ...]
    cost: float
    load: float
    speed: float
    memory: int
    memory_limit: float | None
    receives: int


@dataclasses.dataclass(frozen=True)
class Plan:
    """A frozen placement plan; build it with :func:`tfpar.parallel.plan`.

    Attributes:
        model_name: Name of the planned model.
        balance: The balance mode (``"flops"``, ``"params"``, ``"memory"``, ``"time"``), or
            ``"counts"`` / ``"split_points"`` when the split was given explicitly.
        unit: Unit of ``layer_costs`` and stage costs.
        stages: The stages, in pipeline order.
        layer_costs: ``{layer name: cost}`` in topological order.
        layer_memory: ``{layer name: bytes}``.
        microbatches: Micro-batches per step the plan is evaluated for.
        batch_size: Examples per step the memory model assumes.

    Example:
    >>> plan = tfpar.parallel.plan(model, ["cpu:0", "cpu:1"], microbatches=4)
    >>> plan.bubble
    0.2
    """

    model_name: str
    balance: str
    unit: str
    stages: tuple[Stage, ...]
    layer_costs: Mapping[str, float]
    layer_memory: Mapping[str, int]
    microbatches: int
    batch_size: int

    @property
    def devices(self) -> tuple[str, ...]:
        """The stage devices, in pipeline order."""
        return tuple(stage.device for stage in self.stages)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def bottleneck(self) -> float:
        """The largest stage load: one micro-batch leaves the pipeline per bottleneck."""
        return max(stage.load for stage in self.stages)

    @property
    def imbalance(self) -> float:
        """Bottleneck over the mean stage load (1.0 is perfect balance)."""
        mean = sum(stage.load for stage in self.stages) / len(self.stages)
        return self.bottleneck / mean if mean > 0 else 1.0

    @property
    def bubble(self) -> float:
        """Predicted GPipe bubble fraction ``(p - 1) / (m + p - 1)`` of the plan's micro-batches."""
        return gpipe.bubble_fraction(self.num_stages, self.microbatches)

    def predicted_step_time(self, microbatches: int | None = None) -> float:
        """Simulated GPipe step time in the balance unit (see :func:`gpipe.simulate`)."""
        m = self.microbatches if microbatches is None else microbatches
        return gpipe.simulate([stage.load for stage in self.stages], m).makespan

    @property
    def placement(self) -> dict[str, str]:
        """``{layer name: device}``."""
        return {name: stage.device for stage in self.stages for name in stage.layers}

    def stage_of(self, layer: str) -> Stage:
        """The stage that holds `layer`; ValueError naming the closest layers if none does."""
        for stage in self.stages:
            if layer in stage.layers:
                return stage
        raise ValueError(layer_graph.unknown_layer_message(layer, tuple(self.layer_costs), self.model_name))

    def summary(self) -> str:
        """The plan as a text table: stage, device, layers, cost, share, memory, receives.

        Example:
        >>> print(tfpar.parallel.plan(model, 2).summary())
        """
        return report.format_plan(self)

    def plot(self, ax: Any = None) -> Any:
        """A matplotlib bar chart of the stage loads; returns the Figure.

        Example:
        >>> fig = tfpar.parallel.plan(model, 4).plot()
        """
        return report.plot_plan(self, ax=ax)

    def get_config(self) -> dict[str, Any]:
        """The plan as plain data (JSON-serializable); inverse of :meth:`from_config`."""
        return {
            "model_name": self.model_name,
            "balance": self.balance,
            "unit": self.unit,
            "stages": [dataclasses.asdict(stage) | {"layers": list(stage.layers)} for stage in self.stages],
            "layer_costs": dict(self.layer_costs),
            "layer_memory": dict(self.layer_memory),
            "microbatches": self.microbatches,
            "batch_size": self.batch_size,
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Plan:
        stages = tuple(
            Stage(**(dict(s) | {"layers": tuple(s["layers"])})) for s in config["stages"]
        )
        return cls(
            model_name=config["model_name"],
            balance=config["balance"],
            unit=config["unit"],
            stages=stages,
            layer_costs=FrozenDict(config["layer_costs"]),
            layer_memory=FrozenDict(config["layer_memory"]),
            microbatches=int(config["microbatches"]),
            batch_size=int(config["batch_size"]),
        )

    def __str__(self) -> str:
        return self.summary()


def plan(
    model: Any,
    devices: Sequence[Any] | int,
    balance: str | Sequence[int] = "flops",
    *,
    microbatches: int | str = 1,
    memory_limits: Any = None,
    device_speeds: Sequence[float] | None = None,
    split_points: Sequence[str] | None = None,
    batch_size: int = 32,
    optimizer_slots: int = 2,
    check_devices: bool = True,
    time_repeats: int = 5,
) -> Plan:
    """Plans an optimal pipeline split of a model's layers over devices.

    The layers are taken in a topological order of the model's graph (for a Sequential model, its
    layer order) and cut into ``len(devices)`` contiguous, non-empty stages, stage ``i`` on
    ``devices[i]``. The cut minimizes the bottleneck ``max(stage cost / device speed)`` over *all*
    contiguous splits that fit the memory limits (exact dynamic programming; ties go to the earliest
    cuts). For a Functional model a cut may carry several tensors (e.g. a ResNet skip connection).

    Planning is pure: nothing is built or placed; :func:`tfpar.parallel.split` does that.

    Args:
        model: A built Functional or Sequential ``keras.Model``.
        devices: Device names (``"gpu:0"``, ``"/device:CPU:1"``, ...), or an int ``n`` for the
            first ``n`` devices of the host's accelerator type (CPUs if there is no GPU).
        balance: What to balance: ``"flops"`` (default), ``"params"``, ``"memory"``, ``"time"``
            (see :mod:`tfpar.parallel.cost`), or a list of layer counts per stage.
        microbatches: Micro-batches per step the plan is evaluated for (bubble, predicted step
            time), or ``"auto"``: the smallest power of two >= 4 x stages (GPipe's rule), at most
            `batch_size`.
        memory_limits: Per-device memory: None, one limit for every device, or a sequence with one
            entry per device (None for unlimited). Numbers are bytes; strings like ``"16GB"`` or
            ``"512MiB"`` are accepted.
        device_speeds: Relative speed of each device (default all 1.0); a stage's load is its cost
            divided by its device's speed.
        split_points: Instead of `balance` counts, the names of the first layer of stages 2..p.
        batch_size: Examples per training step (memory and time models).
        optimizer_slots: Optimizer state per trainable weight (Adam 2, SGD+momentum 1, SGD 0).
        check_devices: Whether each device must exist on this host. False plans for hardware you
            do not have (e.g. ``tfpar plan vgg16 --devices 8`` on a laptop).
        time_repeats: Timed runs per layer with ``balance="time"``.

    Returns:
        A frozen :class:`Plan`.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If there are more devices than layers, a device does not exist, a layer name is
            unknown, the counts do not add up, or a number is NaN, infinite or out of range.
        MemoryLimitError: (a ValueError) If no split fits the memory limits (the message says
            which stage overflows by how much).

    Example:
    >>> import tfpar
    >>> model = tfpar.models.vgg16(input_shape=(32, 32, 3), num_classes=10)
    >>> plan = tfpar.parallel.plan(model, ["cpu:0", "cpu:1"], balance="flops")
    >>> [len(stage.layers) for stage in plan.stages]
    [8, 16]
    """
    _check_arguments(balance, microbatches, batch_size, optimizer_slots, split_points, time_repeats)
    graph = layer_graph.from_model(model)
    names = graph.layer_names
    device_names = _resolve_devices(devices, check_devices)
    k = len(device_names)
    if k > len(names):
        raise ValueError(
            f"Expected at most {len(names)} devices: model {model.name!r} has {len(names)} layers "
            f"and every stage needs at least one. Received: {k} devices ({list(device_names)}). "
            "Fix: pass fewer devices."
        )
    speeds = _resolve_speeds(device_speeds, k)
    limits = _resolve_limits(memory_limits, device_names)
    mode = balance if isinstance(balance, str) else "flops"
    costs = cost_lib.layer_costs(
        model, mode, batch_size=batch_size, optimizer_slots=optimizer_slots,
        device=device_names[0], repeats=time_repeats,
    )
    layers = cost_lib.layers_by_name(model)
    memory = {
        name: cost_lib.layer_memory(layers[name], batch_size=batch_size, optimizer_slots=optimizer_slots)
        for name in names
    }
    cost_list = [costs[n] for n in names]
    memory_list = [float(memory[n]) for n in names]
    sizes: tuple[int, ...] | None
    if split_points is not None:
        sizes = _sizes_from_split_points(split_points, names, k, graph.name)
        label = "split_points"
    elif not isinstance(balance, str):
        sizes = _sizes_from_counts(balance, len(names), k)
        label = "counts"
    else:
        sizes = partition_lib.optimal_sizes(
            cost_list, k, speeds=speeds, memory=memory_list,
            memory_limits=limits if any(lim is not None for lim in limits) else None,
        )
        label = balance
    if sizes is None or _overflows(sizes, memory_list, limits):
        raise MemoryLimitError(_memory_message(graph.name, names, memory_list, limits, device_names, sizes))
    m = _resolve_microbatches(microbatches, k, batch_size)
    stage_layers = _stage_layers(names, sizes)
    receives = _received_bytes(graph, stage_layers)
    loads = partition_lib.stage_loads(cost_list, sizes, speeds)
    stages = []
    for j, layers_j in enumerate(stage_layers):
        stages.append(
            Stage(
                index=j,
                device=device_names[j],
                layers=layers_j,
                cost=float(sum(costs[n] for n in layers_j)),
                load=loads[j],
                speed=speeds[j],
                memory=int(sum(memory[n] for n in layers_j)),
                memory_limit=limits[j],
                receives=receives[j],
            )
        )
    return Plan(
        model_name=graph.name,
        balance=label,
        unit=cost_lib.UNITS[mode],
        stages=tuple(stages),
        layer_costs=FrozenDict({n: costs[n] for n in names}),
        layer_memory=FrozenDict(memory),
        microbatches=m,
        batch_size=batch_size,
    )


def _check_arguments(
    balance: Any, microbatches: Any, batch_size: Any, optimizer_slots: Any, split_points: Any, time_repeats: Any
) -> None:
    if isinstance(balance, str):
        if balance not in cost_lib.BALANCE_MODES:
            raise ValueError(
                f"Expected balance to be one of {list(cost_lib.BALANCE_MODES)} or a list of layer "
                f"counts per stage. Received: balance={balance!r}"
            )
    elif not isinstance(balance, Sequence) or not all(
        isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in balance
    ):
        raise TypeError(
            f"Expected balance to be one of {list(cost_lib.BALANCE_MODES)} or a list of ints (layers "
            f"per stage). Received: balance={balance!r} (of type {type(balance).__name__})"
        )
    if split_points is not None and not isinstance(balance, str):
        raise ValueError(
            "Expected either layer counts in `balance` or `split_points`, not both. "
            f"Received: balance={balance!r}, split_points={split_points!r}"
        )
    check_int("batch_size", batch_size, minimum=1)
    check_int("optimizer_slots", optimizer_slots, minimum=0)
    check_int("time_repeats", time_repeats, minimum=1)
    gpipe.check_microbatches(microbatches)


def _resolve_devices(devices: Sequence[Any] | int, check: bool) -> tuple[str, ...]:
    if isinstance(devices, bool):
        raise TypeError(f"Expected a list of devices or a device count. Received: devices={devices!r}")
    if isinstance(devices, (int, np.integer)):
        if devices < 1:
            raise ValueError(f"Expected at least 1 device. Received: devices={devices}")
        kind = "GPU" if devices_lib.accelerator_count() and check else "CPU"
        names = [f"/device:{kind}:{i}" for i in range(int(devices))]
    elif isinstance(devices, str) or not isinstance(devices, Sequence):
        raise TypeError(
            "Expected a list of devices such as ['gpu:0', 'gpu:1'] or a device count. "
            f"Received: devices={devices!r} (of type {type(devices).__name__})"
        )
    else:
        names = list(devices)
    if check:
        return tuple(devices_lib.validate_devices(names))
    normalized = [devices_lib.normalize_device(d) for d in names]
    duplicates = sorted({n for n in normalized if normalized.count(n) > 1})
    if duplicates:
        raise ValueError(f"Each device may appear once. Received duplicates: {duplicates}")
    if not normalized:
        raise ValueError("Expected at least one device. Received: devices=[]")
    return tuple(normalized)


def _resolve_speeds(device_speeds: Sequence[float] | None, k: int) -> list[float]:
    if device_speeds is None:
        return [1.0] * k
    if isinstance(device_speeds, (str, bytes)) or not isinstance(device_speeds, Sequence):
        raise TypeError(
            f"Expected device_speeds to be a list of {k} positive numbers. "
            f"Received: device_speeds={device_speeds!r} (of type {type(device_speeds).__name__})"
        )
    if len(device_speeds) != k:
        raise ValueError(
            f"Expected one speed per device ({k}). Received: device_speeds={list(device_speeds)}"
        )
    for s in device_speeds:
        if isinstance(s, bool) or not isinstance(s, (int, float, np.integer, np.floating)):
            raise TypeError(f"Expected numbers in device_speeds. Received: {s!r} (of type {type(s).__name__})")
        if not math.isfinite(float(s)) or s <= 0:
            raise ValueError(
                "Expected every device speed to be > 0, a finite number (relative speeds such as "
                f"[1.0, 2.0]). Received: device_speeds={list(device_speeds)}"
            )
    return [float(s) for s in device_speeds]


def _resolve_limits(memory_limits: Any, device_names: Sequence[str]) -> list[float | None]:
    k = len(device_names)
    if memory_limits is None:
        return [None] * k
    if isinstance(memory_limits, (str, int, float, np.integer, np.floating)) and not isinstance(memory_limits, bool):
        return [cost_lib.parse_bytes(memory_limits)] * k
    if not isinstance(memory_limits, Sequence):
        raise TypeError(
            "Expected memory_limits to be None, one limit, or a list with one limit per device. "
            f"Received: memory_limits={memory_limits!r} (of type {type(memory_limits).__name__})"
        )
    if len(memory_limits) != k:
        raise ValueError(
            f"Expected one memory limit per device ({k}: {list(device_names)}). "
            f"Received: memory_limits={list(memory_limits)!r}"
        )
    return [None if lim is None else cost_lib.parse_bytes(lim) for lim in memory_limits]


def _resolve_microbatches(microbatches: int | str, k: int, batch_size: int) -> int:
    if microbatches == "auto":
        m = 1
        while m < 4 * k:
            m *= 2
        return max(1, min(m, batch_size))
    return int(microbatches)


def _sizes_from_counts(counts: Sequence[int], n: int, k: int) -> tuple[int, ...]:
    counts = tuple(int(c) for c in counts)
    if len(counts) != k or sum(counts) != n or min(counts) < 1:
        raise ValueError(
            f"Expected {k} layer counts (one per device), each >= 1, summing to the model's {n} "
            f"layers. Received: balance={list(counts)} ({len(counts)} counts, sum {sum(counts)})."
        )
    return counts


def _sizes_from_split_points(points: Sequence[str], names: Sequence[str], k: int, model: str) -> tuple[int, ...]:
    if isinstance(points, str) or not isinstance(points, Sequence):
        raise TypeError(
            f"Expected split_points to be a list of layer names. Received: split_points={points!r} "
            f"(of type {type(points).__name__})"
        )
    if len(points) != k - 1:
        raise ValueError(
            f"Expected {k - 1} split points for {k} devices (the first layer of stages 2..{k}). "
            f"Received: split_points={list(points)}"
        )
    index = {n: i for i, n in enumerate(names)}
    starts = [0]
    for point in points:
        if point not in index:
            raise ValueError(layer_graph.unknown_layer_message(point, names, model))
        starts.append(index[point])
    if any(b <= a for a, b in zip(starts, starts[1:])):
        raise ValueError(
            "Expected split points in topological order, each after the previous one and not the "
            f"first layer ({names[0]!r}). Received: split_points={list(points)} at positions {starts[1:]}."
        )
    bounds = [*starts, len(names)]
    return tuple(b - a for a, b in zip(bounds, bounds[1:]))


def _stage_layers(names: Sequence[str], sizes: Sequence[int]) -> list[tuple[str, ...]]:
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    return [tuple(names[bounds[j]:bounds[j + 1]]) for j in range(len(sizes))]


def _received_bytes(graph: layer_graph.LayerGraph, stage_layers: Sequence[Sequence[str]]) -> list[int]:
    received = []
    for refs in graph.cuts(stage_layers):
        total = 0
        for ref in refs:
            spec = graph.specs.get(ref)
            if spec is not None:
                itemsize = 2 if spec.dtype == "bfloat16" else np.dtype(spec.dtype).itemsize
                total += math.prod(d or 1 for d in spec.shape[1:]) * itemsize
        received.append(total)
    return received


def _overflows(sizes: Sequence[int], memory: Sequence[float], limits: Sequence[float | None]) -> bool:
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    return any(
        lim is not None and sum(memory[bounds[j]:bounds[j + 1]]) > lim for j, lim in enumerate(limits)
    )


def _memory_message(
    model: str,
    names: Sequence[str],
    memory: Sequence[float],
    limits: Sequence[float | None],
    device_names: Sequence[str],
    sizes: Sequence[int] | None,
) -> str:
    if sizes is None:
        sizes = partition_lib.least_overflow_sizes(memory, limits)
        intro = (
            f"No split of model {model!r} over {len(device_names)} devices fits memory_limits. "
            "The closest split (the one with the smallest overflow) still overflows:"
        )
    else:
        intro = f"The requested split of model {model!r} does not fit memory_limits:"
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    lines = []
    for j, lim in enumerate(limits):
        used = sum(memory[bounds[j]:bounds[j + 1]])
        if lim is not None and used > lim:
            first, last = names[bounds[j]], names[bounds[j + 1] - 1]
            lines.append(
                f"  stage {j} on {device_names[j]} (layers {first!r}..{last!r}) needs "
                f"{cost_lib.format_bytes(used)}, limit {cost_lib.format_bytes(lim)}: over by "
                f"{cost_lib.format_bytes(used - lim)}."
            )
    biggest = int(np.argmax(memory))
    return (
        f"{intro}\n" + "\n".join(lines) + "\nReceived: memory_limits="
        f"{[None if lim is None else cost_lib.format_bytes(lim) for lim in limits]}, total model "
        f"memory {cost_lib.format_bytes(sum(memory))} (largest layer {names[biggest]!r}: "
        f"{cost_lib.format_bytes(memory[biggest])}). Fix: raise the limits, add devices, lower "
        "batch_size (activations), or use an optimizer with fewer slots (optimizer_slots)."
    )
