"""Reports: the plan as a table and a plot, and where a model's ops actually ran.

:func:`placement_report` runs one forward (+ backward) pass of a model in a fresh ``tf.function``
with TensorFlow's graph tracing on (``tf.summary.trace_on``), and reads the *partitioned* graphs
TensorFlow executed from the exported run metadata. Those graphs carry the device the placer
assigned to every op, after soft placement, so the report shows where the work really ran, not
where it was requested. Ops are attributed to layers by their name scope; the backward ops are the
ones under ``gradient_tape``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import glob
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import keras
import tensorflow as tf

from tfpar.parallel import cost as cost_lib
from tfpar.parallel import gpipe

_PLUMBING = {"_Send", "_Recv", "_Arg", "_Retval", "_DeviceArg", "_DeviceRetval", "NoOp", "Const",
             "_EagerConst", "Identity", "IdentityN", "ReadVariableOp", "_HostSend", "_HostRecv"}
_TRANSFERS = {"_Send", "_HostSend"}
_PLUGIN = "graph_run_metadata_graph"
# Name scope of the reported step: the exported run metadata also holds graphs of unrelated eager
# ops executed earlier in the process, which are dropped by looking for it.
_MARK = "tfpar_placement_report"


# === Plan table and plot ===


def format_cost(value: float, unit: str) -> str:
    """A cost with a metric prefix (bytes in binary units, seconds in milliseconds).

    Example:
    >>> tfpar.parallel.report.format_cost(15.5e9, "FLOPs/example")
    '15.50G'
    """
    if unit == "bytes":
        return cost_lib.format_bytes(value)
    if unit == "seconds":
        return f"{value * 1e3:.2f} ms"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{prefix}"
    return f"{value:.0f}"


def format_plan(plan: Any) -> str:
    """The text table behind ``Plan.summary()``.

    Example:
    >>> print(tfpar.parallel.report.format_plan(tfpar.parallel.plan(model, 2)))
    """
    total = sum(stage.cost for stage in plan.stages) or 1.0
    heaviest = max(plan.stages, key=lambda stage: stage.load)
    header = (
        f"Plan for model {plan.model_name!r}: {plan.num_stages} stages, balance={plan.balance!r} "
        f"(costs in {plan.unit}), microbatches={plan.microbatches}, batch_size={plan.batch_size}"
    )
    rows = [["stage", "device", "layers", "first .. last", "cost", "share", "load", "memory",
             "limit", "receives/example"]]
    for stage in plan.stages:
        rows.append([
            str(stage.index),
            stage.device,
            str(len(stage.layers)),
            f"{stage.layers[0]} .. {stage.layers[-1]}",
            format_cost(stage.cost, plan.unit),
            f"{100 * stage.cost / total:.1f}%",
            format_cost(stage.load, plan.unit) + ("" if stage.speed == 1.0 else f" (x{stage.speed:g})"),
            cost_lib.format_bytes(stage.memory),
            "-" if stage.memory_limit is None else cost_lib.format_bytes(stage.memory_limit),
            cost_lib.format_bytes(stage.receives),
        ])
    footer = (
        f"bottleneck {format_cost(plan.bottleneck, plan.unit)} (stage {heaviest.index}), "
        f"imbalance {plan.imbalance:.3f} (1.0 = perfect), predicted bubble "
        f"{100 * plan.bubble:.1f}% = (p-1)/(m+p-1) with p={plan.num_stages}, m={plan.microbatches}"
    )
    return "\n".join([header, _table(rows), footer])


def plot_plan(plan: Any, ax: Any = None) -> Any:
    """Bar chart of each stage's load with the mean load dashed; returns the Figure.

    Example:
    >>> fig = tfpar.parallel.report.plot_plan(tfpar.parallel.plan(model, 4))
    """
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * plan.num_stages + 2), 3.2))
    else:
        fig = ax.figure
    loads = [stage.load for stage in plan.stages]
    labels = [f"{stage.index}\n{stage.device.replace('/device:', '')}" for stage in plan.stages]
    bars = ax.bar(range(len(loads)), loads, color=["#c0392b" if v == max(loads) else "#2e86c1" for v in loads])
    for bar, stage in zip(bars, plan.stages):
        ax.annotate(f"{len(stage.layers)} layers", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    mean = sum(loads) / len(loads)
    ax.axhline(mean, linestyle="--", color="gray", linewidth=1, label="mean load")
    ax.set_xticks(range(len(loads)), labels)
    ax.set_ylabel(f"load ({plan.unit})")
    ax.set_title(
        f"{plan.model_name}: {plan.balance} balance, imbalance {plan.imbalance:.2f}, "
        f"bubble {100 * plan.bubble:.0f}% (m={plan.microbatches})",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


# === Placement report ===


@dataclasses.dataclass(frozen=True)
class OpRecord:
    """One executed op: its name, type, the device it ran on, its layer and phase."""

    name: str
    type: str
    device: str
    layer: str | None
    phase: str


@dataclasses.dataclass(frozen=True)
class PlacementReport:
    """Where a model's ops and variables are, from the graph TensorFlow executed.

    Build it with :func:`placement_report`; ``print(report)`` shows the table.

    Attributes:
        model_name: The model's name.
        planned: ``{layer: device}`` for a split model, else None.
        ops: Every compute op of the step (plumbing such as sends, receives, constants and
            variable reads left out), with its device, layer (None for ops outside any layer, e.g.
            the loss or micro-batch slicing) and phase (``"forward"`` or ``"backward"``).
        variables: ``(weight path, device)`` for every weight.
        transfers: Number of cross-device sends in the executed graph.

    Example:
    >>> report = tfpar.parallel.placement_report(placed, x[:4])
    >>> report.misplaced()
    []
    """

    model_name: str
    planned: Mapping[str, str] | None
    ops: tuple[OpRecord, ...]
    variables: tuple[tuple[str, str], ...]
    transfers: int

    def layer_devices(self, phase: str | None = None) -> dict[str, dict[str, int]]:
        """``{layer: {device: op count}}``, optionally for one phase."""
        found: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for op in self.ops:
            if op.layer is not None and (phase is None or op.phase == phase):
                found[op.layer][op.device] += 1
        return {layer: dict(counts) for layer, counts in found.items()}

    def misplaced(self) -> list[str]:
        """Descriptions of ops and variables that are not on their layer's planned device."""
        if self.planned is None:
            return []
        wrong: collections.Counter[tuple[str, str, str]] = collections.Counter()
        for op in self.ops:
            if op.layer is not None and op.layer in self.planned and op.device != self.planned[op.layer]:
                wrong[(op.layer, op.phase, op.device)] += 1
        lines = [
            f"{count} {phase} op(s) of layer {layer!r} ran on {device}, planned {self.planned[layer]}"
            for (layer, phase, device), count in sorted(wrong.items())
        ]
        for path, device in self.variables:
            layer = path.split("/")[0]
            if layer in self.planned and device != self.planned[layer]:
                lines.append(f"variable {path!r} is on {device}, planned {self.planned[layer]}")
        return lines

    @property
    def ok(self) -> bool:
        """True for a split model whose every layer op (forward and backward) and variable is on
        its planned device, and whose layers all ran (no layer left unobserved)."""
        if self.planned is None:
            return False
        seen = set(self.layer_devices())
        compute_layers = {op.layer for op in self.ops if op.layer is not None}
        return not self.misplaced() and compute_layers <= set(self.planned) and bool(seen)

    def table(self) -> str:
        """A text table: layer, planned device, forward and backward op devices, variables."""
        forward, backward = self.layer_devices("forward"), self.layer_devices("backward")
        var_devices: dict[str, set[str]] = collections.defaultdict(set)
        for path, device in self.variables:
            var_devices[path.split("/")[0]].add(device)
        layers = list(self.planned) if self.planned else sorted(set(forward) | set(backward))
        rows = [["layer", "planned", "forward ops", "backward ops", "variables"]]
        for layer in layers:
            rows.append([
                layer,
                self.planned.get(layer, "-") if self.planned else "-",
                _counts(forward.get(layer, {})),
                _counts(backward.get(layer, {})),
                ", ".join(sorted(var_devices.get(layer, set()))) or "-",
            ])
        other = collections.Counter(op.device for op in self.ops if op.layer is None)
        status = ("all on plan" if self.ok else "MISPLACED:\n  " + "\n  ".join(self.misplaced())) if self.planned else "no plan"
        return (
            f"Placement of {self.model_name!r} (from the executed graph): {status}\n{_table(rows)}\n"
            f"ops outside layers (loss, micro-batch slicing): {_counts(dict(other))}; "
            f"cross-device sends: {self.transfers}"
        )

    def __str__(self) -> str:
        return self.table()


def placement_report(model: Any, inputs: Any, *, training: bool = True, gradients: bool = True) -> PlacementReport:
    """Runs one step of `model` on `inputs` and reports the device of every executed op.

    Args:
        model: Any ``keras.Model``; for a :class:`~tfpar.parallel.SplitModel` the report compares
            against its plan.
        inputs: A batch of model inputs (a few examples suffice).
        training: Whether to run in training mode.
        gradients: Whether to include the backward pass (gradient of the sum of the outputs with
            respect to the trainable weights).

    Returns:
        A :class:`PlacementReport`; ``print(report)`` shows the table, ``report.ok`` the verdict.

    Raises:
        TypeError: If `model` is not a ``keras.Model``.
        RuntimeError: If TensorFlow exported no executed graph (e.g. another trace is active).

    Example:
    >>> report = tfpar.parallel.placement_report(placed, x[:4])
    >>> report.ok
    True
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"Expected a keras.Model. Received: model={model!r} (of type {type(model).__name__})")
    inputs = tf.nest.map_structure(tf.convert_to_tensor, inputs)
    variables = list(model.trainable_variables)

    planned = getattr(model, "plan", None)
    # A split model's train_step places its loss and gradient sums (gpipe.placed_step); the
    # report runs the step the same way. Plain models run as Keras runs them.
    placement = gpipe.placed_step if planned is not None else contextlib.nullcontext

    @tf.function
    def step(x: Any) -> Any:
        with placement(), tf.GradientTape() as tape, tf.name_scope(_MARK):
            outputs = model(x, training=training)
            total = tf.add_n([tf.constant(0.0)] + [
                tf.reduce_sum(tf.cast(o, tf.float32)) for o in keras.tree.flatten(outputs)
                if tf.as_dtype(o.dtype).is_floating
            ])
        grads = tape.gradient(total, variables) if gradients and variables else []
        return outputs, grads

    nodes = _executed_nodes(step, inputs)
    layer_names = {layer.name for layer in model.layers}
    ops, transfers = [], 0
    for name, op_type, device in nodes:
        if op_type in _TRANSFERS:
            transfers += 1
        if op_type in _PLUMBING or op_type.startswith("_Recv") or op_type.startswith("_Send"):
            continue
        phase = "backward" if "gradient_tape" in name.split("/") or "_backward/" in name else "forward"
        ops.append(OpRecord(name, op_type, _short(device), _layer_of(name, layer_names), phase))
    return PlacementReport(
        model_name=model.name,
        planned=dict(planned.placement) if planned is not None and hasattr(planned, "placement") else None,
        ops=tuple(ops),
        variables=tuple((w.path, _short(_variable_device(w))) for w in model.weights),
        transfers=transfers,
    )


def _executed_nodes(step: Any, inputs: Any, mark: str = _MARK) -> list[tuple[str, str, str]]:
    logdir = tempfile.mkdtemp(prefix="tfpar_placement_")
    writer = tf.summary.create_file_writer(logdir)
    try:
        tf.summary.trace_on(graph=True, profiler=False)
        try:
            result = step(inputs)
            for t in tf.nest.flatten(result):
                if t is not None:
                    t.numpy()
            with writer.as_default():
                tf.summary.trace_export(name="tfpar_placement", step=0)
        finally:
            tf.summary.trace_off()
        writer.flush()
        writer.close()
        nodes = []
        for path in sorted(glob.glob(os.path.join(logdir, "*"))):
            for record in tf.data.TFRecordDataset(path):
                event = tf.compat.v1.Event.FromString(record.numpy())
                for value in event.summary.value:
                    if value.metadata.plugin_data.plugin_name != _PLUGIN:
                        continue
                    run_metadata = tf.compat.v1.RunMetadata.FromString(value.tensor.string_val[0])
                    for function_graph in run_metadata.function_graphs:
                        found = [(n.name, n.op, n.device) for g in function_graph.partition_graphs for n in g.node]
                        if any(mark in name for name, _, _ in found):
                            nodes.extend(found)
    finally:
        shutil.rmtree(logdir, ignore_errors=True)
    if not nodes:
        raise RuntimeError(
            "TensorFlow exported no executed graph for the placement report. Expected "
            "tf.summary.trace_on() to be free. Received: no partition graphs. Fix: stop any other "
            "active trace (tf.summary.trace_off()) and call placement_report again."
        )
    return nodes


def _layer_of(op_name: str, layer_names: set[str]) -> str | None:
    for segment in op_name.split("/"):
        if segment in layer_names:
            return segment
        base, _, suffix = segment.rpartition("_")
        if suffix.isdigit() and base in layer_names:
            return base
    return None


def _short(device: str) -> str:
    return device[device.index("/device:"):] if "/device:" in device else device


def _variable_device(variable: Any) -> str:
    value = getattr(variable, "value", variable)
    return getattr(value, "device", "") or ""


def _counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{device.replace('/device:', '')} x{n}" for device, n in sorted(counts.items())) or "-"
