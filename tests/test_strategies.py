"""tfpar.strategies: registry, get_strategy, scope."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfpar
from tfpar import _compat, strategies


@pytest.fixture
def registry_snapshot(monkeypatch):
    monkeypatch.setattr(strategies, "_REGISTRY", strategies._REGISTRY.copy())


def test_available_strategies_has_the_documented_names():
    names = set(tfpar.available_strategies())
    assert {
        "auto", "default", "one_device", "mirrored", "multi_worker", "parameter_server",
        "central_storage", "ps", "multi_worker_mirrored",
    } <= names
    assert tfpar.available_strategies() == sorted(names)


@pytest.mark.parametrize(
    ("name", "cls", "replicas"),
    [
        ("mirrored", tf.distribute.MirroredStrategy, 4),
        ("MIRRORED", tf.distribute.MirroredStrategy, 4),
        ("one_device", tf.distribute.OneDeviceStrategy, 1),
        ("central_storage", tf.distribute.experimental.CentralStorageStrategy, 4),
    ],
)
def test_get_strategy_returns_real_strategies(name, cls, replicas):
    strategy = tfpar.get_strategy(name)
    assert isinstance(strategy, cls)
    assert strategy.num_replicas_in_sync == replicas
    assert _compat.is_managed(strategy)


def test_default_is_tensorflows_default_strategy():
    assert tfpar.get_strategy("default") is tf.distribute.get_strategy()


def test_auto_picks_mirrored_over_the_virtual_devices_and_says_so(caplog):
    with caplog.at_level(logging.INFO, logger="tfpar"):
        strategy = tfpar.get_strategy("auto")
    assert isinstance(strategy, tf.distribute.MirroredStrategy)
    assert strategy.num_replicas_in_sync == 4
    assert "picked 'mirrored' over 4 devices" in caplog.text


def test_auto_on_one_device_is_default(caplog):
    with caplog.at_level(logging.INFO, logger="tfpar"):
        strategy = tfpar.get_strategy("auto", devices=["cpu:0"])
    assert strategy is tf.distribute.get_strategy()
    assert "picked 'default'" in caplog.text


def test_mirrored_devices_are_validated_and_used():
    strategy = tfpar.get_strategy("mirrored", devices=["cpu:1", "cpu:3"])
    assert [d.split("/")[-1] for d in strategy.extended.worker_devices] == ["device:CPU:1", "device:CPU:3"]
    with pytest.raises(ValueError, match=r"'cpu:7' does not exist.*Available devices"):
        tfpar.get_strategy("mirrored", devices=["cpu:0", "cpu:7"])


@pytest.mark.parametrize(
    ("choice", "cls"),
    [("reduce_to_one", tf.distribute.ReductionToOneDevice), ("auto", tf.distribute.experimental.CollectiveCommunication)],
)
def test_mirrored_cross_device_ops(choice, cls):
    strategy = tfpar.get_strategy("mirrored", devices=["cpu:0", "cpu:1"], cross_device_ops=choice)
    ops = strategy.extended._cross_device_ops
    if choice == "auto":  # TensorFlow's own choice: collective all-reduce
        assert type(ops).__name__ == "CollectiveAllReduce"
    else:
        assert isinstance(ops, cls)


def test_mirrored_cross_device_ops_errors():
    with pytest.raises(ValueError, match=r"one of \['auto', 'nccl', 'hierarchical_copy', 'reduce_to_one'\]"):
        tfpar.get_strategy("mirrored", cross_device_ops="ring")
    with pytest.raises(ValueError, match="needs every replica on a GPU.*Use 'reduce_to_one'"):
        tfpar.get_strategy("mirrored", cross_device_ops="nccl")


def test_one_device_options():
    assert tfpar.get_strategy("one_device", device="cpu:2").extended.worker_devices[0].endswith("CPU:2")
    assert tfpar.get_strategy("one_device", devices=["cpu:1"]).extended.worker_devices[0].endswith("CPU:1")
    with pytest.raises(ValueError, match="exactly one device"):
        tfpar.get_strategy("one_device", devices=["cpu:0", "cpu:1"])
    with pytest.raises(ValueError, match="either `device` or `devices`"):
        tfpar.get_strategy("one_device", device="cpu:0", devices=["cpu:1"])


def test_unknown_name_lists_valid_names_and_suggests():
    with pytest.raises(ValueError, match=r"Unknown strategy 'mirrord'\. Did you mean 'mirrored'\? Available names: auto, "):
        tfpar.get_strategy("mirrord")


def test_none_is_a_type_error_with_a_hint():
    with pytest.raises(TypeError, match="To train without distribution, use 'default'"):
        tfpar.get_strategy(None)


def test_unknown_options_are_rejected_by_name():
    with pytest.raises(TypeError, match=r"'mirrored' does not take option\(s\) \['device_count'\]. Its options: devices, cross_device_ops"):
        tfpar.get_strategy("mirrored", device_count=2)
    with pytest.raises(TypeError, match=r"'default' does not take option\(s\) \['devices'\]\. Its options: none"):
        tfpar.get_strategy("default", devices=["cpu:0"])


def test_scope_options_are_rejected_by_get_strategy():
    with pytest.raises(TypeError, match="option of tfpar.scope"):
        tfpar.get_strategy("mirrored", mixed_precision="mixed_bfloat16")


def test_strategy_instance_is_returned_and_managed():
    raw = tf.distribute.OneDeviceStrategy("/cpu:0")
    assert tfpar.get_strategy(raw) is raw
    assert _compat.is_managed(raw)
    with pytest.raises(TypeError, match="Options apply only when a strategy name is given"):
        tfpar.get_strategy(raw, devices=["cpu:0"])


def test_multi_worker_on_a_single_process_is_one_worker():
    strategy = tfpar.get_strategy("multi_worker_mirrored")
    assert isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    assert strategy.num_replicas_in_sync == 1


def test_multi_worker_options_are_validated():
    with pytest.raises(ValueError, match=r"communication to be one of \['auto', 'ring', 'nccl'\]"):
        tfpar.get_strategy("multi_worker", communication="grpc")
    with pytest.raises(ValueError, match="needs GPUs.*Use 'ring'"):
        tfpar.get_strategy("multi_worker", communication="nccl")
    with pytest.raises(ValueError, match="collective_timeout > 0"):
        tfpar.get_strategy("multi_worker", collective_timeout=0)


def test_malformed_tf_config_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 3}')
    with pytest.raises(ValueError, match="TF_CONFIG"):
        tfpar.get_strategy("multi_worker")


def test_parameter_server_options_are_validated_before_connecting():
    with pytest.raises(TypeError, match=r"'parameter_server' does not take option\(s\) \['stalenes'\]"):
        tfpar.get_strategy("ps", stalenes=1)


def test_register_override_and_unregister(registry_snapshot):
    tfpar.register_strategy("two_cpus", lambda: tfpar.get_strategy("mirrored", devices=["cpu:0", "cpu:1"]), description="two")
    assert "two_cpus" in tfpar.available_strategies()
    with tfpar.scope("Two_CPUs") as strategy:
        assert strategy.num_replicas_in_sync == 2
    with pytest.raises(ValueError, match="already registered. Pass override=True"):
        tfpar.register_strategy("two_cpus", lambda: None, description="again")
    tfpar.register_strategy("two_cpus", lambda: tf.distribute.OneDeviceStrategy("/cpu:0"), description="one", override=True)
    assert tfpar.get_strategy("two_cpus").num_replicas_in_sync == 1
    strategies.unregister_strategy("two_cpus")
    assert "two_cpus" not in tfpar.available_strategies()


def test_register_validates(registry_snapshot):
    with pytest.raises(TypeError, match="non-empty str"):
        tfpar.register_strategy("", lambda: None, description="x")
    with pytest.raises(TypeError, match="callable"):
        tfpar.register_strategy("x", 3, description="x")
    tfpar.register_strategy("broken", lambda: "not a strategy", description="x")
    with pytest.raises(TypeError, match="must return a tf.distribute.Strategy"):
        tfpar.get_strategy("broken")


def test_register_with_preset_options_makes_an_alias(registry_snapshot):
    tfpar.register_strategy("mirrored_13", strategies._mirrored, description="cpus 1 and 3", devices=["cpu:1", "cpu:3"])
    assert tfpar.get_strategy("mirrored_13").num_replicas_in_sync == 2
    with pytest.raises(TypeError, match="does not take option"):
        tfpar.get_strategy("mirrored_13", devices=["cpu:0"])


def test_scope_yields_the_strategy_and_restores_it():
    assert not tf.distribute.has_strategy()
    with tfpar.scope("mirrored", devices=["cpu:0", "cpu:1"]) as strategy:
        assert tf.distribute.get_strategy() is strategy
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        assert "Mirrored" in type(model.layers[0].kernel.value).__name__
    assert not tf.distribute.has_strategy()
    assert model.distribute_strategy is strategy


def test_scope_restores_after_an_exception():
    previous = keras.config.dtype_policy().name
    with pytest.raises(KeyError), tfpar.scope("mirrored", mixed_precision="mixed_bfloat16"):
        assert keras.config.dtype_policy().name == "mixed_bfloat16"
        raise KeyError("boom")
    assert not tf.distribute.has_strategy()
    assert keras.config.dtype_policy().name == previous


def test_scope_mixed_precision_sets_and_restores_policy():
    with tfpar.scope("mirrored", mixed_precision="mixed_float16"):
        layer = keras.layers.Dense(2)
        assert keras.config.dtype_policy().name == "mixed_float16"
    assert layer.compute_dtype == "float16" and layer.variable_dtype == "float32"
    assert keras.config.dtype_policy().name == "float32"
    with (
        pytest.raises(ValueError, match=r"mixed_precision to be one of \['mixed_float16', 'mixed_bfloat16'\]"),
        tfpar.scope("mirrored", mixed_precision="float8"),
    ):
        pass


def test_nested_scopes():
    with tfpar.scope("mirrored") as outer:
        with tfpar.scope(outer) as inner:
            assert inner is outer
        with pytest.raises(RuntimeError, match="inside the scope of another strategy"), tfpar.scope("one_device"):
            pass
        assert tf.distribute.get_strategy() is outer
    assert not tf.distribute.has_strategy()


def test_many_mirrored_scopes_with_different_models_in_one_process():
    """Notebooks re-run cells: each scope is a new strategy with a different collective pattern."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3)).astype("float32")
    y = rng.normal(size=(64, 1)).astype("float32")
    for width in (4, 13, 7):
        with tfpar.scope("mirrored", devices=["cpu:0", "cpu:1"]):
            model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(width), keras.layers.Dense(1)])
            model.compile(optimizer="sgd", loss="mse")
        history = model.fit(x, y, batch_size=16, epochs=1, verbose=0)
        assert np.isfinite(history.history["loss"][0])


@pytest.mark.slow
@pytest.mark.multiprocess
def test_upstream_fails_on_a_second_mirrored_strategy_with_another_pattern():
    """What the collective-key bump fixes (run in a fresh process: the failure poisons it)."""
    code = textwrap.dedent(
        """
        import numpy as np, keras, tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")
        tf.config.set_logical_device_configuration(cpu[0], [tf.config.LogicalDeviceConfiguration()] * 2)
        x = np.ones((64, 3), "float32"); y = np.ones((64, 1), "float32")
        for width in (4, 13):
            with tf.distribute.MirroredStrategy().scope():
                model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(width), keras.layers.Dense(1)])
                model.compile(optimizer="sgd", loss="mse")
            try:
                model.fit(x, y, batch_size=16, epochs=1, verbose=0)
            except Exception as error:
                print("UPSTREAM-FAILED", type(error).__name__)
                raise SystemExit(0)
        print("UPSTREAM-WORKED")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    tfpar.testing.skip_unless_reproduced(
        "UPSTREAM-WORKED" not in result.stdout, "a second MirroredStrategy's collective instance shape mismatch"
    )
    assert "UPSTREAM-FAILED InvalidArgumentError" in result.stdout, result.stdout + result.stderr[-2000:]


def test_describe_strategies():
    descriptions = strategies.describe_strategies()
    assert descriptions["mirrored"].startswith("synchronous data parallelism")
    assert descriptions["ps"] == descriptions["parameter_server"]
