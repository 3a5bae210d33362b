"""A placed, pipelined copy of a Keras model: stage ``i``'s variables and computation on device ``i``.

``tf.device`` around layer construction places a layer's *variables* but not its *computation*
(tensorflow/tensorflow#53671), and the backward pass is worse: TensorFlow creates gradient ops
without any device, so they all land on the default device. A :class:`SplitModel` therefore

1. rebuilds every layer from its config under ``tf.device(stage device)`` (variables placed) and
   copies the original weights in;
2. runs each stage's layers under ``tf.device(stage device)`` at call time (forward placed);
3. wraps each stage in a ``tf.custom_gradient`` whose gradient function runs under the same device
   scope (backward placed, and the per-variable sums over micro-batches with it);
4. with ``microbatches = m > 1``, cuts the batch into ``m`` micro-batches inside the one traced
   step; TensorFlow's dataflow executor then overlaps stage ``s`` of micro-batch ``i`` with stage
   ``s + 1`` of micro-batch ``i - 1`` (GPipe). The loss is computed on the concatenated outputs, so
   the gradient is the sum of the micro-batch gradients: exactly the full-batch gradient;
5. in ``fit``, builds the optimizer eagerly so every slot variable is colocated with its variable
   (Keras otherwise builds it inside the traced step, where every slot lands on the default
   device), and traces the step under a device function that puts each unplaced op (the loss,
   each variable's update arithmetic) with its largest placed input.

One thing remains off-plan: Keras sums gradients over replicas even for a single replica, with an
``IdentityN`` over all gradients that TensorFlow puts on the default device, so each gradient makes
a round trip through it (harmless for virtual CPUs; on GPUs a transfer of the gradients per step).

BatchNormalization with micro-batches: normalizing each micro-batch with its own statistics (GPipe's
default) changes the outputs, the gradients and the moving averages. tfpar's default,
``batch_norm="full_batch"``, concatenates the micro-batches at each BatchNormalization layer in
training mode, normalizes the whole batch once and cuts it again: results equal the unsplit model's,
at the price of a pipeline barrier at every such layer. ``batch_norm="microbatch"`` keeps the
pipeline flowing and uses per-micro-batch statistics (the moving averages are then updated ``m``
times per step). In inference mode BatchNormalization is per-example, so micro-batching is exact.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping, Sequence
from typing import Any, cast

import keras
import numpy as np
import tensorflow as tf

from tfpar._validation import check_int
from tfpar.parallel import cost as cost_lib
from tfpar.parallel import gpipe, layer_graph
from tfpar.parallel import planner as plan_lib

BATCH_NORM_MODES = ("full_batch", "microbatch")


@dataclasses.dataclass(frozen=True)
class _Block:
    """Consecutive nodes of a stage; a barrier block is one batch-statistics layer.

    `inputs` are the tensors its nodes read from outside the block, `outputs` the tensors it
    produces that later blocks of the stage or later stages read.
    """

    barrier: bool
    nodes: tuple[layer_graph.Node, ...]
    inputs: tuple[layer_graph.TensorRef, ...] = ()
    outputs: tuple[layer_graph.TensorRef, ...] = ()


@dataclasses.dataclass(frozen=True)
class _Wiring:
    """Immutable wiring of the split model (kept out of Keras attribute tracking)."""

    graph: layer_graph.LayerGraph
    blocks: tuple[tuple[_Block, ...], ...]
    whole: tuple[tuple[_Block, ...], ...]
    receives: tuple[tuple[layer_graph.TensorRef, ...], ...]
    sends: tuple[tuple[layer_graph.TensorRef, ...], ...]
    owner: Mapping[str, int]


@keras.saving.register_keras_serializable(package="tfpar")
class SplitModel(keras.Model):
    """A Keras model whose stages live and run on the devices of a :class:`~tfpar.parallel.Plan`.

    Build it with :func:`tfpar.parallel.split`. It is a plain ``keras.Model``: ``compile``, ``fit``,
    ``evaluate``, ``predict``, ``save`` / ``keras.models.load_model`` and ``save_weights`` /
    ``load_weights`` work as usual. Its layers keep the original names, in topological order, so
    every weight's path is ``"<layer name>/<weight name>"``.

    Attributes:
        plan: The :class:`~tfpar.parallel.Plan` it was built from, with ``plan.microbatches`` set
            to the micro-batch count the model runs with.
        microbatches: Micro-batches per step.
        batch_norm: ``"full_batch"`` or ``"microbatch"`` (see the module docstring).
        microbatch_timings: With ``microbatches="auto"``, the measured seconds per step of each
            candidate; otherwise None.

    Example:
    >>> placed = tfpar.parallel.split(model, ["cpu:0", "cpu:1"], microbatches=4)
    >>> placed.get_layer("fc1").kernel.path
    'fc1/kernel'
    """

    def __init__(
        self,
        model_config: Mapping[str, Any],
        plan: plan_lib.Plan | Mapping[str, Any],
        microbatches: int = 1,
        batch_norm: str = "full_batch",
        microbatch_timings: Mapping[int, float] | None = None,
        **kwargs: Any,
    ) -> None:
        _check_batch_norm(batch_norm)
        gpipe.check_microbatches(microbatches)
        if not isinstance(microbatches, int):
            raise ValueError(f"Expected an int number of micro-batches. Received: microbatches={microbatches!r}")
        _check_no_strategy("build a split model")
        if not isinstance(plan, plan_lib.Plan):
            plan = plan_lib.Plan.from_config(plan)
        graph = layer_graph.from_config(model_config)
        graph.check_order([name for stage in plan.stages for name in stage.layers])
        super().__init__(**kwargs)
        # XLA compiles a cluster for one device, which would undo the placement; Keras then
        # resolves jit_compile="auto" to False and warns on jit_compile=True.
        self.supports_jit = False
        self._model_config = types.MappingProxyType(dict(model_config))
        self._plan = dataclasses.replace(plan, microbatches=microbatches)
        self._microbatches = microbatches
        self._batch_norm = batch_norm
        self._timings = None if microbatch_timings is None else types.MappingProxyType(
            {int(k): float(v) for k, v in dict(microbatch_timings).items()}
        )
        self.split_layers = self._build_layers(graph, plan)
        stages = [stage.layers for stage in plan.stages]
        by_name = {layer.name: layer for layer in self.split_layers}
        self._layers_by_name = types.MappingProxyType(by_name)
        sends = graph.sends(stages)
        self._wiring = _Wiring(
            graph=graph,
            blocks=tuple(_blocks(graph, names, by_name, sent) for names, sent in zip(stages, sends)),
            whole=tuple(_blocks(graph, names, {}, sent) for names, sent in zip(stages, sends)),
            receives=graph.cuts(stages),
            sends=sends,
            owner=types.MappingProxyType({n: s for s, names in enumerate(stages) for n in names}),
        )
        self.built = True

    # === Construction ===

    def _build_layers(self, graph: layer_graph.LayerGraph, plan: plan_lib.Plan) -> list[Any]:
        symbolic: dict[layer_graph.TensorRef, Any] = {
            spec.ref: keras.Input(batch_shape=spec.shape, dtype=spec.dtype, name=spec.name)
            for spec in graph.inputs
        }
        layers = []
        for stage in plan.stages:
            with tf.device(stage.device):
                for name in stage.layers:
                    node = graph.node(name)
                    layer = keras.saving.deserialize_keras_object(dict(node.layer_config))
                    outputs = layer(
                        *layer_graph.fill(node.args, symbolic.__getitem__),
                        **layer_graph.fill(node.kwargs, symbolic.__getitem__),
                    )
                    for t, tensor in enumerate(keras.tree.flatten(outputs)):
                        symbolic[layer_graph.TensorRef(name, 0, t)] = tensor
                    layers.append(layer)
        return layers

    # === Properties ===

    @property
    def plan(self) -> plan_lib.Plan:
        return self._plan

    @property
    def microbatches(self) -> int:
        return self._microbatches

    @property
    def batch_norm(self) -> str:
        return self._batch_norm

    @property
    def microbatch_timings(self) -> Mapping[int, float] | None:
        return self._timings

    # === Running ===

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        _check_no_strategy("run a split model")
        return self._forward(inputs, training, self._microbatches)

    def _forward(self, inputs: Any, training: bool | None, m: int) -> Any:
        wiring = self._wiring
        first = self._plan.stages[0].device
        with tf.device(first):
            bound = _bind_inputs(wiring.graph, inputs)
            if m == 1:
                values = [bound]
            else:
                batch = tf.shape(next(iter(bound.values())))[0]
                bounds = gpipe.microbatch_bounds(batch, m)
                parts = {ref: gpipe.split_batch(t, bounds) for ref, t in bound.items()}
                values = [{ref: parts[ref][i] for ref in bound} for i in range(m)]
        for s in range(len(self._plan.stages)):
            inputs_s = [[values[i][ref] for ref in wiring.receives[s]] for i in range(m)]
            outputs_s = self._run_stage(s, inputs_s, training)
            for i in range(m):
                values[i].update(zip(wiring.sends[s], outputs_s[i]))

        def output(ref: layer_graph.TensorRef) -> Any:
            if m == 1:
                return values[0][ref]
            with tf.device(self._plan.stages[wiring.owner[ref.layer]].device):
                return tf.concat([values[i][ref] for i in range(m)], axis=0)

        return layer_graph.fill(wiring.graph.outputs, output)

    def _run_stage(self, s: int, inputs: list[list[tf.Tensor]], training: bool | None) -> list[list[tf.Tensor]]:
        """Runs stage `s` on every micro-batch; returns, per micro-batch, the tensors it sends.

        Each block runs in its own ``tf.custom_gradient`` per micro-batch, so micro-batch ``i``
        flows on to the next stage as soon as it is done (one custom gradient over all
        micro-batches would join them in its ``IdentityN`` and stall the pipeline). A barrier
        block (BatchNormalization in training with ``batch_norm="full_batch"``) runs once on the
        concatenated micro-batches.
        """
        wiring = self._wiring
        device = self._plan.stages[s].device
        m = len(inputs)
        full_batch = m > 1 and bool(training) and self._batch_norm == "full_batch"
        values = [dict(zip(wiring.receives[s], mb)) for mb in inputs]
        for block in wiring.blocks[s] if full_batch else wiring.whole[s]:
            if not block.outputs:
                continue
            if block.barrier and full_batch:
                outputs = _placed(device, f"tfpar_s{s}_all", self._barrier_fn(block, m),
                                  [values[i][ref] for i in range(m) for ref in block.inputs])
                for i in range(m):
                    values[i].update(zip(block.outputs, outputs[i * len(block.outputs):(i + 1) * len(block.outputs)]))
                continue
            for i in range(m):
                outputs = _placed(device, f"tfpar_s{s}_m{i}", self._block_fn(block),
                                  [values[i][ref] for ref in block.inputs])
                values[i].update(zip(block.outputs, outputs))
        return [[values[i][ref] for ref in wiring.sends[s]] for i in range(m)]

    def _block_fn(self, block: _Block) -> Any:
        layers = self._layers_by_name

        def run(tensors: list[tf.Tensor]) -> list[tf.Tensor]:
            values = dict(zip(block.inputs, tensors))
            for node in block.nodes:
                for t, tensor in enumerate(_call(layers[node.name], node, values)):
                    values[layer_graph.TensorRef(node.name, 0, t)] = tensor
            return [values[ref] for ref in block.outputs]

        return run

    def _barrier_fn(self, block: _Block, m: int) -> Any:
        run_block = self._block_fn(block)
        n_in = len(block.inputs)

        def run(tensors: list[tf.Tensor]) -> list[tf.Tensor]:
            per_mb = [tensors[i * n_in:(i + 1) * n_in] for i in range(m)]
            whole = [tf.concat([mb[j] for mb in per_mb], axis=0) for j in range(n_in)]
            bounds = gpipe.microbatch_bounds(tf.shape(whole[0])[0], m)
            parts = [gpipe.split_batch(tensor, bounds) for tensor in run_block(whole)]
            return [part[i] for i in range(m) for part in parts]

        return run

    # === Keras integration ===

    def train_step(self, data: Any) -> Any:
        # The loss, the sums of per-micro-batch gradients and the optimizer's update arithmetic
        # are created without a device; see gpipe.placed_step.
        with gpipe.placed_step():
            return super().train_step(data)

    def make_train_function(self, force: bool = False) -> Any:
        # Keras builds the optimizer lazily inside the traced train step when no strategy is
        # set; variables created there ignore colocation and land on the default device. Built
        # eagerly here, every optimizer slot is colocated with its variable on its stage device.
        optimizer = getattr(self, "optimizer", None)
        if optimizer is not None and not optimizer.built:
            optimizer.build(self.trainable_variables)
        return super().make_train_function(force)

    def build(self, input_shape: Any = None) -> None:
        # Every layer is built on its device in __init__.
        self.built = True

    def get_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "trainable": self.trainable,
            "model_config": dict(self._model_config),
            "plan": self._plan.get_config(),
            "microbatches": self._microbatches,
            "batch_norm": self._batch_norm,
            "microbatch_timings": None if self._timings is None else {str(k): v for k, v in self._timings.items()},
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> SplitModel:
        config = dict(config)
        timings = config.pop("microbatch_timings", None)
        if timings is not None:
            timings = {int(k): float(v) for k, v in timings.items()}
        return cls(microbatch_timings=timings, **config)


def split(
    model: Any,
    plan_or_devices: plan_lib.Plan | Sequence[Any] | int,
    microbatches: int | str | None = None,
    *,
    batch_norm: str = "full_batch",
    batch_size: int | None = None,
    **plan_options: Any,
) -> SplitModel:
    """Returns a copy of `model` placed over devices: variables, forward and backward per stage.

    The original model is not modified. The split model gets *copies* of its weights (new variables
    on the planned devices); train the split model, and read weights from it. Layer names are
    kept, so ``split.get_layer(name)`` and weight paths ``"<layer name>/<weight name>"`` match
    the original's layers.

    Args:
        model: A built Functional or Sequential ``keras.Model`` (branches and skip connections are
            fine: a stage boundary may carry several tensors).
        plan_or_devices: A :class:`~tfpar.parallel.Plan` from :func:`tfpar.parallel.plan`, or
            devices (a list or a count), planned with ``plan(model, devices, **plan_options)``.
        microbatches: Micro-batches per step (int >= 1), ``"auto"`` to measure 1, 2, 4, 8, 16 on
            `batch_size` examples and keep the fastest, or None for the plan's value.
        batch_norm: ``"full_batch"`` (default: exact, BatchNormalization sees the whole batch) or
            ``"microbatch"`` (per-micro-batch statistics, no pipeline barrier).
        batch_size: Examples per step for ``microbatches="auto"`` (default: the plan's).
        **plan_options: Passed to :func:`tfpar.parallel.plan` when devices are given.

    Returns:
        A :class:`SplitModel` (a ``keras.Model``).

    Raises:
        TypeError: If `model` is not a Functional or Sequential model, or an argument has the wrong
            type.
        ValueError: If the plan does not match the model (unknown or missing layer names), or
            an argument has a wrong value.
        RuntimeError: If called inside a data-parallel strategy scope: TensorFlow's strategies run
            one replica per device and cannot span a replica over the stage devices.

    Example:
    >>> import tfpar
    >>> plan = tfpar.parallel.plan(model, ["cpu:0", "cpu:1"])
    >>> placed = tfpar.parallel.split(model, plan, microbatches=4)
    >>> placed.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    >>> placed.fit(x, y, batch_size=32)
    """
    _check_batch_norm(batch_norm)
    gpipe.check_microbatches(microbatches, allow_none=True)
    check_int("batch_size", batch_size, minimum=1, allow_none=True)
    _check_no_strategy("call tfpar.parallel.split()")
    if isinstance(plan_or_devices, plan_lib.Plan):
        if plan_options:
            raise TypeError(
                "Plan options are only accepted with devices; this plan is already made. "
                f"Received: {sorted(plan_options)}. Fix: pass them to tfpar.parallel.plan()."
            )
        the_plan = plan_or_devices
    else:
        if batch_size is not None:
            plan_options.setdefault("batch_size", batch_size)
        the_plan = plan_lib.plan(model, plan_or_devices, **plan_options)
    config = layer_graph.model_config(model)
    layer_graph.from_model(model).check_order([n for stage in the_plan.stages for n in stage.layers])
    m = the_plan.microbatches if microbatches is None else microbatches
    start = 1 if m == gpipe.AUTO else cast(int, m)  # checked above: an int, or AUTO
    # The model's plan records the micro-batch count it runs with (bubble, predicted step time).
    placed = SplitModel(config, dataclasses.replace(the_plan, microbatches=start),
                        microbatches=start, batch_norm=batch_norm, name=model.name)
    originals = cost_lib.layers_by_name(model)
    for layer in placed.split_layers:
        layer.set_weights(originals[layer.name].get_weights())
    if m == gpipe.AUTO:
        timings = _tune(placed, batch_size or the_plan.batch_size)
        best = min(timings, key=lambda k: (timings[k], k))
        placed = _with_microbatches(placed, best, timings)
    return placed


def _tune(model: SplitModel, batch_size: int) -> dict[int, float]:
    """Times one forward + backward step per candidate micro-batch count; restores all state."""
    rng = np.random.default_rng(0)
    graph = model._wiring.graph
    with tf.device(model.plan.stages[0].device):
        values = {spec.ref: cost_lib.random_input(layer_graph.TensorSpec(spec.shape, spec.dtype), batch_size, rng)
                  for spec in graph.inputs}
    inputs = layer_graph.fill(graph.input_structure, values.__getitem__)
    saved = [v.numpy() for v in model.non_trainable_variables]

    def step_for(m: int) -> Any:
        @tf.function
        def step() -> Any:
            with tf.GradientTape() as tape:
                outputs = model(inputs, training=True)
                total = tf.add_n([tf.reduce_sum(tf.cast(o, tf.float32)) for o in keras.tree.flatten(outputs)])
            return tape.gradient(total, model.trainable_variables)

        previous, model._microbatches = model._microbatches, m
        try:
            return step.get_concrete_function()
        finally:
            model._microbatches = previous

    try:
        return gpipe.tune_microbatches(step_for, batch_size)
    finally:
        for variable, value in zip(model.non_trainable_variables, saved):
            variable.assign(value)


def _with_microbatches(model: SplitModel, m: int, timings: Mapping[int, float]) -> SplitModel:
    model._microbatches = m
    model._plan = dataclasses.replace(model._plan, microbatches=m)
    model._timings = types.MappingProxyType(dict(timings))
    return model


def _placed(device: str, scope: str, fn: Any, inputs: list[tf.Tensor]) -> list[tf.Tensor]:
    """``fn(inputs)`` with its forward ops *and its gradient ops* on `device`.

    TensorFlow creates gradient ops without a device (they land on the default device), so the
    backward pass is recomputed from an inner tape inside a custom gradient that runs under the
    device scope; gradients of the variables `fn` reads are returned to the outer tape too.
    """

    @tf.custom_gradient
    def wrapped(*flat: tf.Tensor) -> Any:
        floats = [t for t in flat if t.dtype.is_floating]
        with tf.GradientTape() as tape:
            tape.watch(floats)
            with tf.device(device), tf.name_scope(scope):
                outputs = list(fn(list(flat)))
        watched = {v.ref() for v in tape.watched_variables()}

        def grad(*dys: tf.Tensor, variables: Sequence[tf.Variable] | None = None) -> Any:
            variables = list(variables or [])
            targets = [(o, dy) for o, dy in zip(outputs, dys) if o.dtype.is_floating]
            trainable = [v for v in variables if v.ref() in watched and v.dtype.is_floating]
            sources = floats + trainable
            grads: list[Any] = [None] * len(sources)
            if targets and sources:
                with tf.device(device), tf.name_scope(f"{scope}_backward"):
                    grads = tape.gradient(
                        [o for o, _ in targets],
                        sources,
                        output_gradients=[tf.zeros_like(o) if dy is None else dy for o, dy in targets],
                    )
            by_source = {id(src): g for src, g in zip(sources, grads)}
            input_grads = [by_source.get(id(t)) for t in flat]
            if variables:
                return input_grads, [by_source.get(id(v)) for v in variables]
            return input_grads

        return outputs, grad

    with tf.device(device):  # the IdentityN that tf.custom_gradient adds goes here too
        return list(wrapped(*inputs))


def _call(layer: Any, node: layer_graph.Node, values: Mapping[layer_graph.TensorRef, Any]) -> list[Any]:
    outputs = layer(*layer_graph.fill(node.args, values.__getitem__), **layer_graph.fill(node.kwargs, values.__getitem__))
    return keras.tree.flatten(outputs)


def _blocks(
    graph: layer_graph.LayerGraph,
    names: Sequence[str],
    layers: Mapping[str, Any],
    sent: Sequence[layer_graph.TensorRef],
) -> tuple[_Block, ...]:
    """Cuts a stage into runs of nodes, each batch-statistics layer (per `layers`) on its own."""
    groups: list[tuple[bool, list[layer_graph.Node]]] = []
    for name in names:
        node = graph.node(name)
        barrier = name in layers and _uses_batch_statistics(layers[name])
        if barrier or not groups or groups[-1][0]:
            groups.append((barrier, [node]))
        else:
            groups[-1][1].append(node)
    blocks = []
    for k, (barrier, nodes) in enumerate(groups):
        own = {n.name for n in nodes}
        later = {ref for _, rest in groups[k + 1:] for n in rest for ref in n.inputs} | set(sent)
        inputs = dict.fromkeys(ref for n in nodes for ref in n.inputs if ref.layer not in own)
        outputs = dict.fromkeys(ref for ref in later if ref.layer in own)
        blocks.append(_Block(barrier, tuple(nodes), tuple(inputs), tuple(sorted(outputs, key=_order(nodes)))))
    return tuple(blocks)


def _order(nodes: Sequence[layer_graph.Node]) -> Any:
    position = {n.name: i for i, n in enumerate(nodes)}
    return lambda ref: (position[ref.layer], ref.index)


def _uses_batch_statistics(layer: Any) -> bool:
    if isinstance(layer, keras.layers.BatchNormalization):
        return True
    if isinstance(layer, keras.Model):
        return any(_uses_batch_statistics(inner) for inner in layer.layers)
    return False


def _bind_inputs(graph: layer_graph.LayerGraph, inputs: Any) -> dict[layer_graph.TensorRef, tf.Tensor]:
    structure = graph.input_structure
    specs = {spec.ref: spec for spec in graph.inputs}
    if isinstance(structure, layer_graph.TensorRef):
        if isinstance(inputs, (list, tuple)) and len(inputs) == 1:
            inputs = inputs[0]
        pairs = [(structure, inputs)]
    elif isinstance(structure, Mapping):
        if not isinstance(inputs, Mapping):
            raise ValueError(
                f"Expected a dict of inputs with keys {sorted(structure)}. Received: inputs of type {type(inputs).__name__}"
            )
        pairs = [(structure[k], inputs[k]) for k in structure]
    else:
        if isinstance(inputs, Mapping):
            inputs = [inputs[specs[ref].name] for ref in structure]
        elif len(structure) == 1 and not isinstance(inputs, (list, tuple)):
            inputs = [inputs]
        if not isinstance(inputs, (list, tuple)) or len(inputs) != len(structure):
            raise ValueError(
                f"Expected a list of {len(structure)} inputs ({[r.layer for r in structure]}). "
                f"Received: inputs of type {type(inputs).__name__}"
            )
        pairs = list(zip(structure, inputs))
    bound = {}
    for ref, value in pairs:
        tensor = tf.convert_to_tensor(value)
        wanted = tf.as_dtype(specs[ref].dtype)
        bound[ref] = tf.cast(tensor, wanted) if tensor.dtype != wanted else tensor
    return bound


def _check_batch_norm(batch_norm: Any) -> None:
    if batch_norm not in BATCH_NORM_MODES:
        raise ValueError(f"Expected batch_norm to be one of {list(BATCH_NORM_MODES)}. Received: batch_norm={batch_norm!r}")


def _check_no_strategy(action: str) -> None:
    if not tf.distribute.has_strategy():
        return
    strategy = tf.distribute.get_strategy()
    raise RuntimeError(
        f"Cannot {action} inside a tf.distribute strategy scope. A split model spreads one model "
        "over several devices; TensorFlow's strategies run one replica per device and mirror or "
        "place every variable themselves, so a replica cannot span the stage devices (only "
        "TPUStrategy's logical-device assignment can). Received: strategy="
        f"{type(strategy).__name__} with {strategy.num_replicas_in_sync} replica(s). Fix: build "
        "and train the split model outside tfpar.scope(...) (or in tfpar.scope('default')); for "
        "data parallelism, use tfpar.scope('mirrored') without tfpar.parallel.split()."
    )
