"""pytest plugin: N virtual CPU devices for your tests.

Enable it in your ``conftest.py``::

    pytest_plugins = ["tfpar.testing"]

It splits the CPU into ``--tfpar-virtual-cpus`` logical devices (default 4, or the ini option
``tfpar_virtual_cpus``) in ``pytest_configure``, which runs before any test module is imported: one
TensorFlow op at collection time would freeze the device list. Fixtures:

* ``virtual_devices``: the canonical names of the logical CPUs (``["/device:CPU:0", ...]``).
* ``tfpar_local_cluster``: an in-process cluster (2 workers, 1 ps) on 127.0.0.1 for
  parameter-server tests; TensorFlow servers cannot stop, so it lives for the whole session.

Example:
    def test_mirrored_fit(virtual_devices):
        with tfpar.scope("mirrored", devices=virtual_devices[:2]) as strategy:
            assert strategy.num_replicas_in_sync == 2
"""

from __future__ import annotations

import os

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
