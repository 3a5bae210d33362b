"""Planning: every balance mode on AlexNet, VGG16 and ResNet50; options; errors; summary and plot."""

from __future__ import annotations

import functools

import keras
import pytest

import tfpar.models
from tfpar.parallel import partition, planner
from tfpar.parallel import plan as make_plan


@functools.cache
def _model(name):
    keras.utils.set_random_seed(0)
    if name == "alexnet":
        return tfpar.models.alexnet(input_shape=(64, 64, 3), num_classes=10)
    if name == "vgg16":
        return tfpar.models.vgg16(input_shape=(32, 32, 3), num_classes=10, width=0.25)
    return tfpar.models.resnet50(input_shape=(32, 32, 3), num_classes=10)


def _check_plan(plan, model, devices):
    names = [layer.name for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    assert plan.devices == tuple(devices)
    assert all(len(stage.layers) >= 1 for stage in plan.stages)
    assert [n for stage in plan.stages for n in stage.layers] == list(plan.layer_costs)
    assert sorted(plan.layer_costs) == sorted(names)
    for stage in plan.stages:
        assert stage.cost == pytest.approx(sum(plan.layer_costs[n] for n in stage.layers))
    # The split is optimal for its own costs (same solver as the brute-force-tested one) and no
    # worse than DeepSpeed's uniform split.
    costs = list(plan.layer_costs.values())
    sizes = tuple(len(stage.layers) for stage in plan.stages)
    assert sizes == partition.optimal_sizes(costs, len(devices))
    assert plan.bottleneck <= max(partition.stage_loads(costs, partition.uniform_sizes(len(costs), len(devices))))


@pytest.mark.parametrize("name", ["alexnet", "vgg16", "resnet50"])
@pytest.mark.parametrize("balance", ["flops", "params", "memory"])
def test_every_static_balance_mode(name, balance, virtual_devices):
    model = _model(name)
    plan = make_plan(model, virtual_devices, balance=balance)
    _check_plan(plan, model, virtual_devices)
    if balance == "params":
        for layer, value in plan.layer_costs.items():
            assert value == model.get_layer(layer).count_params()
    assert plan.unit == {"flops": "FLOPs/example", "params": "parameters", "memory": "bytes"}[balance]


@pytest.mark.parametrize("name", ["alexnet", "vgg16", "resnet50"])
def test_time_balance(name, virtual_devices):
    model = _model(name)
    plan = make_plan(model, virtual_devices[:2], balance="time", batch_size=2, time_repeats=1)
    _check_plan(plan, model, virtual_devices[:2])
    assert plan.unit == "seconds"


def test_flops_beats_deepspeed_defaults_on_vgg16(virtual_devices):
    model = _model("vgg16")
    plan = make_plan(model, virtual_devices, balance="flops")
    flops = list(plan.layer_costs.values())
    params = [model.get_layer(n).count_params() for n in plan.layer_costs]
    uniform = max(partition.stage_loads(flops, partition.uniform_sizes(len(flops), 4)))
    by_params = max(partition.stage_loads(flops, partition.deepspeed_balanced_sizes(params, 4)))
    assert plan.bottleneck < uniform and plan.bottleneck < by_params


def test_explicit_counts_split_points_and_more(virtual_devices):
    model = _model("vgg16")
    n = len(model.layers) - 1
    counts = make_plan(model, virtual_devices[:2], balance=[3, n - 3])
    assert [len(s.layers) for s in counts.stages] == [3, n - 3] and counts.balance == "counts"
    points = make_plan(model, virtual_devices[:3], split_points=["block3_conv1", "flatten"])
    assert points.stages[1].layers[0] == "block3_conv1" and points.stages[2].layers[0] == "flatten"
    assert points.stage_of("fc1").index == 2
    assert planner.Plan.from_config(points.get_config()) == points
    # A count of devices, hypothetical devices, and "auto" micro-batches (GPipe's m >= 4p rule).
    assert make_plan(model, 3, check_devices=False).devices == ("/device:CPU:0", "/device:CPU:1", "/device:CPU:2")
    eight = make_plan(model, [f"gpu:{i}" for i in range(8)], check_devices=False, microbatches="auto")
    assert eight.microbatches == 32 and eight.bubble == pytest.approx(7 / 39)


def test_device_speeds_and_memory_limits(virtual_devices):
    model = _model("vgg16")
    even = make_plan(model, virtual_devices[:2])
    fast = make_plan(model, virtual_devices[:2], device_speeds=[1.0, 4.0])
    assert fast.stages[1].cost > even.stages[1].cost
    assert fast.bottleneck == pytest.approx(max(s.cost / s.speed for s in fast.stages))
    # Cap device 1 below what the unconstrained plan puts there: the planner moves layers off it.
    limit = even.stages[1].memory // 2
    capped = make_plan(model, virtual_devices[:2], memory_limits=[None, limit])
    assert capped.stages[1].memory <= limit < even.stages[1].memory
    assert capped.bottleneck >= even.bottleneck


def test_impossible_memory_limits_say_which_stage_overflows_by_how_much(virtual_devices):
    model = _model("vgg16")
    with pytest.raises(ValueError, match=r"(?s)No split of model 'vgg16'.*stage \d on /device:CPU:\d.*over by.*Fix:"):
        make_plan(model, virtual_devices[:2], memory_limits="100KB")
    with pytest.raises(ValueError, match=r"(?s)requested split.*does not fit.*stage 1 on /device:CPU:1.*over by"):
        make_plan(model, virtual_devices[:2], balance=[1, len(model.layers) - 2], memory_limits=["1MB", "100KB"])


def test_errors(virtual_devices):
    tiny = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="a"), keras.layers.Dense(1, name="b")])
    with pytest.raises(ValueError, match=r"at most 2 devices.*Received: 3 devices"):
        make_plan(tiny, virtual_devices[:3])
    with pytest.raises(ValueError, match=r"does not exist on this host.*Available devices"):
        make_plan(tiny, ["cpu:0", "cpu:9"])
    with pytest.raises(ValueError, match=r"Received: 'b2'.*Closest layer names: \['b'\]"):
        make_plan(tiny, virtual_devices[:2], split_points=["b2"])
    with pytest.raises(ValueError, match=r"one of \['flops', 'params', 'memory', 'time'\]"):
        make_plan(tiny, virtual_devices[:2], balance="fast")
    with pytest.raises(TypeError, match="list of ints"):
        make_plan(tiny, virtual_devices[:2], balance=[1.5, 0.5])
    with pytest.raises(ValueError, match=r"summing to the model's 2 layers"):
        make_plan(tiny, virtual_devices[:2], balance=[1, 2])
    with pytest.raises(ValueError, match="one speed per device"):
        make_plan(tiny, virtual_devices[:2], device_speeds=[1.0])
    with pytest.raises(TypeError, match="list of devices"):
        make_plan(tiny, "cpu:0")
    with pytest.raises(ValueError, match="`microbatches` to be an int >= 1"):
        make_plan(tiny, virtual_devices[:2], microbatches=0)

    class Subclassed(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(TypeError, match="functional API"):
        make_plan(Subclassed(), virtual_devices[:2])
    shared = keras.layers.Dense(3, name="shared")
    inputs = keras.Input((3,))
    twice = keras.Model(inputs, shared(shared(inputs)))
    with pytest.raises(ValueError, match="is called 2 times"):
        make_plan(twice, virtual_devices[:2])


def test_summary_and_plot(virtual_devices):
    plan = make_plan(_model("resnet50"), virtual_devices, microbatches=4)
    text = plan.summary()
    for stage in plan.stages:
        assert stage.device in text and f"{stage.layers[0]} .. {stage.layers[-1]}" in text
    assert "predicted bubble 42.9%" in text and str(plan) == text
    # A ResNet cut inside a residual block carries the shortcut as well.
    assert max(s.receives for s in plan.stages[1:]) > 0
    figure = plan.plot()
    bars = [p for p in figure.axes[0].patches]
    assert len(bars) == 4
    assert [b.get_height() for b in bars] == pytest.approx([s.load for s in plan.stages])
    import matplotlib.pyplot as plt

    plt.close(figure)


def test_plan_is_frozen_plain_data(virtual_devices):
    import dataclasses
    import json

    plan = make_plan(_model("vgg16"), virtual_devices[:2])
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.stages = ()
    with pytest.raises(TypeError, match="A plan is frozen"):
        plan.layer_costs["fc1"] = 0.0
    assert isinstance(plan.layer_costs, dict)
    assert json.loads(json.dumps(plan.get_config()))["stages"][0]["device"] == virtual_devices[0]
