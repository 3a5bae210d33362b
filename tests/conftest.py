"""Test configuration: 4 virtual CPUs (via the tfpar.testing plugin), test tiers and guards.

Tiers: ``python -m pytest`` runs everything (what CI runs); ``python -m pytest --fast`` leaves
out the tests marked ``slow``, ``multiprocess`` or ``notebook`` (a few minutes on 2 cores, for
development). A guard keeps the markers honest: a test that starts a process (``subprocess``,
``tfpar.launch``, a notebook kernel) without the ``multiprocess`` or ``notebook`` marker fails
and says which marker to add, so ``--fast`` never starts a process.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

pytest_plugins = ["tfpar.testing"]

_PROCESS_MARKERS = ("multiprocess", "notebook")
_FAST_EXCLUDES = ("slow",) + _PROCESS_MARKERS


def pytest_addoption(parser):
    parser.addoption(
        "--fast",
        action="store_true",
        help=f"the development tier: leave out tests marked {', '.join(_FAST_EXCLUDES)}",
    )


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--fast"):
        return
    kept, left_out = [], []
    for item in items:
        (left_out if any(item.get_closest_marker(m) for m in _FAST_EXCLUDES) else kept).append(item)
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = kept


@pytest.fixture(autouse=True)
def _processes_only_where_marked(request, monkeypatch):
    """Fails a test that starts a process without the multiprocess or notebook marker."""
    if any(request.node.get_closest_marker(m) for m in _PROCESS_MARKERS):
        yield
        return
    import subprocess

    def refuse(self, args, *rest, **kwargs):
        raise AssertionError(
            f"test {request.node.nodeid} started a process ({args!r:.200}) without a marker: add "
            "@pytest.mark.multiprocess (or notebook), so that 'pytest --fast' leaves it out"
        )

    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse)
    yield


@pytest.fixture(autouse=True)
def _no_leaked_strategy_or_env():
    """Fails a test that leaves a strategy scope open or changes os.environ."""
    import tensorflow as tf

    before = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    yield
    after = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    leaked = {k for k in set(after) ^ set(before)} | {k for k in before if after.get(k) != before[k]}
    for key in leaked:
        if key in before:
            os.environ[key] = before[key]
        else:
            os.environ.pop(key, None)
    assert not leaked, f"test leaked environment variable(s): {sorted(leaked)}"
    assert not tf.distribute.has_strategy(), "test left a tf.distribute strategy scope open"
