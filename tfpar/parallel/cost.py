"""Per-layer cost model: FLOPs, parameters, memory, or measured time.

Four ways to weigh a layer, one per ``balance`` mode of :func:`tfpar.parallel.plan`:

* ``"flops"``: forward floating-point operations per example, from the layer's shapes (a
  multiply-add counts 2). Convolutions, dense, pooling, normalization, element-wise and merge layers
  have exact formulas; any other layer counts ``2 * params * positions + output elements``.
  Backward costs about twice the forward for every layer, so the ratio is what matters.
* ``"params"``: ``layer.count_params()``, DeepSpeed's default.
* ``"memory"``: bytes the layer holds during a training step: weights, their gradients and
  ``optimizer_slots`` optimizer slots per trainable weight, plus its output activations for
  ``batch_size`` examples. Activations are counted for the whole batch, not one micro-batch: a
  GPipe step keeps every micro-batch's activations until its backward pass (tfpar does not
  rematerialize), so splitting the batch does not shrink them.
* ``"time"``: measured seconds of one forward + backward pass of the layer alone on a device, on
  random inputs of ``batch_size`` examples (the fastest of ``repeats`` runs, all layers timed round
  by round, minus the measured overhead of an empty ``tf.function`` call). It needs the device and
  takes seconds per model.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tfpar.parallel import layer_graph

BALANCE_MODES = ("flops", "params", "memory", "time")

UNITS = {"flops": "FLOPs/example", "params": "parameters", "memory": "bytes", "time": "seconds"}

_ACTIVATION_FLOPS = {"linear": 0, "relu": 1, "relu6": 1, "softmax": 5, "log_softmax": 5}
_REPEATS_DEFAULT = 5


def layer_flops(layer: Any) -> float:
    """Forward FLOPs per example of a built layer (a multiply-add counts 2).

    Args:
        layer: A built ``keras.layers.Layer`` with one call in its model (or a nested model).

    Returns:
        The FLOPs of one example's forward pass.

    Example:
    >>> model = tfpar.models.vgg16()
    >>> tfpar.parallel.cost.layer_flops(model.get_layer("fc2"))
    33562624.0
    """
    if isinstance(layer, keras.Model):
        return float(sum(layer_flops(inner) for inner in layer.layers))
    if isinstance(layer, keras.layers.InputLayer):
        return 0.0
    ins = [t.shape for t in keras.tree.flatten(layer.input)]
    outs = [t.shape for t in keras.tree.flatten(layer.output)]
    in_elems = sum(_numel(s) for s in ins)
    out_elems = sum(_numel(s) for s in outs)
    flops = _shape_flops(layer, ins, outs, in_elems, out_elems)
    return float(flops + out_elems * _activation_flops(layer))


def _shape_flops(layer: Any, ins: list, outs: list, in_elems: int, out_elems: int) -> float:
    layers = keras.layers
    kernel_size = _kernel_elems(layer)
    bias = out_elems if getattr(layer, "use_bias", False) else 0
    if isinstance(layer, (layers.Conv1DTranspose, layers.Conv2DTranspose, layers.Conv3DTranspose)):
        return 2.0 * (in_elems / max(ins[0][-1] or 1, 1)) * kernel_size + bias
    if isinstance(layer, (layers.Conv1D, layers.Conv2D, layers.Conv3D)):
        return 2.0 * (out_elems / max(outs[0][-1] or 1, 1)) * kernel_size + bias
    if isinstance(layer, (layers.DepthwiseConv1D, layers.DepthwiseConv2D)):
        return 2.0 * (out_elems / max(outs[0][-1] or 1, 1)) * kernel_size + bias
    if isinstance(layer, (layers.SeparableConv1D, layers.SeparableConv2D)):
        weights = _numel((None, *layer.depthwise_kernel.shape)) + _numel((None, *layer.pointwise_kernel.shape))
        return 2.0 * (out_elems / max(outs[0][-1] or 1, 1)) * weights + bias
    if isinstance(layer, layers.Dense):
        return 2.0 * (out_elems / max(layer.units, 1)) * kernel_size + bias
    if isinstance(
        layer,
        (
            layers.MaxPooling1D, layers.MaxPooling2D, layers.MaxPooling3D,
            layers.AveragePooling1D, layers.AveragePooling2D, layers.AveragePooling3D,
        ),
    ):
        return float(out_elems * math.prod(layer.pool_size))
    if isinstance(
        layer,
        (
            layers.GlobalAveragePooling1D, layers.GlobalAveragePooling2D,
            layers.GlobalAveragePooling3D, layers.GlobalMaxPooling1D,
            layers.GlobalMaxPooling2D, layers.GlobalMaxPooling3D,
        ),
    ):
        return float(in_elems)
    if isinstance(layer, layers.BatchNormalization):
        return 4.0 * out_elems
    if isinstance(layer, (layers.LayerNormalization, layers.GroupNormalization, layers.RMSNormalization)):
        return 5.0 * out_elems
    if isinstance(
        layer,
        (layers.Add, layers.Subtract, layers.Multiply, layers.Average, layers.Maximum, layers.Minimum),
    ):
        return float((len(ins) - 1) * out_elems)
    if isinstance(layer, (layers.Dropout, layers.ReLU, layers.LeakyReLU, layers.ELU, layers.PReLU)):
        return float(out_elems)
    if isinstance(layer, layers.Softmax):
        return 5.0 * out_elems
    if isinstance(
        layer,
        (
            layers.Concatenate, layers.Flatten, layers.Reshape, layers.Permute, layers.Identity,
            layers.ZeroPadding1D, layers.ZeroPadding2D, layers.ZeroPadding3D, layers.Cropping1D,
            layers.Cropping2D, layers.Cropping3D, layers.RepeatVector, layers.Activation,
        ),
    ):
        return 0.0
    # Fallback: each weight is used once per output position, plus one op per output element.
    positions = out_elems / max(outs[0][-1] or 1, 1) if outs and outs[0] else 1
    return 2.0 * layer_params(layer) * positions + out_elems


def _activation_flops(layer: Any) -> float:
    activation = getattr(layer, "activation", None)
    if activation is None:
        return 0.0
    name = getattr(activation, "__name__", str(activation))
    return float(_ACTIVATION_FLOPS.get(name, 4))


def _kernel_elems(layer: Any) -> int:
    kernel = getattr(layer, "kernel", None)
    return math.prod(kernel.shape) if kernel is not None else 0


def _numel(shape: Sequence[int | None]) -> int:
    """Elements per example: all dimensions but the batch; unknown dimensions count as 1."""
    return math.prod(int(d) if d is not None else 1 for d in tuple(shape)[1:])


def layer_params(layer: Any) -> int:
    """``layer.count_params()`` (0 for operations without weights).

    Example:
    >>> model = tfpar.models.vgg16()
    >>> tfpar.parallel.cost.layer_params(model.get_layer("fc2"))
    16781312
    """
    count = getattr(layer, "count_params", None)
    return int(count()) if callable(count) else 0


def layer_memory(layer: Any, *, batch_size: int = 32, optimizer_slots: int = 2) -> int:
    """Training-step memory of a layer in bytes (see the module docstring).

    Args:
        layer: A built layer.
        batch_size: Examples per step (the whole batch, whatever the micro-batch count).
        optimizer_slots: Optimizer state per trainable weight (Adam 2, SGD with momentum 1, SGD 0).

    Example:
    >>> model = tfpar.models.vgg16()
    >>> tfpar.parallel.cost.layer_memory(model.get_layer("fc2"), batch_size=32)
    269025280
    """
    weights = 0
    for w in getattr(layer, "weights", []):
        size = math.prod(w.shape) * np.dtype(w.dtype).itemsize
        weights += size * (2 + optimizer_slots) if w.trainable else size
    if isinstance(layer, keras.layers.InputLayer):
        return int(weights)
    compute = getattr(layer, "compute_dtype", None) or "float32"
    itemsize = np.dtype(compute).itemsize if compute != "bfloat16" else 2
    outs = [t for t in keras.tree.flatten(layer.output)]
    activations = sum(_numel(t.shape) for t in outs) * itemsize * batch_size
    return int(weights + activations)


def layer_costs(
    model: Any,
    balance: str = "flops",
    *,
    batch_size: int = 32,
    optimizer_slots: int = 2,
    device: str | None = None,
    repeats: int = _REPEATS_DEFAULT,
) -> dict[str, float]:
    """The cost of every layer of a model, in topological order, in one balance unit.

    Args:
        model: A built Functional or Sequential model.
        balance: One of ``"flops"``, ``"params"``, ``"memory"``, ``"time"``.
        batch_size: Batch size for ``"memory"`` and ``"time"``.
        optimizer_slots: Optimizer slots per trainable weight for ``"memory"``.
        device: Device ``"time"`` measures on (default: the first logical device).
        repeats: Timed repetitions per layer for ``"time"``.

    Returns:
        ``{layer name: cost}``; with ``"params"`` each value is ``layer.count_params()``.

    Raises:
        ValueError: If `balance` is unknown.

    Example:
    >>> costs = tfpar.parallel.cost.layer_costs(model, "params")
    >>> costs["fc1"] == model.get_layer("fc1").count_params()
    True
    """
    if balance not in BALANCE_MODES:
        raise ValueError(
            f"Expected balance to be one of {list(BALANCE_MODES)} or a list of layer counts. "
            f"Received: balance={balance!r}"
        )
    graph = layer_graph.from_model(model)
    if balance == "time":
        return measure_layer_times(model, graph, device=device, batch_size=batch_size, repeats=repeats)
    layers = layers_by_name(model)
    if balance == "flops":
        return {name: layer_flops(layers[name]) for name in graph.layer_names}
    if balance == "params":
        return {name: float(layer_params(layers[name])) for name in graph.layer_names}
    return {
        name: float(layer_memory(layers[name], batch_size=batch_size, optimizer_slots=optimizer_slots))
        for name in graph.layer_names
    }


def layers_by_name(model: Any) -> dict[str, Any]:
    """Every layer (and Keras operation) of a model, by name.

    Example:
    >>> tfpar.parallel.cost.layers_by_name(model)["fc1"] is model.get_layer("fc1")
    True
    """
    found = {op.name: op for op in getattr(model, "operations", [])}
    found.update({layer.name: layer for layer in model.layers})
    return found


def measure_layer_times(
    model: Any,
    graph: layer_graph.LayerGraph | None = None,
    *,
    device: str | None = None,
    batch_size: int = 32,
    repeats: int = _REPEATS_DEFAULT,
) -> dict[str, float]:
    """Seconds of one forward + backward pass of each layer, measured alone on `device`.

    Each layer is rebuilt from its config on the device (fresh weights: the model is not touched)
    and run in training mode inside a ``tf.function`` on random inputs of `batch_size` examples.
    The fastest of `repeats` runs (the layers interleaved round by round, so a busy period on a
    shared machine hits them alike), minus the cost of calling an empty ``tf.function``, is
    reported (never below zero).

    Example:
    >>> times = tfpar.parallel.cost.measure_layer_times(model, device="cpu:0", batch_size=8)
    """
    graph = graph or layer_graph.from_model(model)
    device = device or "/device:CPU:0"
    rng = np.random.default_rng(0)
    steps = [_layer_step(node, graph, device, batch_size, rng) for node in graph.nodes]
    seconds = _best_seconds([_empty_step(device), *steps], repeats)
    return {node.name: max(t - seconds[0], 0.0) for node, t in zip(graph.nodes, seconds[1:])}


def measure_stage_times(
    model: Any,
    stages: Sequence[Sequence[str]],
    *,
    device: str = "/device:CPU:0",
    batch_size: int = 32,
    repeats: int = _REPEATS_DEFAULT,
) -> list[float]:
    """Seconds of one forward + backward pass of each stage, measured alone on one device.

    Each stage's layers are rebuilt from their configs on `device` (fresh weights) and run
    together, in topological order, on random values of the tensors the stage receives; this is
    the ground truth a plan's predicted stage costs are compared against.

    Args:
        model: The built model the stages come from.
        stages: Layer names of each stage, e.g. ``[s.layers for s in plan.stages]``.
        device: Where to measure; one device for all stages, so they compare fairly.
        batch_size: Examples per pass.
        repeats: Timed runs per stage (the fastest is kept; the empty-call overhead is subtracted).

    Example:
    >>> plan = tfpar.parallel.plan(model, 4, check_devices=False)
    >>> tfpar.parallel.cost.measure_stage_times(model, [s.layers for s in plan.stages], batch_size=8)
    """
    return measure_partitions(model, [stages], device=device, batch_size=batch_size, repeats=repeats)[0]


def measure_partitions(
    model: Any,
    partitions: Sequence[Sequence[Sequence[str]]],
    *,
    device: str = "/device:CPU:0",
    batch_size: int = 32,
    repeats: int = _REPEATS_DEFAULT,
) -> list[list[float]]:
    """:func:`measure_stage_times` for several partitions at once, all stages timed round by round.

    Timing every stage of every partition in the same rounds lets machine-load drift hit all of
    them alike, so the partitions compare fairly on a shared machine.

    Example:
    >>> tfpar.parallel.cost.measure_partitions(model, [[s.layers for s in p.stages] for p in plans])
    """
    graph = layer_graph.from_model(model)
    rng = np.random.default_rng(0)
    steps, sizes = [], []
    for stages in partitions:
        for names, received, sent in zip(stages, graph.cuts(stages), graph.sends(stages)):
            nodes = [graph.node(n) for n in names]
            steps.append(_nodes_step(nodes, received, sent, graph, device, batch_size, rng))
        sizes.append(len(stages))
    seconds = _best_seconds([_empty_step(device), *steps], repeats)
    times = [max(t - seconds[0], 0.0) for t in seconds[1:]]
    out, start = [], 0
    for size in sizes:
        out.append(times[start:start + size])
        start += size
    return out


def _nodes_step(
    nodes: Sequence[layer_graph.Node],
    received: Sequence[layer_graph.TensorRef],
    sent: Sequence[layer_graph.TensorRef] | None,
    graph: layer_graph.LayerGraph,
    device: str,
    batch_size: int,
    rng: np.random.Generator,
) -> Any:
    with tf.device(device):
        layers = [keras.saving.deserialize_keras_object(dict(node.layer_config)) for node in nodes]
        inputs = {ref: random_input(graph.specs[ref], batch_size, rng) for ref in received}
    floats = [t for t in inputs.values() if t.dtype.is_floating]

    @tf.function
    def step() -> Any:
        with tf.device(device):
            with tf.GradientTape() as tape:
                tape.watch(floats)
                values = dict(inputs)
                for node, layer in zip(nodes, layers):
                    kwargs = dict(layer_graph.fill(node.kwargs, values.__getitem__))
                    kwargs.setdefault("training", True)
                    outputs = layer(*layer_graph.fill(node.args, values.__getitem__), **kwargs)
                    for t, tensor in enumerate(keras.tree.flatten(outputs)):
                        values[layer_graph.TensorRef(node.name, 0, t)] = tensor
                targets = [values[r] for r in sent] if sent is not None else [
                    v for r, v in values.items() if r not in inputs
                ]
                total = tf.add_n([tf.constant(0.0)] + [
                    tf.reduce_sum(tf.cast(v, tf.float32)) for v in targets if tf.as_dtype(v.dtype).is_floating
                ])
            variables = [v for layer in layers for v in layer.trainable_variables]
            return tape.gradient(total, floats + variables)

    return step


def random_input(spec: layer_graph.TensorSpec, batch_size: int, rng: np.random.Generator) -> tf.Tensor:
    """A random tensor for a graph tensor spec, with `batch_size` as the batch dimension.

    Floating tensors are standard normal, booleans random, integers zero (valid indices).

    Example:
    >>> spec = tfpar.parallel.layer_graph.TensorSpec((None, 3), "float32")
    >>> tfpar.parallel.cost.random_input(spec, 2, np.random.default_rng(0)).shape
    TensorShape([2, 3])
    """
    shape = [batch_size] + [1 if d is None else d for d in spec.shape[1:]]
    dtype = tf.as_dtype(spec.dtype)
    if dtype.is_floating:
        return tf.constant(rng.standard_normal(shape), dtype=dtype)
    if dtype.is_bool:
        return tf.constant(rng.integers(0, 2, shape).astype(bool))
    return tf.zeros(shape, dtype=dtype)


def _layer_step(
    node: layer_graph.Node, graph: layer_graph.LayerGraph, device: str, batch_size: int, rng: np.random.Generator
) -> Any:
    return _nodes_step([node], node.inputs, None, graph, device, batch_size, rng)


def _empty_step(device: str) -> Any:
    with tf.device(device):
        x = tf.zeros(())

    @tf.function
    def step() -> Any:
        with tf.device(device):
            return x + 1.0

    return step


def _best_seconds(steps: Sequence[Any], repeats: int) -> list[float]:
    """Fastest of `repeats` timed runs of each step, the steps interleaved round by round.

    On a shared machine, interference only ever adds time, so the minimum is the estimate least
    disturbed by it; interleaving spreads any slow period over all steps alike.
    """
    for step in steps:  # trace and warm up
        _block(step())
        _block(step())
    best = [float("inf")] * len(steps)
    for _ in range(max(repeats, 1)):
        for i, step in enumerate(steps):
            start = time.perf_counter()
            _block(step())
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def _block(result: Any) -> None:
    for t in tf.nest.flatten(result):
        if t is not None:
            t.numpy()


def format_bytes(n: float) -> str:
    """Bytes in binary units.

    Example:
    >>> tfpar.parallel.cost.format_bytes(1536)
    '1.5 KiB'
    """
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def parse_bytes(value: Any, name: str = "memory_limits") -> float:
    """Bytes from a number or a string such as ``"16GB"``, ``"512 MiB"``.

    Raises:
        TypeError: If `value` is neither a number nor a string (a bool included).
        ValueError: If the number is negative, NaN or infinite, or the string is not a size.

    Example:
    >>> tfpar.parallel.cost.parse_bytes("1.5 KiB")
    1536.0
    """
    if isinstance(value, bool):
        raise TypeError(f"Expected a number of bytes or a string like '16GB' in {name}. Received: {value!r}")
    if isinstance(value, (int, float, np.integer, np.floating)):
        if not math.isfinite(float(value)) or value < 0:
            raise ValueError(f"Expected a non-negative number of bytes in {name}. Received: {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise TypeError(
            f"Expected a number of bytes or a string like '16GB' in {name}. "
            f"Received: {value!r} (of type {type(value).__name__})"
        )
    units = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*", value.lower())
    if not match or (match.group(2) or "b") not in units:
        raise ValueError(
            f"Expected a memory size such as '16GB' or '512MiB' in {name} (units: B, KB, MB, GB, TB, "
            f"KiB, MiB, GiB, TiB). Received: {value!r}"
        )
    size = float(match.group(1)) * units[match.group(2) or "b"]
    if not math.isfinite(size):  # e.g. "1e999GB" overflows to inf
        raise ValueError(f"Expected a finite memory size in {name}. Received: {value!r}")
    return size
