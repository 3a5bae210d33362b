"""Cost model: exact FLOP/parameter/memory formulas on small layers, measured time."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from tfpar.parallel import cost


def _toy():
    inputs = keras.Input((16, 16, 3), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv")(inputs)
    x = keras.layers.MaxPooling2D(2, name="pool")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    skip = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    flat = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(8, name="squeeze")(flat)
    x = keras.layers.Add(name="add")([x, skip])
    outputs = keras.layers.Dense(10, activation="relu", name="head")(x)
    return keras.Model(inputs, outputs, name="toy")


def test_flops_formulas():
    model = _toy()
    flops = cost.layer_costs(model, "flops")
    # Keras's topological order (by depth), without the input.
    assert list(flops) == [layer.name for layer in model.layers[1:]]
    assert set(flops) == {"conv", "pool", "bn", "gap", "flatten", "squeeze", "add", "head"}
    assert flops["conv"] == 2 * (16 * 16) * (3 * 3 * 3 * 8) + 16 * 16 * 8
    assert flops["pool"] == (8 * 8 * 8) * 4
    assert flops["bn"] == 4 * 8 * 8 * 8
    assert flops["gap"] == 8 * 8 * 8
    assert flops["flatten"] == 0
    assert flops["squeeze"] == 2 * 512 * 8 + 8
    assert flops["add"] == 8
    assert flops["head"] == 2 * 8 * 10 + 10 + 10  # bias, then ReLU


def test_params_are_count_params_and_memory_counts_weights_optimizer_and_activations():
    model = _toy()
    params = cost.layer_costs(model, "params")
    for name, value in params.items():
        assert value == model.get_layer(name).count_params()
    memory = cost.layer_costs(model, "memory", batch_size=32, optimizer_slots=2)
    # head: 90 weights * 4 bytes * (weight + gradient + 2 slots) + 10 outputs * 4 bytes * 32 examples
    assert memory["head"] == 90 * 4 * 4 + 10 * 4 * 32
    # bn: gamma/beta trainable (x4), moving mean/variance not (x1), plus 512 outputs per example
    assert memory["bn"] == 16 * 4 * 4 + 16 * 4 + 512 * 4 * 32
    sgd = cost.layer_costs(model, "memory", batch_size=1, optimizer_slots=0)
    assert sgd["head"] == 90 * 4 * 2 + 10 * 4


def test_time_is_measured_per_layer_without_touching_the_model(virtual_devices):
    model = _toy()
    before = [w.numpy().copy() for w in model.weights]
    times = cost.layer_costs(model, "time", device=virtual_devices[1], batch_size=4, repeats=2)
    assert list(times) == [layer.name for layer in model.layers[1:]]
    assert all(math.isfinite(t) and t >= 0 for t in times.values())
    for old, new in zip(before, model.weights):
        np.testing.assert_array_equal(old, new.numpy())


def test_fallback_flops_for_other_layers():
    inputs = keras.Input((5, 4))
    outputs = keras.layers.SimpleRNN(3, return_sequences=True, name="rnn")(inputs)
    model = keras.Model(inputs, outputs)
    rnn = model.get_layer("rnn")
    # 2 * params * positions + output elements, plus 4 per output element for its tanh.
    assert cost.layer_flops(rnn) == 2 * rnn.count_params() * 5 + 15 + 4 * 15


def test_unknown_balance_and_bytes_parsing():
    with pytest.raises(ValueError, match=r"one of \['flops', 'params', 'memory', 'time'\].*Received: balance='speed'"):
        cost.layer_costs(_toy(), "speed")
    assert cost.parse_bytes("1.5 KiB") == 1536
    assert cost.parse_bytes("2GB") == 2e9
    assert cost.parse_bytes(10) == 10
    with pytest.raises(ValueError, match="units: B, KB"):
        cost.parse_bytes("3 parsecs")
    with pytest.raises(TypeError, match="Received: True"):
        cost.parse_bytes(True)
    assert cost.format_bytes(1536) == "1.5 KiB"


def test_stage_times_are_measured_for_each_stage(virtual_devices):
    model = _toy()
    names = [layer.name for layer in model.layers[1:]]
    stages = [names[:3], names[3:]]
    times = cost.measure_stage_times(model, stages, device=virtual_devices[1], batch_size=4, repeats=2)
    assert len(times) == 2 and all(math.isfinite(t) and t >= 0 for t in times)
