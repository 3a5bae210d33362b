"""Layer graph: the dataflow of a Functional or Sequential Keras model, read from its config.

Splitting needs to know, for every layer, which tensors it consumes and produces. Keras keeps that in
private node objects; the same information is in the model's *public* serialized config (the format
``keras.models.load_model`` reads), so tfpar reads it from there. The result is pure data:

* ``graph.inputs``: the model inputs (name, shape, dtype);
* ``graph.nodes``: one :class:`Node` per layer, in a deterministic topological order, each with its
  call arguments as a template where every tensor is a :class:`TensorRef`;
* ``graph.outputs``: the output structure, again with :class:`TensorRef` leaves.

A :class:`TensorRef` is ``(layer name, node index, tensor index)``, Keras's own ``keras_history``.
Layers called more than once (shared layers) are rejected: a layer lives on one device, and tfpar
does not yet place the second call of a layer in another stage.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import keras

_TENSOR = "__keras_tensor__"


@dataclasses.dataclass(frozen=True)
class TensorRef:
    """A tensor in the graph: output `index` of node `node` of layer `layer` (Keras's keras_history).

    Example:
    >>> tfpar.parallel.layer_graph.TensorRef("block1_conv1", 0, 0)
    TensorRef(layer='block1_conv1', node=0, index=0)
    """

    layer: str
    node: int
    index: int


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """Shape (batch dimension first, possibly None) and dtype of a graph tensor."""

    shape: tuple[int | None, ...]
    dtype: str


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """A model input: the name of its InputLayer, its shape and dtype."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str

    @property
    def ref(self) -> TensorRef:
        return TensorRef(self.name, 0, 0)


@dataclasses.dataclass(frozen=True)
class Node:
    """One layer call: the layer's serialized config and its call arguments as templates."""

    name: str
    layer_config: Mapping[str, Any]
    args: Any
    kwargs: Any
    inputs: tuple[TensorRef, ...]


@dataclasses.dataclass(frozen=True)
class LayerGraph:
    """The dataflow graph of a model; see the module docstring.

    Example:
    >>> graph = tfpar.parallel.layer_graph.from_model(model)
    >>> graph.cuts([["dense_a"], ["dense_b", "logits"]])
    ((TensorRef(layer='features', node=0, index=0),), (TensorRef(layer='dense_a', node=0, index=0),))
    """

    name: str
    inputs: tuple[InputSpec, ...]
    input_structure: Any
    nodes: tuple[Node, ...]
    outputs: Any
    specs: Mapping[TensorRef, TensorSpec]

    @property
    def layer_names(self) -> tuple[str, ...]:
        """Names of the layers (not the inputs), in topological order."""
        return tuple(node.name for node in self.nodes)

    @property
    def output_refs(self) -> tuple[TensorRef, ...]:
        return tuple(refs_in(self.outputs))

    def node(self, name: str) -> Node:
        """The node of layer `name`; ValueError naming the closest layers if there is none."""
        for node in self.nodes:
            if node.name == name:
                return node
        raise ValueError(unknown_layer_message(name, self.layer_names, self.name))

    def check_order(self, order: Sequence[str]) -> None:
        """Raises ValueError unless `order` lists every layer once, each after its inputs."""
        known = set(self.layer_names)
        for name in order:
            if name not in known:
                raise ValueError(unknown_layer_message(name, self.layer_names, self.name))
        missing = [n for n in self.layer_names if n not in set(order)]
        if missing or len(order) != len(set(order)):
            duplicated = sorted({n for n in order if list(order).count(n) > 1})
            raise ValueError(
                f"Expected the stages to list each layer of model {self.name!r} exactly once. "
                f"Missing: {missing}; listed twice: {duplicated}. Received: {len(order)} layer "
                f"names for {len(self.layer_names)} layers. Build the plan with "
                "tfpar.parallel.plan(model, devices) for this model."
            )
        position = {name: i for i, name in enumerate(order)}
        inputs = {spec.name for spec in self.inputs}
        for node in self.nodes:
            for ref in node.inputs:
                if ref.layer not in inputs and position[ref.layer] > position[node.name]:
                    raise ValueError(
                        f"Layer {node.name!r} is placed in a stage before the layer it reads "
                        f"from ({ref.layer!r}), so the stages are not a pipeline. Expected "
                        "stages that are contiguous in a topological order of the model. "
                        f"Received: {ref.layer!r} at position {position[ref.layer]}, "
                        f"{node.name!r} at position {position[node.name]}."
                    )

    def cuts(self, stages: Sequence[Sequence[str]]) -> tuple[tuple[TensorRef, ...], ...]:
        """For each stage, the tensors it receives from model inputs or earlier stages."""
        owner = {name: s for s, layers in enumerate(stages) for name in layers}
        received: list[tuple[TensorRef, ...]] = []
        for s, layers in enumerate(stages):
            refs: dict[TensorRef, None] = {}
            for name in layers:
                for ref in self.node(name).inputs:
                    if owner.get(ref.layer, -1) != s:
                        refs[ref] = None
            received.append(tuple(refs))
        return tuple(received)

    def sends(self, stages: Sequence[Sequence[str]]) -> tuple[tuple[TensorRef, ...], ...]:
        """For each stage, the tensors it produces that later stages or the outputs read."""
        owner = {name: s for s, layers in enumerate(stages) for name in layers}
        sent: list[dict[TensorRef, None]] = [{} for _ in stages]
        for _s, refs in enumerate(self.cuts(stages)):
            for ref in refs:
                if ref.layer in owner:
                    sent[owner[ref.layer]][ref] = None
        for ref in self.output_refs:
            sent[owner[ref.layer]][ref] = None
        return tuple(tuple(refs) for refs in sent)


def from_model(model: Any) -> LayerGraph:
    """Reads the layer graph of a built Functional or Sequential model.

    Args:
        model: A ``keras.Model`` built with the functional API or a built ``keras.Sequential``.

    Returns:
        The model's :class:`LayerGraph`.

    Raises:
        TypeError: If `model` is not a Keras model, or is a subclassed model (no layer graph).
        ValueError: If the model is not built, or calls a layer more than once.

    Example:
    >>> graph = tfpar.parallel.layer_graph.from_model(tfpar.models.vgg16())
    >>> graph.layer_names[:2]
    ('block1_conv1', 'block1_conv2')
    """
    if not isinstance(model, keras.Model):
        raise TypeError(
            "Expected a keras.Model (Functional or Sequential). "
            f"Received: model={model!r} (of type {type(model).__name__})"
        )
    config = model_config(model)
    if not model.built:
        raise ValueError(
            f"Expected a built model; {model.name!r} has no input shape yet. Received: "
            f"model.built=False. Fix: start it with keras.Input(shape) or call model.build(shape)."
        )
    graph = from_config(config)
    return dataclasses.replace(graph, specs=_complete_specs(graph, model))


def _complete_specs(graph: LayerGraph, model: Any) -> dict[TensorRef, TensorSpec]:
    """Adds the shape of every graph tensor, read from the model's symbolic outputs."""
    specs = dict(graph.specs)
    for spec in graph.inputs:
        specs.setdefault(spec.ref, TensorSpec(spec.shape, spec.dtype))
    by_name = {op.name: op for op in getattr(model, "operations", [])}
    by_name.update({layer.name: layer for layer in model.layers})
    refs = [r for node in graph.nodes for r in node.inputs] + list(graph.output_refs)
    for ref in refs:
        if ref not in specs:
            tensor = keras.tree.flatten(by_name[ref.layer].output)[ref.index]
            specs[ref] = TensorSpec(_shape(tensor.shape), str(tensor.dtype))
    return specs


def model_config(model: Any) -> dict[str, Any]:
    """The graph config of a model: ``{"class_name": "Functional"|"Sequential", "config": ...}``.

    Example:
    >>> tfpar.parallel.layer_graph.model_config(tfpar.models.vgg16())["class_name"]
    'Functional'


    Subclasses of the Functional class (keras.applications, KerasHub) often override
    ``get_config`` to return their constructor arguments; the graph config is the one of the
    Functional class itself, which is found by name in the class hierarchy (no private import).
    """
    if isinstance(model, keras.Sequential):
        return {"class_name": "Sequential", "config": model.get_config()}
    # Any: a Keras class found at run time, whose get_config is called unbound on `model`.
    functional: Any = next((c for c in type(model).__mro__ if c.__name__ == "Functional"), None)
    if functional is None:
        raise TypeError(
            "tfpar.parallel can split Functional and Sequential models, whose layer graph is known "
            f"before they run. Received: a subclassed model of type {type(model).__name__} "
            f"(name={model.name!r}). Fix: build the model with the functional API "
            "(keras.Input -> layers -> keras.Model(inputs, outputs)) or as a keras.Sequential."
        )
    return {"class_name": "Functional", "config": functional.get_config(model)}


def from_config(serialized: Mapping[str, Any]) -> LayerGraph:
    """Builds a :class:`LayerGraph` from :func:`model_config` output (pure; no TensorFlow).

    Example:
    >>> config = tfpar.parallel.layer_graph.model_config(model)
    >>> tfpar.parallel.layer_graph.from_config(config).layer_names == tuple(l.name for l in model.layers)
    True
    """
    config = serialized["config"]
    if serialized["class_name"] == "Sequential":
        return _sequential_graph(config)
    return _functional_graph(config)


def _sequential_graph(config: Mapping[str, Any]) -> LayerGraph:
    entries = list(config["layers"])
    if entries and entries[0]["class_name"] == "InputLayer":
        input_config = entries.pop(0)["config"]
        spec = InputSpec(
            input_config["name"], _shape(input_config["batch_shape"]), input_config["dtype"]
        )
    elif config.get("build_input_shape") is not None:
        spec = InputSpec(f"{config['name']}_input", _shape(config["build_input_shape"]), "float32")
    else:
        raise ValueError(
            f"Expected a built Sequential model; {config['name']!r} has no input shape. "
            "Received: a config without InputLayer or build_input_shape. Fix: add keras.Input(shape) "
            "as its first layer or call model.build(shape)."
        )
    if not entries:
        raise ValueError(f"Expected a model with at least one layer. Received: {config['name']!r} has none.")
    nodes = []
    previous = spec.ref
    specs: dict[TensorRef, TensorSpec] = {}
    for entry in entries:
        name = entry["config"]["name"]
        nodes.append(Node(name, entry, (previous,), {}, (previous,)))
        previous = TensorRef(name, 0, 0)
    return LayerGraph(config["name"], (spec,), spec.ref, tuple(nodes), previous, specs)


def _functional_graph(config: Mapping[str, Any]) -> LayerGraph:
    inputs: list[InputSpec] = []
    raw_nodes: list[Node] = []
    specs: dict[TensorRef, TensorSpec] = {}
    for entry in config["layers"]:
        name = entry["name"]
        if entry["class_name"] == "InputLayer":
            layer_config = entry["config"]
            inputs.append(
                InputSpec(name, _shape(layer_config["batch_shape"]), layer_config["dtype"])
            )
            continue
        calls = entry.get("inbound_nodes") or []
        if len(calls) != 1:
            raise ValueError(
                f"Layer {name!r} of model {config['name']!r} is called {len(calls)} times. "
                "tfpar.parallel places each layer on one device and expects one call per layer. "
                "Received: a shared layer. Fix: use a separate layer object for each call."
            )
        args = _template(calls[0].get("args", []), specs)
        kwargs = _template(calls[0].get("kwargs", {}), specs)
        refs = tuple(dict.fromkeys([*refs_in(args), *refs_in(kwargs)]))
        layer_config = {k: v for k, v in entry.items() if k != "inbound_nodes"}
        raw_nodes.append(Node(name, layer_config, args, kwargs, refs))
    input_structure = _ref_structure(config["input_layers"])
    outputs = _ref_structure(config["output_layers"])
    nodes = _topological(raw_nodes, {spec.name for spec in inputs}, config["name"])
    return LayerGraph(config["name"], tuple(inputs), input_structure, nodes, outputs, specs)


def _topological(nodes: list[Node], inputs: set[str], model_name: str) -> tuple[Node, ...]:
    """Kahn's algorithm; ties go to the earlier node in the config, so a valid order is kept."""
    names = {node.name for node in nodes}
    pending = {
        node.name: {ref.layer for ref in node.inputs if ref.layer not in inputs} for node in nodes
    }
    for node in nodes:
        unknown = pending[node.name] - names
        if unknown:
            raise ValueError(
                f"Layer {node.name!r} of model {model_name!r} reads from {sorted(unknown)}, which "
                "is not a layer of the model. Received: an inconsistent model config."
            )
    order: list[Node] = []
    done: set[str] = set()
    remaining = list(nodes)
    while remaining:
        ready = next(node for node in remaining if pending[node.name] <= done)
        order.append(ready)
        done.add(ready.name)
        remaining.remove(ready)
    return tuple(order)


def _shape(shape: Iterable[Any]) -> tuple[int | None, ...]:
    return tuple(None if d is None else int(d) for d in shape)


def _is_ref_leaf(value: Any) -> bool:
    return (
        isinstance(value, (list, tuple))
        and len(value) == 3
        and isinstance(value[0], str)
        and isinstance(value[1], int)
        and isinstance(value[2], int)
    )


def _ref_structure(value: Any) -> Any:
    """Converts Keras's ``input_layers``/``output_layers`` structure to TensorRef leaves."""
    if _is_ref_leaf(value):
        return TensorRef(value[0], value[1], value[2])
    if isinstance(value, Mapping):
        return {k: _ref_structure(v) for k, v in value.items()}
    return [_ref_structure(v) for v in value]


def _template(value: Any, specs: dict[TensorRef, TensorSpec]) -> Any:
    """Turns serialized call arguments into a template with TensorRef leaves."""
    if isinstance(value, Mapping):
        class_name = value.get("class_name")
        if class_name == _TENSOR:
            inner = value["config"]
            ref = TensorRef(*inner["keras_history"])
            specs[ref] = TensorSpec(_shape(inner["shape"]), str(inner["dtype"]))
            return ref
        if class_name == "__tuple__":
            return tuple(_template(v, specs) for v in value["config"]["value"])
        if class_name is not None and "config" in value:
            return keras.saving.deserialize_keras_object(dict(value))
        return {k: _template(v, specs) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_template(v, specs) for v in value)
    if isinstance(value, list):
        return [_template(v, specs) for v in value]
    return value


def refs_in(template: Any) -> list[TensorRef]:
    """The TensorRef leaves of a template, in order.

    Example:
    >>> ref = tfpar.parallel.layer_graph.TensorRef("a", 0, 0)
    >>> tfpar.parallel.layer_graph.refs_in(([ref], {"mask": None}))
    [TensorRef(layer='a', node=0, index=0)]
    """
    if isinstance(template, TensorRef):
        return [template]
    if isinstance(template, Mapping):
        return [r for v in template.values() for r in refs_in(v)]
    if isinstance(template, (list, tuple)):
        return [r for v in template for r in refs_in(v)]
    return []


def fill(template: Any, lookup: Callable[[TensorRef], Any]) -> Any:
    """Replaces each TensorRef leaf of a template with ``lookup(ref)``.

    Example:
    >>> ref = tfpar.parallel.layer_graph.TensorRef("a", 0, 0)
    >>> tfpar.parallel.layer_graph.fill([ref, 2], {ref: 1}.__getitem__)
    [1, 2]
    """
    if isinstance(template, TensorRef):
        return lookup(template)
    if isinstance(template, Mapping):
        return {k: fill(v, lookup) for k, v in template.items()}
    if isinstance(template, tuple):
        return tuple(fill(v, lookup) for v in template)
    if isinstance(template, list):
        return [fill(v, lookup) for v in template]
    return template


def unknown_layer_message(name: Any, known: Sequence[str], model_name: str) -> str:
    """The ValueError message for a layer name that is not in a model, naming the closest ones.

    Example:
    >>> tfpar.parallel.layer_graph.unknown_layer_message("fc3", ["fc1", "fc2"], "vgg16")[:49]
    "Expected the name of a layer of model 'vgg16'. Re"
    """
    close = difflib.get_close_matches(str(name), list(known), n=3)
    hint = f" Closest layer names: {close}." if close else ""
    shown = list(known[:8]) + (["..."] if len(known) > 8 else [])
    return (
        f"Expected the name of a layer of model {model_name!r}. Received: {name!r}, which is not "
        f"one.{hint} The model's layers are {shown} ({len(known)} in all; see model.layers)."
    )
