"""Devices: list, normalize and validate device names; configure virtual devices.

One canonical spelling is used everywhere in tfpar: TensorFlow's logical device name,
``"/device:CPU:0"``, ``"/device:GPU:1"`` (with a ``/job:...`` prefix kept when given). Users may
write ``"cpu:0"``, ``"CPU:0"``, ``"/cpu:0"``, ``"gpu"`` (meaning index 0) or pass a
``tf.config.LogicalDevice``; :func:`normalize_device` turns all of them into the canonical form.

Nothing in this module runs a TensorFlow op at import time: listing *physical* devices does not
initialize the runtime, listing *logical* devices does (so :func:`configure_virtual_devices` must
run before anything else touches TensorFlow).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from typing import Any

import tensorflow as tf

from tfpar._validation import check_int

DEVICE_TYPES = ("CPU", "GPU", "TPU")
#: Most logical devices :func:`configure_virtual_devices` makes from one physical device. Every
#: virtual device is a replica under ``tfpar.scope("mirrored")``: it holds a copy of every variable
#: and traces the training step once, so the first step's cost grows with the count (AlexNet at
#: width 0.25 on 2 shared cores: about 4-5 s per replica, so 8 replicas take about 40 s). 64
#: replicas already take minutes; more is almost certainly a typo.
MAX_VIRTUAL_DEVICES = 64

_DEVICE_RE = re.compile(
    r"^(?P<prefix>(/job:[^/]+)?(/replica:\d+)?(/task:\d+)?)"
    r"/?(device:)?(?P<type>[a-zA-Z_]+)(:(?P<index>\d+))?$"
)


def normalize_device(device: str | Any) -> str:
    """Returns the canonical name of a device, without checking that it exists.

    Args:
        device: A device string such as ``"cpu:0"``, ``"GPU:1"``, ``"/device:CPU:0"``,
            ``"/job:worker/task:1/device:CPU:0"``, a bare type (``"gpu"`` means index 0), or a
            ``tf.config.LogicalDevice``.

    Returns:
        The canonical name, e.g. ``"/device:CPU:0"``.

    Raises:
        TypeError: If `device` is not a string or a logical device.
        ValueError: If the string is not a device name.

    Example:
    >>> tfpar.devices.normalize_device("gpu:1")
    '/device:GPU:1'
    """
    if hasattr(device, "name") and hasattr(device, "device_type"):
        device = device.name
    if not isinstance(device, str):
        raise TypeError(
            "Expected a device name such as 'cpu:0' or '/device:GPU:1'. "
            f"Received: device={device!r} (of type {type(device).__name__})"
        )
    match = _DEVICE_RE.match(device.strip())
    if not match or match.group("type").upper() not in DEVICE_TYPES:
        raise ValueError(
            "Expected a device name such as 'cpu:0', 'gpu:1' or '/device:CPU:0' "
            f"(device types: {', '.join(DEVICE_TYPES)}). Received: device={device!r}"
        )
    index = int(match.group("index") or 0)
    return f"{match.group('prefix')}/device:{match.group('type').upper()}:{index}"


def list_devices(device_type: str | None = None) -> list[str]:
    """Lists the logical devices of this process in canonical form.

    This initializes the TensorFlow runtime (virtual devices cannot be configured afterwards).

    Args:
        device_type: ``"CPU"``, ``"GPU"`` or ``"TPU"`` (any case), or None for all.

    Returns:
        Canonical device names, e.g. ``["/device:CPU:0", "/device:CPU:1"]``.

    Example:
    >>> tfpar.devices.list_devices("cpu")
    ['/device:CPU:0']
    """
    kind = _check_type(device_type) if device_type is not None else None
    return [normalize_device(d) for d in tf.config.list_logical_devices(kind)]


def accelerator_count() -> int:
    """Returns how many logical GPUs (or, if none, TPUs) this process has.

    Example:
    >>> tfpar.devices.accelerator_count()
    0
    """
    gpus = tf.config.list_logical_devices("GPU")
    return len(gpus) if gpus else len(tf.config.list_logical_devices("TPU"))


def default_replica_devices() -> list[str]:
    """The devices data parallelism uses by default on this host.

    All GPUs if there are any, otherwise all logical CPUs (more than one only when virtual CPUs were
    configured with :func:`configure_virtual_devices`).

    Example:
    >>> tfpar.devices.default_replica_devices()
    ['/device:CPU:0', '/device:CPU:1']
    """
    gpus = list_devices("GPU")
    return gpus if gpus else list_devices("CPU")


def validate_devices(devices: Sequence[str | Any] | str, *, allow_empty: bool = False) -> list[str]:
    """Normalizes devices and checks that each exists on this host, once.

    Args:
        devices: A device or a sequence of devices (any spelling :func:`normalize_device` takes).
        allow_empty: Whether an empty sequence is accepted.

    Returns:
        The canonical names, in the given order.

    Raises:
        TypeError: If `devices` is not a string or a sequence of them.
        ValueError: If a device does not exist (the message lists the ones that do), appears twice,
            or the sequence is empty.

    Example:
    >>> tfpar.devices.validate_devices(["cpu:0", "cpu:1"])
    ['/device:CPU:0', '/device:CPU:1']
    """
    if isinstance(devices, str) or hasattr(devices, "device_type"):
        devices = [devices]
    if not isinstance(devices, Iterable):
        raise TypeError(
            "Expected a device name or a list of device names. "
            f"Received: devices={devices!r} (of type {type(devices).__name__})"
        )
    names = [normalize_device(d) for d in devices]
    if not names and not allow_empty:
        raise ValueError("Expected at least one device. Received: devices=[]")
    available = list_devices()
    local = {_strip_job(a) for a in available}
    for given, name in zip(devices, names):
        if name.startswith("/job:"):
            continue  # remote devices are checked by TensorFlow when the cluster connects
        if name not in local:
            close = difflib.get_close_matches(name, sorted(local), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"Device {given!r} does not exist on this host.{hint} Available devices: "
                f"{', '.join(available)}. To get more CPU devices for testing, call "
                "tfpar.configure_virtual_devices(n) before any other TensorFlow call."
            )
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(
            f"Each device may appear once. Received duplicates: {duplicates} in devices={list(devices)!r}"
        )
    return names


def configure_virtual_devices(
    n: int, device_type: str = "CPU", *, memory_limit_mb: int | None = None
) -> list[str]:
    """Splits the first physical device of a type into `n` logical devices.

    Virtual CPUs stand in for GPUs in tests and notebooks: ``tfpar.scope("mirrored")`` then runs
    `n` replicas on one machine. They share the machine's cores, so they prove behaviour, not speed.
    This must run before TensorFlow initializes (before the first op, model or strategy); calling it
    again with the same `n` is a no-op.

    Args:
        n: Number of logical devices, from 1 to :data:`MAX_VIRTUAL_DEVICES` (64): each one is a
            replica that copies every variable and traces the training step, so the first step
            takes longer with every device added.
        device_type: ``"CPU"`` or ``"GPU"``.
        memory_limit_mb: Memory per logical GPU in MiB, an int >= 1 (required by TensorFlow for
            GPUs; default 1024). Ignored for CPUs.

    Returns:
        The canonical names of the logical devices of that type, e.g.
        ``["/device:CPU:0", ..., "/device:CPU:3"]``.

    Raises:
        TypeError: If `n` or `memory_limit_mb` is not an int.
        ValueError: If `n` is not in 1..64, `memory_limit_mb` < 1, the type is unknown, or there
            is no such physical device.
        RuntimeError: If TensorFlow already initialized with a different configuration; the message
            says to call this first (or restart the notebook kernel).

    Example:
    >>> import tfpar
    >>> tfpar.configure_virtual_devices(4)
    ['/device:CPU:0', '/device:CPU:1', '/device:CPU:2', '/device:CPU:3']
    """
    check_int("n", n)
    if not 1 <= n <= MAX_VIRTUAL_DEVICES:
        raise ValueError(
            f"Expected 1 <= n <= {MAX_VIRTUAL_DEVICES} virtual devices. Received: n={n}. Every "
            "virtual device is a replica that copies the model's variables and traces the "
            "training step (about 4-5 s per replica for a small AlexNet on 2 CPU cores), and "
            f"all of them share this machine's cores. Fix: use at most {MAX_VIRTUAL_DEVICES} "
            "(2-8 are enough to test data parallelism)."
        )
    check_int("memory_limit_mb", memory_limit_mb, minimum=1, allow_none=True,
              expected="an int >= 1 (MiB per logical GPU) or None")
    kind = _check_type(device_type)
    if kind == "TPU":
        raise ValueError("Virtual devices can be made from CPU or GPU. Received: device_type='TPU'")
    physical = tf.config.list_physical_devices(kind)
    if not physical:
        raise ValueError(
            f"This machine has no physical {kind}, so it cannot be split into virtual {kind}s. "
            f"Received: device_type={device_type!r}. Use device_type='CPU' instead."
        )
    if kind == "GPU":
        limit = 1024 if memory_limit_mb is None else memory_limit_mb
        configs = [tf.config.LogicalDeviceConfiguration(memory_limit=limit) for _ in range(n)]
    else:
        configs = [tf.config.LogicalDeviceConfiguration() for _ in range(n)]
    current = tf.config.get_logical_device_configuration(physical[0])
    if (current is not None and len(current) == n) or (current is None and n == 1 and kind == "CPU"):
        return _names(kind, n, len(physical))  # already so (an unsplit CPU is one device)
    try:
        tf.config.set_logical_device_configuration(physical[0], configs)
    except RuntimeError as error:
        have = len(current) if current else 1
        raise RuntimeError(
            f"TensorFlow has already initialized its devices ({have} logical {kind}), so they can "
            f"no longer be split into {n}. Call tfpar.configure_virtual_devices({n}) before any "
            "other TensorFlow call (first line of the script, or first cell of the notebook), "
            "or restart the notebook kernel and run it first."
        ) from error
    return _names(kind, n, len(physical))


def _names(kind: str, n: int, physical_count: int) -> list[str]:
    # Computed without listing logical devices, which would initialize the runtime.
    return [f"/device:{kind}:{i}" for i in range(n + physical_count - 1)]


def _check_type(device_type: str) -> str:
    if not isinstance(device_type, str):
        raise TypeError(
            f"Expected device_type to be a str, one of {list(DEVICE_TYPES)}. "
            f"Received: device_type={device_type!r} (of type {type(device_type).__name__})"
        )
    if device_type.upper() not in DEVICE_TYPES:
        raise ValueError(
            f"Expected device_type to be one of {list(DEVICE_TYPES)}. "
            f"Received: device_type={device_type!r}"
        )
    return device_type.upper()


def _strip_job(name: str) -> str:
    return name[name.index("/device:"):] if "/device:" in name else name
