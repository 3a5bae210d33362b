"""tfpar.devices: normalization, validation, virtual devices."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import tensorflow as tf

import tfpar
from tfpar import devices


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("cpu:0", "/device:CPU:0"),
        ("CPU:3", "/device:CPU:3"),
        ("/cpu:1", "/device:CPU:1"),
        ("/device:GPU:1", "/device:GPU:1"),
        ("gpu", "/device:GPU:0"),
        ("/job:worker/replica:0/task:1/device:CPU:0", "/job:worker/replica:0/task:1/device:CPU:0"),
    ],
)
def test_normalize_device(given, expected):
    assert devices.normalize_device(given) == expected


def test_normalize_logical_device_object():
    logical = tf.config.list_logical_devices("CPU")[2]
    assert devices.normalize_device(logical) == "/device:CPU:2"


@pytest.mark.parametrize("bad", ["", "cpu0", "fpga:0", "/device:", "cpu:-1"])
def test_normalize_rejects_non_devices(bad):
    with pytest.raises(ValueError, match="Expected a device name.*Received: device="):
        devices.normalize_device(bad)


def test_normalize_rejects_wrong_type():
    with pytest.raises(TypeError, match=r"Received: device=3 \(of type int\)"):
        devices.normalize_device(3)


def test_list_devices_has_the_virtual_cpus(virtual_devices):
    assert virtual_devices == [f"/device:CPU:{i}" for i in range(4)]
    assert devices.list_devices("cpu") == virtual_devices
    assert devices.default_replica_devices() == virtual_devices
    assert devices.accelerator_count() == 0


def test_validate_devices_normalizes_in_order():
    assert devices.validate_devices(["cpu:2", "/cpu:0"]) == ["/device:CPU:2", "/device:CPU:0"]
    assert devices.validate_devices("cpu:1") == ["/device:CPU:1"]


def test_validate_devices_names_the_available_ones():
    with pytest.raises(ValueError, match=r"'gpu:0' does not exist.*Available devices: /device:CPU:0, "):
        devices.validate_devices(["cpu:0", "gpu:0"])
    with pytest.raises(ValueError, match=r"'cpu:9' does not exist.*Did you mean"):
        devices.validate_devices(["cpu:9"])


def test_validate_devices_rejects_duplicates_and_empty():
    with pytest.raises(ValueError, match="Received duplicates: \\['/device:CPU:1'\\]"):
        devices.validate_devices(["cpu:1", "/device:CPU:1"])
    with pytest.raises(ValueError, match="at least one device"):
        devices.validate_devices([])
    with pytest.raises(TypeError, match="list of device names"):
        devices.validate_devices(7)


def test_configure_same_count_again_is_a_no_op():
    assert tfpar.configure_virtual_devices(4) == [f"/device:CPU:{i}" for i in range(4)]


def test_configure_too_late_explains_the_fix():
    with pytest.raises(RuntimeError, match=r"already initialized.*configure_virtual_devices\(2\) before any"):
        tfpar.configure_virtual_devices(2)


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((0,), ValueError, r"Expected 1 <= n <= 64 virtual devices. Received: n=0"),
        ((65,), ValueError, r"Expected 1 <= n <= 64 virtual devices. Received: n=65.*Fix: use at most 64"),
        ((10_000,), ValueError, r"Received: n=10000"),
        (("4",), TypeError, "Expected `n` to be an int"),
        ((2, "GPU"), ValueError, "no physical GPU"),
        ((2, "GPU", 1.5), TypeError, r"memory_limit_mb=1.5 \(of type float\)"),
        ((2, "GPU", float("nan")), TypeError, r"memory_limit_mb=nan"),
        ((2, "GPU", 0), ValueError, r"`memory_limit_mb` to be an int >= 1 \(MiB per logical GPU\) or None\. Received: memory_limit_mb=0"),
        ((2, "tpu"), ValueError, "CPU or GPU"),
        ((2, "npu"), ValueError, "device_type to be one of"),
    ],
)
def test_configure_validates(args, error, match):
    with pytest.raises(error, match=match):
        tfpar.configure_virtual_devices(*args[:2], **({"memory_limit_mb": args[2]} if len(args) > 2 else {}))


def test_configure_accepts_up_to_the_documented_bound():
    assert devices.MAX_VIRTUAL_DEVICES == 64
    # 64 passes the checks and reaches TensorFlow, which is already initialized in this process.
    with pytest.raises(RuntimeError, match=r"no longer be split into 64"):
        tfpar.configure_virtual_devices(64)


@pytest.mark.multiprocess
def test_configure_in_a_fresh_process_creates_devices():
    code = textwrap.dedent(
        """
        import tfpar, tensorflow as tf
        names = tfpar.configure_virtual_devices(3)
        assert names == [d.name for d in tf.config.list_logical_devices("CPU")], names
        print(len(names))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("3")
