"""Per-model state: closures (tf.functions), staleness variables, the coordinator runner."""

from __future__ import annotations

import contextlib
import gc
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import keras
import tensorflow as tf

from tfpar._compat import internals
from tfpar.coordinator._common import STALENESS_POLL_SECONDS, STALENESS_TIMEOUT_SECONDS, options


class Closures:
    """The tf.functions scheduled on workers for one compiled model (rebuilt after compile)."""

    def __init__(self, compiled: tuple[Any, ...]) -> None:
        self.compiled = compiled  # what compile() created; a new compile means new functions
        self.functions: dict[Any, Any] = {}

    def get(self, name: str, spec: Any, build: Callable[[], Callable[..., Any]]) -> Any:
        """The tf.function `name` for inputs of structure `spec` (built once per structure)."""
        key = (name, repr(spec))
        if key not in self.functions:
            self.functions[key] = tf.function(build(), autograph=False, reduce_retracing=True)
        return self.functions[key]


class _Staleness:
    """Parameter-server state for bounded staleness: per-worker step clocks and running flags."""

    def __init__(self, strategy: tf.distribute.Strategy, workers: int, bound: int) -> None:
        self.workers = workers
        self.bound = bound
        with strategy.scope():
            # Scalars are never partitioned; the vectors are colocated with the first scalar so
            # that a variable_partitioner does not shard them either.
            self.started = tf.Variable(0, dtype=tf.int64, trainable=False, name="tfpar_started")
            with strategy.extended.colocate_vars_with(self.started):
                self.planned = tf.Variable(0, dtype=tf.int64, trainable=False, name="tfpar_planned")
                self.clock = tf.Variable(tf.zeros([workers], tf.int64), trainable=False, name="tfpar_clock")
                self.running = tf.Variable(tf.zeros([workers], tf.int64), trainable=False, name="tfpar_running")

    def reset(self) -> None:
        self.started.assign(0)
        self.planned.assign(0)
        self.clock.assign(tf.zeros([self.workers], tf.int64))
        self.running.assign(tf.zeros([self.workers], tf.int64))

    def plan(self, closures: int) -> None:
        if closures:
            self.planned.assign_add(closures)

    # -- graph pieces (inside closures) ---------------------------------------------------------

    def enter(self) -> tf.Operation:
        return self.started.assign_add(1, read_value=False)

    def gate(self, worker: tf.Tensor) -> tf.Tensor:
        """Waits until `worker` may start a step; False when it must give the step back."""
        bound = tf.constant(self.bound, tf.int64)
        start = tf.timestamp()

        def decide() -> tuple[tf.Tensor, tf.Tensor]:
            clock = self.clock.read_value()
            mine = tf.gather(clock, worker)
            allowed = mine - tf.reduce_min(clock) <= bound
            unstarted = self.planned.read_value() - self.started.read_value()
            slower = tf.less(clock, mine - bound)
            slower_running = tf.reduce_any(tf.logical_and(slower, self.running.read_value() > 0))
            in_time = tf.timestamp() - start < STALENESS_TIMEOUT_SECONDS
            wait = tf.logical_and(
                tf.logical_not(allowed),
                tf.logical_and(tf.logical_or(unstarted > 0, slower_running), in_time),
            )
            return allowed, wait

        def body(allowed: tf.Tensor, wait: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            with tf.control_dependencies([_sleep(STALENESS_POLL_SECONDS)]):
                return decide()

        allowed, _ = tf.while_loop(lambda allowed, wait: wait, body, decide())
        return allowed

    def begin_step(self, worker: tf.Tensor) -> Any:
        return self.running.scatter_update(tf.IndexedSlices(tf.ones([1], tf.int64), tf.reshape(worker, [1])))

    def end_step(self, worker: tf.Tensor) -> Any:
        index = tf.reshape(worker, [1])
        ticked = self.clock.scatter_add(tf.IndexedSlices(tf.ones([1], tf.int64), index))
        with tf.control_dependencies([ticked]):
            return self.running.scatter_update(tf.IndexedSlices(tf.zeros([1], tf.int64), index))


def _sleep(seconds: float) -> tf.Tensor:
    """A graph op that sleeps on the device running it (a one-element SleepDataset)."""
    dataset = tf.data.Dataset.from_tensors(tf.constant(0, tf.int64))
    variant = tf.raw_ops.SleepDataset(
        input_dataset=tf.data.experimental.to_variant(dataset),
        sleep_microseconds=tf.constant(int(seconds * 1e6), tf.int64),
        output_types=[tf.int64],
        output_shapes=[tf.TensorShape([])],
    )
    return tf.data.experimental.from_variant(variant, tf.TensorSpec([], tf.int64)).get_single_element()


class Runner:
    """Everything one model needs to run on one ParameterServerStrategy."""

    def __init__(self, model: keras.Model, strategy: tf.distribute.ParameterServerStrategy) -> None:
        self.model = model
        self.strategy = strategy
        self.coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)  # a singleton per strategy
        self.workers = internals.num_workers(strategy)
        self.options = options(strategy)
        self._closures: Closures | None = None
        self.staleness: _Staleness | None = None
        if self.options.staleness is not None:
            self.staleness = _Staleness(strategy, self.workers, self.options.staleness)

    # -- closures ------------------------------------------------------------------------------

    def closures(self) -> Closures:
        # The traced functions capture the optimizer, compiled loss and metrics: a model compiled
        # again gets freshly traced ones. (Keras's own train_function etc. are left alone, so
        # train_on_batch and friends keep working.)
        compiled = internals.compiled_state(self.model)
        current = self._closures
        if current is None or len(current.compiled) != len(compiled) or any(
            a is not b for a, b in zip(current.compiled, compiled)
        ):
            current = self._closures = Closures(compiled)
        return current

    def reduce_mean(self, outputs: Any) -> Any:
        def reduce(value: Any) -> Any:
            if isinstance(value, tf.distribute.DistributedValues):
                return tf.reduce_mean(tf.stack(self.strategy.experimental_local_results(value)), axis=0)
            return value

        return tf.nest.map_structure(reduce, outputs)

    def reduce_concat(self, outputs: Any) -> Any:
        def reduce(value: Any) -> Any:
            if isinstance(value, tf.distribute.DistributedValues):
                return tf.concat(self.strategy.experimental_local_results(value), axis=0)
            return value

        return tf.nest.map_structure(reduce, outputs)

    def step(self, method: Callable[[Any], Any], data: Any, reduce: str = "mean") -> Any:
        outputs = self.strategy.run(method, args=(data,))
        return self.reduce_mean(outputs) if reduce == "mean" else self.reduce_concat(outputs)

    # -- worker-side step loops ------------------------------------------------------------------

    def run_steps(
        self, count: int, one_step: Callable[[tf.Tensor], Any], structure: Any = None
    ) -> tuple[tf.Tensor, Any]:
        """Runs ``one_step(i)`` for i < count inside a closure; returns (steps run, last outputs).

        `count` is a Python int (part of the traced function, so nothing is sent per closure;
        there are at most two values: steps_per_execution and an epoch's remainder). With bounded
        staleness every step first passes the gate; `structure` (the step's output structure,
        from :meth:`output_structure`) gives the outputs of a closure that ran no step.
        """
        staleness = self.staleness if structure is not None else None
        optimizer = self.model.optimizer
        n = tf.constant(count, tf.int64)
        one = tf.constant(1, tf.int64)
        if staleness is None and count == 1:
            return one, one_step(tf.constant(0, tf.int64))
        if staleness is None:
            def body(i: tf.Tensor, outputs: Any) -> tuple[Any, ...]:
                return i + 1, one_step(i)

            first = one_step(tf.constant(0, tf.int64))
            _, outputs = tf.while_loop(
                lambda i, outputs: i < n, body, (one, first),
                shape_invariants=(tf.TensorShape([]), _relaxed(first)),
            )
            return n, outputs

        # experimental_get_current_worker_index() fails inside tf.cond branches ("You must feed a
        # value for placeholder tensor 'cond/then/...'"), so it is read here, at the top level,
        # and steps are made conditional with while loops that run at most once.
        worker = tf.distribute.coordinator.experimental_get_current_worker_index()

        def accounted(i: tf.Tensor) -> Any:
            with tf.control_dependencies([staleness.begin_step(worker)]):
                outputs = one_step(i)
            # The clock ticks after the optimizer's last update of this step.
            after = [optimizer.iterations.value.read_value()] if optimizer is not None else []
            with tf.control_dependencies(tf.nest.flatten(outputs) + after):
                done = staleness.end_step(worker)
            with tf.control_dependencies([done]):
                return tf.nest.map_structure(tf.identity, outputs)

        with tf.control_dependencies([staleness.enter()]):
            go = staleness.gate(worker)
        shapes = spec_shapes(structure)
        first = run_if(go, lambda: accounted(tf.constant(0, tf.int64)), spec_zeros(structure), shapes)

        def gated_body(i: tf.Tensor, ran: tf.Tensor, alive: tf.Tensor, outputs: Any) -> tuple[Any, ...]:
            go = staleness.gate(worker)
            outputs = run_if(go, lambda: accounted(i), outputs, shapes)
            return i + 1, ran + tf.cast(go, tf.int64), go, outputs

        _, ran, _, outputs = tf.while_loop(
            lambda i, ran, alive, outputs: tf.logical_and(i < n, alive),
            gated_body,
            (one, tf.cast(go, tf.int64), go, first),
            shape_invariants=(tf.TensorShape([]), tf.TensorShape([]), tf.TensorShape([]), shapes),
        )
        return ran, outputs

    def output_structure(self, method: Callable[[Any], Any], data_spec: Any, reduce: str = "mean") -> Any:
        """The (shape, dtype) structure of ``step(method, batch)``, from a trace on the coordinator."""
        function = tf.function(lambda data: self.step(method, data, reduce), autograph=False)
        with internals.tracing_outside_schedule(self.strategy):
            concrete = function.get_concrete_function(data_spec)
        return tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), concrete.structured_outputs)


def _relaxed(structure: Any) -> Any:
    return tf.nest.map_structure(lambda t: tf.TensorShape(None), structure)


def spec_zeros(structure: Any) -> Any:
    """Zeros for a structure of TensorSpecs (unknown dimensions become 0)."""
    return tf.nest.map_structure(zeros_of_spec, structure)


def zeros_of_spec(spec: tf.TensorSpec) -> tf.Tensor:
    shape = spec.shape
    if shape.rank is None:
        return tf.zeros([], spec.dtype)
    return tf.zeros([d if d is not None else 0 for d in shape.as_list()], spec.dtype)


def run_if(pred: tf.Tensor, function: Callable[[], Any], otherwise: Any, shapes: Any) -> Any:
    """``function()`` if `pred` else `otherwise`, as a while loop that runs at most once.

    (Not tf.cond: a step inside a cond branch cannot use
    tf.distribute.coordinator.experimental_get_current_worker_index().) `shapes` are the static
    shapes the result may have (TensorShapes, unknown dimensions as None).
    """
    def body(go: tf.Tensor, outputs: Any) -> tuple[Any, ...]:
        return tf.constant(False), function()

    _, result = tf.while_loop(
        lambda go, outputs: go, body, (pred, otherwise), shape_invariants=(tf.TensorShape([]), shapes)
    )
    return result


def spec_shapes(structure: Any) -> Any:
    return tf.nest.map_structure(lambda spec: spec.shape, structure)


_RUNNERS: weakref.WeakKeyDictionary[keras.Model, Runner] = weakref.WeakKeyDictionary()


def runner_for(model: keras.Model) -> Runner:
    strategy = model.distribute_strategy
    runner = _RUNNERS.get(model)
    if runner is None or runner.strategy is not strategy:
        runner = Runner(model, strategy)
        _RUNNERS[model] = runner
    return runner


@contextlib.contextmanager
def collecting_garbage() -> Iterator[None]:
    """Collects garbage first, while no step runs on the workers.

    Input pipelines and functions left over by earlier calls are removed from the cluster when
    they are garbage-collected, and removing a function waits for the steps running at the time
    (measured: 0.9 s for the per-worker pipeline of a 24 MB in-memory dataset). Collected here,
    that happens before this call schedules anything instead of stalling one of its epochs.
    """
    gc.collect()
    yield
