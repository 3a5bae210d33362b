"""Test configuration: 4 virtual CPUs (via the tfpar.testing plugin) and leak guards."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

pytest_plugins = ["tfpar.testing"]


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
