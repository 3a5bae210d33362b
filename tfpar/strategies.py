"""Strategy registry: a name -> factory table, `get_strategy()` and `scope()`.

A strategy name maps to a factory returning a real ``tf.distribute.Strategy``. Names are
case-insensitive; aliases are entries with preset options. Every strategy tfpar returns is
"managed": models trained under it get tfpar's correctness fixes (``tfpar._compat``; the
parameter-server ones through ``tfpar.coordinator.enable``; docs/interceptions.md lists them).

Built-in names:

* ``"auto"``: ``"multi_worker"`` (or ``"parameter_server"`` with ps tasks) when TF_CONFIG or Slurm
  describes more than one process; else ``"mirrored"`` when this host has more than one GPU (or
  more than one configured virtual device), otherwise ``"default"``; logs its pick at INFO level.
* ``"default"``: TensorFlow's default (no distribution) strategy.
* ``"one_device"``: ``tf.distribute.OneDeviceStrategy`` on one device.
* ``"mirrored"``: synchronous data parallelism over the devices of one host.
* ``"central_storage"``: variables on one device, computation mirrored over the others.
* ``"multi_worker"`` (alias ``"multi_worker_mirrored"``): synchronous data parallelism over hosts.
* ``"parameter_server"`` (alias ``"ps"``): asynchronous training with parameter servers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import keras
import tensorflow as tf

from tfpar import _compat, coordinator
from tfpar import cluster as cluster_lib
from tfpar import devices as device_lib
from tfpar._registry import Registry

logger = logging.getLogger("tfpar")

MIXED_PRECISION_POLICIES = ("mixed_float16", "mixed_bfloat16")
CROSS_DEVICE_OPS = ("auto", "nccl", "hierarchical_copy", "reduce_to_one")
COMMUNICATION = ("auto", "ring", "nccl")


@dataclasses.dataclass(frozen=True)
class StrategySpec:
    """A registry entry.

    Attributes:
        name: The lower-case registry name.
        factory: Callable returning a ``tf.distribute.Strategy``.
        description: One line shown by ``tfpar doctor`` and in error messages.
        preset: Options passed to the factory before the caller's (aliases use this).
    """

    name: str
    factory: Callable[..., tf.distribute.Strategy]
    description: str
    preset: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def accepted_options(self) -> tuple[str, ...] | None:
        """Option names the factory takes, or None when it takes any (``**kwargs``)."""
        parameters = inspect.signature(self.factory).parameters.values()
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            return None
        return tuple(
            p.name
            for p in parameters
            if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
            and p.name not in self.preset
        )


# One registry helper for strategies and models: one normalization (case, spaces, '-' and '_'
# do not matter), aliases resolved at lookup time (they follow an override of the target), and
# one unknown-name error with the available names and the closest one.
_REGISTRY: Registry[StrategySpec] = Registry("strategy", argument="strategy")
_REGISTRY.alias("multi_worker_mirrored", "multi_worker")
_REGISTRY.alias("ps", "parameter_server")


# === Registry ===


def register_strategy(
    name: str,
    factory: Callable[..., tf.distribute.Strategy],
    *,
    description: str,
    override: bool = False,
    **preset: Any,
) -> None:
    """Adds a strategy name to the registry.

    Args:
        name: The name users pass to :func:`tfpar.scope` (case-insensitive).
        factory: Called with the user's options; returns a ``tf.distribute.Strategy``.
        description: One line describing the strategy.
        override: Replace an existing entry of the same name.
        **preset: Options always passed to `factory` (to register an alias of another strategy).

    Raises:
        TypeError: If `name` is not a non-empty string or `factory` is not callable.
        ValueError: If `name` is taken and `override` is False.

    Example:
    >>> import tensorflow as tf
    >>> tfpar.register_strategy(
    ...     "first_two_cpus",
    ...     lambda: tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]),
    ...     description="Mirrored over the first two CPUs",
    ... )
    >>> with tfpar.scope("first_two_cpus") as strategy:
    ...     print(strategy.num_replicas_in_sync)
    2
    """
    if not isinstance(name, str) or not name.strip():
        raise TypeError(
            f"Expected `name` to be a non-empty str. Received: name={name!r} "
            f"(of type {type(name).__name__})"
        )
    if not callable(factory):
        raise TypeError(
            f"Expected `factory` to be callable. Received: factory={factory!r} "
            f"(of type {type(factory).__name__})"
        )
    key = name.strip().lower()
    _REGISTRY.register(key, StrategySpec(key, factory, str(description), dict(preset)), override=override)


def unregister_strategy(name: str) -> None:
    """Removes a registered name (raises ValueError if it is not registered).

    Example:
    >>> tfpar.strategies.unregister_strategy("first_two_cpus")
    """
    _lookup(name)  # the house TypeError for a non-string
    _REGISTRY.unregister(name)


def available_strategies() -> list[str]:
    """Lists the registered strategy names, sorted.

    Example:
    >>> "mirrored" in tfpar.available_strategies()
    True
    """
    return _REGISTRY.names()


def describe_strategies() -> dict[str, str]:
    """Returns ``{name: description}`` for every registered name.

    Example:
    >>> tfpar.strategies.describe_strategies()["mirrored"]
    'synchronous data parallelism over the devices of one host'
    """
    return {name: _lookup(name).description for name in available_strategies()}


def _lookup(name: str) -> StrategySpec:
    if not isinstance(name, str):
        hint = ""
        if name is None or name is False:
            hint = " To train without distribution, use 'default'."
        raise TypeError(
            "Expected a strategy name (str) or a tf.distribute.Strategy. "
            f"Received: strategy={name!r} (of type {type(name).__name__}).{hint}"
        )
    return _REGISTRY.get(name)


# === Lookup ===


def get_strategy(
    strategy: str | tf.distribute.Strategy = "auto", **options: Any
) -> tf.distribute.Strategy:
    """Returns the ``tf.distribute.Strategy`` for a name (or the given strategy).

    Args:
        strategy: A registered name (see :func:`available_strategies`) or a strategy instance,
            which is returned as is (and gets tfpar's fixes).
        **options: Options of that strategy, e.g. ``devices=[...]`` and ``cross_device_ops=`` for
            ``"mirrored"``. Options a strategy does not take are rejected by name.

    Returns:
        The real ``tf.distribute.Strategy``.

    Raises:
        TypeError: If `strategy` is neither a string nor a Strategy, or an option is unknown.
        ValueError: If the name is unknown (the message lists valid names and suggests the
            closest) or an option value is invalid.
        ConnectionError: For a parameter-server strategy, if a worker cannot reach a ps task
            within a minute of connecting.

    Example:
    >>> strategy = tfpar.get_strategy("mirrored", devices=["cpu:0", "cpu:1"])
    >>> strategy.num_replicas_in_sync
    2
    """
    if isinstance(strategy, tf.distribute.Strategy):
        if options:
            raise TypeError(
                "Options apply only when a strategy name is given; this strategy is already "
                f"built. Received: options={sorted(options)} with strategy={strategy!r}"
            )
        return strategy if strategy is _default_strategy() else _manage(strategy)
    spec = _lookup(strategy)
    for scope_only in ("mixed_precision", "sync_batchnorm"):
        if scope_only in options:
            raise TypeError(
                f"`{scope_only}` is an option of tfpar.scope(), which restores it on exit; "
                f"get_strategy() cannot. Use `with tfpar.scope({spec.name!r}, {scope_only}=...)`."
            )
    accepted = spec.accepted_options()
    if accepted is not None:
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            valid = ", ".join(accepted) if accepted else "none"
            raise TypeError(
                f"Strategy {spec.name!r} does not take option(s) {unknown}. "
                f"Its options: {valid}. Received: {options}"
            )
    result = spec.factory(**{**spec.preset, **options})
    if not isinstance(result, tf.distribute.Strategy):
        raise TypeError(
            f"The factory registered as {spec.name!r} must return a tf.distribute.Strategy. "
            f"Received: {result!r} (of type {type(result).__name__})"
        )
    if result is _default_strategy():
        # No distribution, nothing to fix; and managing TensorFlow's global default strategy would
        # change every model in the process, tfpar's or not.
        return result
    return _manage(result)


def _manage(strategy: tf.distribute.Strategy) -> tf.distribute.Strategy:
    """Applies tfpar's fixes to `strategy`'s models (a ParameterServerStrategy: and its loops)."""
    if isinstance(strategy, tf.distribute.ParameterServerStrategy):
        return coordinator.enable(strategy)
    return _compat.manage(strategy)


@contextlib.contextmanager
def scope(
    strategy: str | tf.distribute.Strategy = "auto",
    *,
    mixed_precision: str | None = None,
    sync_batchnorm: bool = False,
    **options: Any,
) -> Iterator[tf.distribute.Strategy]:
    """Opens a distribution scope: models built inside train in parallel with plain Keras.

    On exit (also on an exception) the previous strategy and Keras dtype policy are restored.

    Args:
        strategy: A registered name (see :func:`available_strategies`) or a Strategy instance.
        mixed_precision: ``"mixed_float16"`` or ``"mixed_bfloat16"`` sets the Keras dtype policy
            inside the scope; None leaves it unchanged.
        sync_batchnorm: Make ``keras.layers.BatchNormalization`` layers created inside the scope
            synchronize their batch statistics over replicas (``synchronized=True``), so results
            do not depend on the replica count.
        **options: Strategy options, e.g. ``devices=["gpu:0", "gpu:1"]`` or
            ``cross_device_ops="reduce_to_one"`` for ``"mirrored"``.

    Yields:
        The real ``tf.distribute.Strategy``.

    Raises:
        TypeError, ValueError, ConnectionError: As :func:`get_strategy`, and for an unknown
            `mixed_precision`.
        RuntimeError: If another strategy's scope is already open.

    Example:
    >>> import keras, tfpar
    >>> with tfpar.scope("mirrored") as strategy:
    ...     model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    ...     model.compile(optimizer="sgd", loss="mse")
    >>> strategy.num_replicas_in_sync
    4
    """
    if mixed_precision is not None and mixed_precision not in MIXED_PRECISION_POLICIES:
        raise ValueError(
            f"Expected mixed_precision to be one of {list(MIXED_PRECISION_POLICIES)} or None. "
            f"Received: mixed_precision={mixed_precision!r}"
        )
    if not isinstance(sync_batchnorm, bool):
        raise TypeError(f"Expected sync_batchnorm to be a bool. Received: sync_batchnorm={sync_batchnorm!r}")
    if isinstance(strategy, str) and tf.distribute.has_strategy():
        # Before the factory runs: creating a strategy has side effects (multi_worker configures
        # the process's collective runtime for good).
        raise RuntimeError(
            f"Cannot open tfpar.scope({strategy!r}) inside the scope of another strategy "
            f"({type(tf.distribute.get_strategy()).__name__}). Close the outer scope first; a model "
            "belongs to the strategy it was built under."
        )
    resolved = get_strategy(strategy, **options)
    outer = tf.distribute.get_strategy() if tf.distribute.has_strategy() else None
    if outer is not None and outer is not resolved:
        raise RuntimeError(
            f"Cannot open tfpar.scope({strategy!r}) inside the scope of another strategy "
            f"({type(outer).__name__}). Close the outer scope first; a model belongs to the "
            "strategy it was built under."
        )
    previous_policy = keras.config.dtype_policy()
    with contextlib.ExitStack() as stack:
        stack.enter_context(resolved.scope())
        if sync_batchnorm:
            stack.enter_context(_compat.synchronized_batchnorm())
        if mixed_precision is not None:
            keras.config.set_dtype_policy(mixed_precision)
            stack.callback(keras.config.set_dtype_policy, previous_policy)
        yield resolved


def strategy_name(strategy: tf.distribute.Strategy) -> str:
    """The public class name of a strategy (TF's MultiWorkerMirroredStrategy reports an alias).

    Example:
    >>> tfpar.strategies.strategy_name(tfpar.get_strategy("mirrored"))
    'MirroredStrategy'
    """
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return "MultiWorkerMirroredStrategy"
    if not tf.distribute.has_strategy() and strategy is tf.distribute.get_strategy():
        return "default"
    return type(strategy).__name__


# === Built-in factories ===


def _default_strategy() -> tf.distribute.Strategy | None:
    return None if tf.distribute.has_strategy() else tf.distribute.get_strategy()



def _default() -> tf.distribute.Strategy:
    if tf.distribute.has_strategy():
        raise RuntimeError(
            "The 'default' strategy is what TensorFlow uses outside any strategy scope; it cannot "
            "be requested inside another strategy's scope. Close that scope first."
        )
    return tf.distribute.get_strategy()


def _one_device(device: str | None = None, devices: Sequence[str] | None = None) -> tf.distribute.Strategy:
    if device is not None and devices is not None:
        raise ValueError(
            "Pass either `device` or `devices` (a list of one). "
            f"Received: device={device!r}, devices={devices!r}"
        )
    if devices is not None:
        chosen = device_lib.validate_devices(devices)
        if len(chosen) != 1:
            raise ValueError(
                f"Strategy 'one_device' runs on exactly one device. Received: devices={list(devices)!r}. "
                "Use 'mirrored' for several."
            )
        target = chosen[0]
    elif device is not None:
        target = device_lib.validate_devices([device])[0]
    else:
        target = device_lib.default_replica_devices()[0]
    return tf.distribute.OneDeviceStrategy(target)


def _cross_device_ops(choice: Any, replica_devices: Sequence[str]) -> tf.distribute.CrossDeviceOps | None:
    if isinstance(choice, tf.distribute.CrossDeviceOps):
        return choice
    if choice not in CROSS_DEVICE_OPS:
        raise ValueError(
            f"Expected cross_device_ops to be one of {list(CROSS_DEVICE_OPS)} or a "
            f"tf.distribute.CrossDeviceOps. Received: cross_device_ops={choice!r}"
        )
    if choice in ("nccl", "hierarchical_copy") and not all("GPU" in d for d in replica_devices):
        raise ValueError(
            f"cross_device_ops={choice!r} needs every replica on a GPU. Received: devices="
            f"{list(replica_devices)}. Use 'reduce_to_one' (or 'auto') for CPU devices."
        )
    if choice == "nccl":
        return tf.distribute.NcclAllReduce()
    if choice == "hierarchical_copy":
        return tf.distribute.HierarchicalCopyAllReduce()
    if choice == "reduce_to_one":
        return tf.distribute.ReductionToOneDevice()
    return None


def _mirrored(
    devices: Sequence[str] | None = None, cross_device_ops: Any = "auto"
) -> tf.distribute.Strategy:
    replica_devices = (
        device_lib.validate_devices(devices) if devices is not None else _default_devices()
    )
    ops = _cross_device_ops(cross_device_ops, replica_devices)
    _compat.bump_collective_key_base()
    return tf.distribute.MirroredStrategy(replica_devices, cross_device_ops=ops)


def _default_devices() -> list[str]:
    return device_lib.default_replica_devices()


def _central_storage(
    devices: Sequence[str] | None = None, parameter_device: str | None = None
) -> tf.distribute.Strategy:
    compute = device_lib.validate_devices(devices) if devices is not None else _default_devices()
    parameter = device_lib.validate_devices([parameter_device])[0] if parameter_device else None
    return tf.distribute.experimental.CentralStorageStrategy(compute, parameter_device=parameter)


def _auto(devices: Sequence[str] | None = None, cross_device_ops: Any = "auto") -> tf.distribute.Strategy:
    info = cluster_lib.detect()
    if info is not None:
        name = "parameter_server" if info.num_ps else "multi_worker"
        logger.info(
            "tfpar: strategy 'auto' picked %r: %s describes %d worker(s)%s",
            name,
            "TF_CONFIG" if info.source == "tf_config" else "Slurm",
            info.num_workers + int(info.has_chief),
            f" and {info.num_ps} ps" if info.num_ps else "",
        )
        if devices is not None:
            raise ValueError(
                f"`devices` applies to one host; strategy 'auto' picked {name!r} from the cluster "
                f"definition. Received: devices={list(devices)!r}"
            )
        return get_strategy(name)
    candidates = device_lib.validate_devices(devices) if devices is not None else _default_devices()
    if len(candidates) > 1:
        logger.info(
            "tfpar: strategy 'auto' picked 'mirrored' over %d devices: %s",
            len(candidates),
            ", ".join(candidates),
        )
        return _mirrored(candidates, cross_device_ops)
    logger.info("tfpar: strategy 'auto' picked 'default' (one device: %s)", candidates[0])
    return _default()


def _multi_worker(
    cluster: Any = "tf_config",
    communication: str = "auto",
    collective_timeout: float | None = None,
    bytes_per_pack: int = 0,
) -> tf.distribute.Strategy:
    if communication not in COMMUNICATION:
        raise ValueError(
            f"Expected communication to be one of {list(COMMUNICATION)}. "
            f"Received: communication={communication!r}"
        )
    if collective_timeout is not None and collective_timeout <= 0:
        raise ValueError(f"Expected collective_timeout > 0 seconds. Received: collective_timeout={collective_timeout!r}")
    if isinstance(bytes_per_pack, bool) or not isinstance(bytes_per_pack, int) or bytes_per_pack < 0:
        raise ValueError(
            "Expected bytes_per_pack to be an int >= 0 (0: one all-reduce per gradient). "
            f"Received: bytes_per_pack={bytes_per_pack!r}"
        )
    resolver = cluster_lib.resolve(cluster)
    if communication == "nccl" and not tf.config.list_physical_devices("GPU"):
        raise ValueError(
            "communication='nccl' needs GPUs and this host has none. Received: "
            "communication='nccl'. Use 'ring' (or 'auto') on CPUs."
        )
    implementation = {
        "auto": tf.distribute.experimental.CommunicationImplementation.AUTO,
        "ring": tf.distribute.experimental.CommunicationImplementation.RING,
        "nccl": tf.distribute.experimental.CommunicationImplementation.NCCL,
    }[communication]
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=implementation, timeout_seconds=collective_timeout, bytes_per_pack=bytes_per_pack
    )
    try:
        return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver, communication_options=options)
    except RuntimeError as error:
        if "program startup" not in str(error):
            raise
        raise RuntimeError(
            "The 'multi_worker' strategy must be created before TensorFlow runs its first "
            "operation (it configures the process's collective runtime). Call "
            "tfpar.get_strategy('multi_worker') (or open tfpar.scope('multi_worker')) at the top "
            "of the program, before building datasets or tensors; in a notebook, restart the "
            "kernel and create it first."
        ) from error


def _parameter_server(
    cluster: Any = "tf_config",
    *,
    variable_partitioner: Any = None,
    min_shard_bytes: int = 256 << 10,
    staleness: int | None = None,
) -> tf.distribute.Strategy:
    return coordinator.parameter_server_strategy(
        cluster,
        variable_partitioner=variable_partitioner,
        min_shard_bytes=min_shard_bytes,
        staleness=staleness,
    )


register_strategy("auto", _auto, description="mirrored when there are several devices, otherwise default")
register_strategy("default", _default, description="TensorFlow's default strategy (no distribution)")
register_strategy("one_device", _one_device, description="all computation and variables on one device")
register_strategy(
    "mirrored", _mirrored, description="synchronous data parallelism over the devices of one host"
)
register_strategy(
    "central_storage",
    _central_storage,
    description="variables on one device, computation mirrored over the others (one host)",
)
register_strategy(
    "multi_worker",
    _multi_worker,
    description="synchronous data parallelism over several hosts (MultiWorkerMirroredStrategy)",
)
register_strategy(
    "parameter_server",
    _parameter_server,
    description="asynchronous training with parameter servers (staleness=k: semi-asynchronous)",
)
