"""tfpar.tuning: the search measures, never chooses a failed setting, keeps its budget, restores the
model, and makes the same choice on every worker of a 2-process cluster."""

from __future__ import annotations

import io
import json
import math
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfpar
from tfpar import launch, tuning

BUDGET = 20.0  # generous: a tiny model's candidates take about a second each


def _data(n: int = 256) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 8)).astype("float32"), rng.integers(0, 3, n)


def _model(dropout: bool = False) -> keras.Model:
    layers = [keras.Input((8,)), keras.layers.Dense(16, activation="relu")]
    if dropout:
        layers.append(keras.layers.Dropout(0.5))
    model = keras.Sequential([*layers, keras.layers.Dense(3)])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def _all_values(model: keras.Model) -> list[np.ndarray]:
    return [v.numpy().copy() for v in [*model.variables, *model.optimizer.variables]]


@pytest.fixture(scope="module")
def mirrored_result():
    """A full search on 2 replicas, tiny model (already trained a little, so the optimizer has state)."""
    keras.utils.set_random_seed(1)
    x, y = _data()
    with tfpar.scope("mirrored", devices=["cpu:0", "cpu:1"]):
        model = _model(dropout=True)
        model.fit(x, y, batch_size=32, epochs=1, verbose=0)
        before = _all_values(model)
        compiled = (model.optimizer, model.loss, model.steps_per_execution, model.get_compile_config())
        lines: list[str] = []
        result = tuning.tune(model, x, y, batch_size=32, budget_seconds=BUDGET, log=lines.append)
    return model, before, compiled, result, lines


def test_restores_weights_optimizer_and_settings_exactly(mirrored_result):
    model, before, compiled, _, _ = mirrored_result
    after = _all_values(model)
    assert len(after) == len(before)
    for a, b in zip(after, before):
        np.testing.assert_array_equal(a, b)
    assert (model.optimizer, model.loss, model.steps_per_execution, model.get_compile_config()) == compiled
    assert model.optimizer.gradient_accumulation_steps is None


def test_model_trains_after_tuning(mirrored_result):
    model, _, _, result, _ = mirrored_result
    x, y = _data()
    model.compile(optimizer=model.optimizer, loss=model.loss, steps_per_execution=result.chosen["steps_per_execution"])
    history = model.fit(x, y, batch_size=result.chosen["batch_size"], epochs=1, verbose=0)
    assert math.isfinite(history.history["loss"][-1])


def test_candidates_default_first_and_chosen_is_fastest(mirrored_result):
    _, _, _, result, lines = mirrored_result
    assert result.default == {"batch_size": 32, "steps_per_execution": 1}
    assert result.candidates[0].settings == result.default
    assert len(result.candidates) >= 3
    measured = [c for c in result.candidates if c.error is None]
    assert all(c.samples_per_second > 0 for c in measured)
    best = max(measured, key=lambda c: c.samples_per_second)
    assert result.chosen == best.settings
    assert {c.settings["batch_size"] for c in result.candidates} >= {32, 64, 128}
    assert any(c.settings["steps_per_execution"] == 4 for c in result.candidates)
    assert any(line.startswith("tfpar tune: batch 32, steps_per_execution 1: ") for line in lines)
    assert lines[-1].startswith("tfpar tune: chose ")
    assert result.seconds <= BUDGET + 30


def test_to_json_table_and_plot(mirrored_result, tmp_path):
    _, _, _, result, _ = mirrored_result
    data = json.loads(json.dumps(result.to_json()))
    assert set(data) >= {"candidates", "chosen", "default", "seconds", "budget_seconds"}
    assert data["chosen"] == result.chosen and data["budget_seconds"] == BUDGET
    for entry in data["candidates"]:
        assert set(entry) == {"settings", "samples_per_second", "seconds", "error"}
    table = result.table()
    assert len(table.splitlines()) == len(result.candidates) + 2
    assert sum(line.startswith("*") for line in table.splitlines()) == 1
    assert "chosen (*)" in table and "vs default" in table
    path = result.plot(tmp_path / "tuning.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failing_candidate_is_recorded_and_never_chosen():
    """An injected out-of-memory error on one setting and an absurd batch: recorded, never chosen."""
    x, y = _data()
    model = _model()
    fit = model.fit

    def fit_or_fail(*args, **kwargs):
        if kwargs.get("batch_size") == 128:
            raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor (injected)")
        return fit(*args, **kwargs)

    model.fit = fit_or_fail
    result = tuning.tune(model, x, y, batch_size=32, budget_seconds=BUDGET, log=None,
                         candidates=[{"batch_size": 128}, {"batch_size": 64}, {"batch_size": 10**9}])
    errors = {c.settings["batch_size"]: c.error for c in result.candidates}
    assert errors[128].startswith("ResourceExhaustedError: OOM when allocating")
    assert errors[10**9].startswith("ValueError: Expected a global batch size")
    assert errors[32] is None and errors[64] is None
    assert result.chosen["batch_size"] in (32, 64)
    assert "ResourceExhaustedError" in result.table()
    assert json.loads(json.dumps(result.to_json()))["candidates"][1]["samples_per_second"] is None


def test_tiny_budget_stops_early_but_measures_the_default():
    x, y = _data()
    model = _model()
    result = tuning.tune(model, x, y, batch_size=32, budget_seconds=0.01, log=None)
    assert [c.settings for c in result.candidates] == [result.default]
    assert result.chosen == result.default
    assert result.skipped
    assert result.seconds < 60


def test_every_setting_failing_is_an_error():
    x, y = _data()
    model = _model()
    with pytest.raises(RuntimeError, match="every setting failed"):
        tuning.tune(model, x[:, :4], y, batch_size=32, budget_seconds=5, log=None)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"budget_seconds": 0}, ValueError, "budget_seconds"),
        ({"budget_seconds": float("inf")}, ValueError, "budget_seconds"),
        ({"budget_seconds": "10"}, TypeError, "budget_seconds"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"batch_size": 2.5}, TypeError, "batch_size"),
        ({"steps_per_execution": 0}, ValueError, "steps_per_execution"),
        ({"log": "print"}, TypeError, "log"),
        ({"candidates": [{"steps_per_execution": 2}]}, TypeError, "candidates"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    x, y = _data(16)
    with pytest.raises(error, match=f"Expected `{match}`.*Received"):
        tuning.tune(_model(), x, y, **kwargs)


def test_bad_model_and_data():
    x, y = _data(16)
    with pytest.raises(ValueError, match="Expected a compiled keras.Model"):
        tuning.tune(keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)]), x, y)
    with pytest.raises(ValueError, match="same number of examples"):
        tuning.tune(_model(), x, y[:3])
    with pytest.raises(TypeError, match="x_train"):
        tuning.tune(_model(), list(x), y)


def test_candidate_settings():
    default = {"batch_size": 64, "steps_per_execution": 1}
    found = tuning.candidate_settings(default, replicas=2, examples=1000)
    assert found[0] == default and len(found) == len({json.dumps(s, sort_keys=True) for s in found})
    assert [s["batch_size"] for s in found[:3]] == [64, 128, 256]
    assert {s["steps_per_execution"] for s in found} == {1, 4}
    capped = tuning.candidate_settings(default, replicas=2, examples=101)
    assert max(s["batch_size"] for s in capped) == 100
    worker = tuning.candidate_settings({**default, "gradient_accumulation_steps": 1}, replicas=2, examples=1000,
                                       multi_worker=True)
    assert {s["gradient_accumulation_steps"] for s in worker} == {1, 4}
    assert all(s["steps_per_execution"] == 1 for s in worker if s["gradient_accumulation_steps"] == 4)


WORKER = textwrap.dedent("""
    import json, os, sys
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras, numpy as np
    import tfpar
    from tfpar import tuning
    strategy = tfpar.get_strategy("multi_worker")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8)).astype("float32")
    y = rng.integers(0, 3, 256)
    with strategy.scope():
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(3)])
        model.compile(optimizer=keras.optimizers.Adam(1e-2),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        before = [w.copy() for w in model.get_weights()]
        result = tuning.tune(model, x, y, batch_size=32, budget_seconds=float(sys.argv[2]))
        restored = all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
        model.compile(optimizer=model.optimizer, loss=model.loss,
                      steps_per_execution=result.chosen["steps_per_execution"])
        tuning.apply_settings(model, result.chosen)
        model.fit(x, y, batch_size=result.chosen["batch_size"], epochs=1, verbose=0)
    task = json.loads(os.environ["TF_CONFIG"])["task"]
    with open(os.path.join(sys.argv[1], f"worker{task['index']}.json"), "w") as f:
        json.dump({**result.to_json(), "restored": restored, "weights": [w.tolist() for w in model.get_weights()]}, f)
""")


@pytest.mark.multiprocess
@pytest.mark.parametrize("budget", [25.0, 3.0], ids=["full", "budget-stop"])
def test_two_workers_choose_the_same_settings(tmp_path, budget):
    script = tmp_path / "tune_worker.py"
    script.write_text(WORKER)
    buffer = io.StringIO()
    code = launch.launch([sys.executable, str(script), str(tmp_path), str(budget)], workers=2, timeout=300,
                         output=buffer)
    assert code == 0, buffer.getvalue()[-4000:]
    first, second = (json.loads((tmp_path / f"worker{i}.json").read_text()) for i in range(2))
    assert first["restored"] and second["restored"]
    assert first["chosen"] == second["chosen"]
    assert [c["settings"] for c in first["candidates"]] == [c["settings"] for c in second["candidates"]]
    assert first["skipped"] == second["skipped"]
    for a, b in zip(first["candidates"], second["candidates"]):
        assert a["samples_per_second"] == b["samples_per_second"]  # agreed (all-reduced), not each worker's own
    assert first["weights"] == second["weights"]  # both trained with the same chosen setting, in step
    assert first["default"]["gradient_accumulation_steps"] == 1
    if budget == 25.0:
        assert len(first["candidates"]) >= 3
        assert any(c["settings"]["gradient_accumulation_steps"] == 4 and c["error"] is None for c in first["candidates"])
    else:
        assert first["skipped"]


def test_an_accumulation_setting_runs_on_a_built_optimizer_and_the_optimizer_is_restored():
    # Keras creates accumulators only when gradient_accumulation_steps is set before the
    # optimizer is built: the setting trains with a copy, and the original comes back.
    x, y = _data()
    with tfpar.scope("mirrored", devices=["cpu:0", "cpu:1"]):
        model = _model()
        model.fit(x, y, batch_size=32, epochs=1, verbose=0)  # builds the optimizer
        optimizer, weights = model.optimizer, [w.copy() for w in model.get_weights()]
        result = tuning.tune(model, x, y, batch_size=32, budget_seconds=120, log=None,
                             candidates=[{"batch_size": 32}, {"batch_size": 32, "gradient_accumulation_steps": 4}])
    assert [c.error for c in result.candidates] == [None, None]
    assert model.optimizer is optimizer and not getattr(optimizer, "gradient_accumulation_steps", None)
    assert all(np.array_equal(a, b) for a, b in zip(weights, model.get_weights()))
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
