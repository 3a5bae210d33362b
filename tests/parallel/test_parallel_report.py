"""Placement report from the executed graph: split models run where planned, plain ones do not."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from tfpar.parallel import placement_report, split
from tfpar.parallel import plan as make_plan


def _model():
    keras.utils.set_random_seed(3)
    inputs = keras.Input((8, 8, 2), name="image")
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(8, activation="relu", name="fc")(x)
    outputs = keras.layers.Dense(3, name="head")(x)
    return keras.Model(inputs, outputs, name="small")


def test_split_model_forward_backward_and_variables_run_on_plan(virtual_devices):
    model = _model()
    plan = make_plan(model, virtual_devices[1:4], split_points=["flatten", "head"])
    placed = split(model, plan, microbatches=2)
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 2)).astype("float32")
    report = placement_report(placed, x)
    assert report.ok, report.table()
    assert report.misplaced() == []
    forward, backward = report.layer_devices("forward"), report.layer_devices("backward")
    for layer in ("conv", "bn", "fc", "head"):
        planned = plan.stage_of(layer).device
        assert set(forward[layer]) == {planned}
        assert set(backward[layer]) == {planned}  # gradients too, not only the forward pass
    assert report.transfers > 0
    assert {device for _, device in report.variables} == set(plan.devices)
    text = str(report)
    assert "all on plan" in text and "/device:CPU:3" in text


def test_construction_under_tf_device_places_variables_but_not_computation(virtual_devices):
    # tensorflow/tensorflow#53671: what users try by hand, and why split() exists.
    keras.utils.set_random_seed(3)
    inputs = keras.Input((4,))
    with tf.device(virtual_devices[2]):
        hidden = keras.layers.Dense(4, name="hand_placed")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(1, name="top")(hidden))
    report = placement_report(model, np.ones((2, 4), "float32"))
    assert report.planned is None and not report.ok
    assert dict(report.variables)["hand_placed/kernel"] == virtual_devices[2]
    assert virtual_devices[2] not in report.layer_devices("forward")["hand_placed"]
    assert virtual_devices[2] not in report.layer_devices("backward")["hand_placed"]


def test_a_misplaced_op_is_reported(virtual_devices):
    model = _model()
    placed = split(model, make_plan(model, virtual_devices[:2], split_points=["fc"]))
    report = placement_report(placed, np.zeros((2, 8, 8, 2), "float32"), gradients=False)
    assert report.ok and report.layer_devices("backward") == {}
    # The same executed graph checked against a plan that swaps the devices must fail.
    swapped = {layer: virtual_devices[1] if device == virtual_devices[0] else virtual_devices[0]
               for layer, device in report.planned.items()}
    wrong = type(report)(report.model_name, swapped, report.ops, report.variables, report.transfers)
    assert not wrong.ok
    assert any("planned" in line for line in wrong.misplaced())
