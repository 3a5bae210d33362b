"""pytest plugin: N virtual CPU devices for your tests.

Enable it in your ``conftest.py``::

    pytest_plugins = ["tfpar.testing"]

It splits the CPU into ``--tfpar-virtual-cpus`` logical devices (default 4, or the ini option
``tfpar_virtual_cpus``) in ``pytest_configure``, which runs before any test module is imported: one
TensorFlow op at collection time would freeze the device list. Fixtures:

* ``virtual_devices``: the canonical names of the logical CPUs (``["/device:CPU:0", ...]``).
* ``tfpar_local_cluster``: an in-process cluster (2 workers, 1 ps) on 127.0.0.1 for
  parameter-server tests; TensorFlow servers cannot stop, so it lives for the whole session.

And one assertion for exactness tests that must pass on any CPU:
:func:`assert_within_float32_noise` compares a result with a float64 reference, with a tolerance
taken from how far the plain float32 computation itself lies from that reference (oneDNN picks
different kernels, and so different summation orders, per instruction set and batch size, so a
fixed ``rtol`` that holds on one CPU can fail on another). And one for tests that pin an upstream
bug: :func:`skip_unless_reproduced` skips, naming the versions and the CPU, where the bug does not
show (a later release fixed it, or it depends on the CPU's kernels), instead of failing.

Example:
    def test_mirrored_fit(virtual_devices):
        with tfpar.scope("mirrored", devices=virtual_devices[:2]) as strategy:
            assert strategy.num_replicas_in_sync == 2
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

DEFAULT_VIRTUAL_CPUS = 4


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tfpar")
    group.addoption(
        "--tfpar-virtual-cpus",
        type=int,
        default=None,
        help=f"number of virtual CPU devices to create (default {DEFAULT_VIRTUAL_CPUS})",
    )
    parser.addini("tfpar_virtual_cpus", "number of virtual CPU devices to create", default=None)


def _requested(config: pytest.Config) -> int:
    value = config.getoption("--tfpar-virtual-cpus", default=None)
    if value is None:
        value = config.getini("tfpar_virtual_cpus") or os.environ.get("TFPAR_TEST_NUM_CPUS")
    return int(value) if value else DEFAULT_VIRTUAL_CPUS


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    from tfpar import devices

    n = _requested(config)
    try:
        devices.configure_virtual_devices(n, "CPU")
    except RuntimeError as error:
        raise pytest.UsageError(
            f"tfpar.testing could not create {n} virtual CPUs: {error} (a plugin or conftest ran a "
            "TensorFlow op before pytest_configure)."
        ) from error
    config._tfpar_virtual_cpus = n  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def virtual_devices(pytestconfig: pytest.Config) -> list[str]:
    """The canonical names of this session's virtual CPU devices."""
    from tfpar import devices

    names = devices.list_devices("CPU")
    expected = getattr(pytestconfig, "_tfpar_virtual_cpus", DEFAULT_VIRTUAL_CPUS)
    if len(names) != expected:
        pytest.fail(f"Expected {expected} virtual CPUs, found {names}")
    return names


@pytest.fixture(scope="session")
def tfpar_local_cluster():
    """An in-process 2-worker + 1-ps cluster on 127.0.0.1 (servers cannot stop: session-wide)."""
    from tfpar import cluster

    return cluster.local_cluster(workers=2, ps=1)


def assert_within_float32_noise(
    actual: Sequence[Any],
    baseline: Sequence[Any],
    reference: Sequence[Any],
    *,
    factor: float = 4.0,
    floor: float = 1e-6,
) -> float:
    """Asserts that `actual` is as close to a float64 `reference` as a plain float32 run is.

    An exactness test that compares two float32 computations with a fixed tolerance measures the
    round-off of one CPU: oneDNN's kernels, and with them the order of every sum, differ between
    AVX2 and AVX-512 hosts and between batch sizes, and an ill-conditioned model (BatchNormalization
    backward over a few examples, momentum over many steps) amplifies that round-off far beyond
    float32's epsilon. So compare with float64 instead: `baseline` is the plain float32 computation
    (the unsplit model, a single device), `reference` the same computation in float64 from the same
    starting point, and `actual` the float32 result under test. The tolerance is `factor` times the
    baseline's largest deviation from the reference, plus `floor` times the reference's largest
    magnitude (so an exactly representable result does not demand bitwise equality). A real
    difference in what is computed (a missing micro-batch, per-replica scaling, a wrong batch
    statistic) is orders of magnitude larger than the round-off and still fails.

    Args:
        actual: Arrays (or tensors) under test, e.g. a split model's gradients.
        baseline: The float32 computation they must reproduce, in the same order.
        reference: The same computation in float64, in the same order.
        factor: How many times the baseline's round-off `actual` may show (default 4: two
            independent float32 runs differ by up to about twice the round-off of one).
        floor: The smallest tolerance, relative to the largest magnitude in `reference`.

    Returns:
        The tolerance used (an absolute value), for a test that wants to print or log it.

    Raises:
        AssertionError: If the structures differ in length or shape, or an element of `actual`
            lies further from `reference` than the tolerance.

    Example:
        def test_split_gradients(virtual_devices):
            g32 = gradients(model, x)                  # plain float32
            g64 = gradients(model_in_float64, x)       # same weights, float64
            gsplit = gradients(tfpar.parallel.split(model, virtual_devices), x)
            tfpar.testing.assert_within_float32_noise(gsplit, g32, g64)
    """
    actual_arrays = [_as_float64(a) for a in actual]
    baseline_arrays = [_as_float64(b) for b in baseline]
    reference_arrays = [_as_float64(r) for r in reference]
    if not len(actual_arrays) == len(baseline_arrays) == len(reference_arrays):
        raise AssertionError(
            "Expected actual, baseline and reference to have the same number of arrays. Received: "
            f"{len(actual_arrays)}, {len(baseline_arrays)} and {len(reference_arrays)}."
        )
    for i, (a, b, r) in enumerate(zip(actual_arrays, baseline_arrays, reference_arrays)):
        if not a.shape == b.shape == r.shape:
            raise AssertionError(f"Array {i}: shapes differ: {a.shape}, {b.shape}, {r.shape}.")
    scale = max((float(np.abs(r).max()) for r in reference_arrays if r.size), default=0.0)
    noise = max((float(np.abs(b - r).max()) for b, r in zip(baseline_arrays, reference_arrays) if r.size), default=0.0)
    tolerance = factor * noise + floor * scale
    for i, (a, r) in enumerate(zip(actual_arrays, reference_arrays)):
        if not a.size:
            continue
        worst = float(np.abs(a - r).max())
        if not worst <= tolerance:  # also catches NaN
            raise AssertionError(
                f"Array {i} of {len(actual_arrays)} differs from the float64 reference by {worst:.6g}; "
                f"the float32 baseline differs by at most {noise:.6g}, so the tolerance is "
                f"{factor:g} x {noise:.6g} + {floor:g} x {scale:.6g} = {tolerance:.6g}."
            )
    return tolerance


def skip_unless_reproduced(reproduced: bool, bug: str) -> None:
    """Skips the calling test, with the reason, when the upstream bug it pins did not show.

    A test that demonstrates an upstream failure (the reason a tfpar fix exists) must not fail on
    a host or a release where that failure does not happen: some depend on the CPU's oneDNN
    kernels, and upstream may fix others. Call it once the upstream code has run; the skip
    message names the bug, the TensorFlow and Keras versions and the CPU, so a skip in a report
    says where to re-check whether the fix is still needed. The test of tfpar's own fix must not
    use this: it has to pass everywhere.

    Args:
        reproduced: Whether the upstream failure happened in this run.
        bug: What the upstream failure is, with its upstream issue where there is one.

    Example:
        def test_upstream_fails_on_a_partial_last_batch():
            drift = train_with_plain_mirrored_strategy()
            tfpar.testing.skip_unless_reproduced(drift > 1e-3, "per-replica loss scaling on a partial batch")
            assert drift > 1e-3
    """
    if reproduced:
        return
    import keras
    import tensorflow as tf

    pytest.skip(
        f"upstream bug not reproduced here, so there is nothing to pin: {bug} "
        f"(TensorFlow {tf.__version__}, Keras {keras.__version__}, CPU {_cpu_model()}); "
        "if a release fixed it, re-check whether tfpar's fix is still needed"
    )


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            lines = cpuinfo.read().splitlines()
    except OSError:
        import platform

        return platform.processor() or "unknown"
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{model}, {isa}"


def _as_float64(value: Any) -> np.ndarray:
    if hasattr(value, "numpy") or type(value).__name__ == "IndexedSlices":
        import tensorflow as tf

        value = tf.convert_to_tensor(value).numpy()
    return np.asarray(value, dtype=np.float64)
