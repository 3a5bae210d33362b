"""Split models: placement, equivalence with the unsplit model, micro-batches, Keras workflows."""

from __future__ import annotations

import json
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfpar
import tfpar.models
import tfpar.testing
from tfpar.parallel import plan as make_plan
from tfpar.parallel import split


def _sequential():
    keras.utils.set_random_seed(1)
    return keras.Sequential(
        [
            keras.Input((6,), name="features"),
            keras.layers.Dense(16, activation="relu", name="dense_a"),
            keras.layers.Dense(16, activation="tanh", name="dense_b"),
            keras.layers.Dense(8, activation="relu", name="dense_c"),
            keras.layers.Dense(3, name="logits"),
        ],
        name="mlp",
    )


def _branchy(batch_norm=True):
    """Two inputs, a branch, a skip connection across stages and BatchNormalization."""
    keras.utils.set_random_seed(2)
    a = keras.Input((8,), name="a")
    b = keras.Input((4,), name="b")
    left = keras.layers.Dense(12, activation="relu", name="left")(a)
    right = keras.layers.Dense(12, name="right")(a)
    x = keras.layers.Add(name="add")([left, right])
    if batch_norm:
        x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Dense(12, activation="relu", name="mid")(x)
    x = keras.layers.Concatenate(name="cat")([x, left, b])
    out = keras.layers.Dense(2, name="out")(x)
    return keras.Model([a, b], out, name="branchy")


def _grads(model, x, y_fn, training=True):
    with tf.GradientTape() as tape:
        y = model(x, training=training)
        loss = y_fn(y)
    return y, tape.gradient(loss, model.trainable_variables)


def _assert_close_grads(g1, g2, rtol=1e-5):
    g1 = [tf.convert_to_tensor(g).numpy() for g in g1]  # IndexedSlices (Embedding) to dense
    g2 = [tf.convert_to_tensor(g).numpy() for g in g2]
    assert len(g1) == len(g2)
    scale = max(float(np.abs(g).max()) for g in g1)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, atol=rtol * scale, rtol=0)


@pytest.mark.parametrize("microbatches", [1, 3])
def test_sequential_outputs_gradients_and_placement(microbatches, virtual_devices):
    model = _sequential()
    before = [w.numpy().copy() for w in model.weights]
    plan = make_plan(model, virtual_devices[:3], balance=[1, 2, 1])
    placed = split(model, plan, microbatches=microbatches)
    assert isinstance(placed, keras.Model) and placed is not model
    assert [layer.name for layer in placed.layers] == [layer.name for layer in model.layers]
    assert [w.path for w in placed.weights] == [f"{w.path.split('/', 1)[1]}" for w in model.weights]
    assert placed.weights[0].path == "dense_a/kernel"
    for layer in placed.layers:
        for w in layer.weights:
            assert w.value.device.endswith(plan.stage_of(layer.name).device)
    x = np.random.default_rng(0).normal(size=(7, 6)).astype("float32")  # 7 does not divide by 3
    np.testing.assert_allclose(placed(x), model(x), rtol=1e-6, atol=1e-6)
    y_ref, g_ref = _grads(model, x, lambda y: tf.reduce_sum(y**2))
    y_new, g_new = _grads(placed, x, lambda y: tf.reduce_sum(y**2))
    np.testing.assert_allclose(y_new, y_ref, rtol=1e-6, atol=1e-6)
    _assert_close_grads(g_ref, g_new)
    for old, w in zip(before, model.weights):
        np.testing.assert_array_equal(old, w.numpy())  # the original is not modified


def test_functional_branches_skip_connections_two_inputs(virtual_devices):
    model = _branchy(batch_norm=False)
    # 'left' (stage 0) feeds 'cat' (stage 2), and input 'b' goes straight to stage 2.
    placed = split(model, make_plan(model, virtual_devices[:3], split_points=["add", "cat"]), microbatches=2)
    rng = np.random.default_rng(1)
    x = [rng.normal(size=(6, 8)).astype("float32"), rng.normal(size=(6, 4)).astype("float32")]
    np.testing.assert_allclose(placed(x), model(x), rtol=1e-6, atol=1e-6)
    _, g_ref = _grads(model, x, lambda y: tf.reduce_sum(tf.sin(y)))
    _, g_new = _grads(placed, x, lambda y: tf.reduce_sum(tf.sin(y)))
    _assert_close_grads(g_ref, g_new)
    received = placed._wiring.receives
    assert {r.layer for r in received[2]} >= {"left", "b"}


def test_batch_norm_full_batch_is_exact_and_microbatch_is_not(virtual_devices):
    model = _branchy(batch_norm=True)
    rng = np.random.default_rng(3)
    x = [rng.normal(size=(8, 8)).astype("float32"), rng.normal(size=(8, 4)).astype("float32")]
    plan = make_plan(model, virtual_devices[:2], split_points=["bn"])
    exact = split(model, plan, microbatches=4)
    per_mb = split(model, plan, microbatches=4, batch_norm="microbatch")
    y_ref, g_ref = _grads(model, x, lambda y: tf.reduce_sum(y**2))
    y_exact, g_exact = _grads(exact, x, lambda y: tf.reduce_sum(y**2))
    y_mb, _ = _grads(per_mb, x, lambda y: tf.reduce_sum(y**2))
    np.testing.assert_allclose(y_exact, y_ref, rtol=1e-5, atol=1e-5)
    _assert_close_grads(g_ref, g_exact)
    # Moving statistics after one training step equal the unsplit model's.
    for name in ("moving_mean", "moving_variance"):
        ref = [w for w in model.get_layer("bn").weights if w.name == name][0]
        new = [w for w in exact.get_layer("bn").weights if w.name == name][0]
        np.testing.assert_allclose(new.numpy(), ref.numpy(), rtol=1e-5, atol=1e-6)
    assert float(np.abs(np.asarray(y_mb) - np.asarray(y_ref)).max()) > 1e-3


def _float64_twin(build, model):
    """The same architecture in float64, with `model`'s weights: the reference for float32 noise."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float64")
    try:
        twin = build()
    finally:
        keras.config.set_dtype_policy(previous)
    for target, source in zip(twin.weights, model.weights):
        target.assign(source.numpy().astype("float64"))
    return twin


def test_resnet50_cut_carries_several_tensors(virtual_devices):
    """Gradients of a random-init ResNet-50 in training mode are ill-conditioned: at 32x32 the last
    stage is 1x1, so BatchNormalization backward normalizes over 4 values per channel and amplifies
    float32 round-off to ~1.5% of the gradient scale (unsplit float32 vs float64: 91 at 5,935 on
    an AVX-512 host; an AVX2 host's kernels sum in another order). The split model with 2
    micro-batches (full-batch BN) is exactly as far from float64 as the unsplit model, so it is
    compared with the float64 reference, with the unsplit float32 round-off as tolerance."""
    keras.utils.set_random_seed(4)

    def build():
        return tfpar.models.resnet50(input_shape=(32, 32, 3), num_classes=5)

    model = build()
    plan = make_plan(model, virtual_devices)
    placed = split(model, plan, microbatches=2)
    assert max(len(r) for r in placed._wiring.receives) >= 2
    x = np.random.default_rng(4).normal(size=(4, 32, 32, 3)).astype("float32")
    twin = _float64_twin(build, model)
    tfpar.testing.assert_within_float32_noise(
        [placed(x, training=False)], [model(x, training=False)], [twin(x.astype("float64"), training=False)]
    )
    _, g32 = _grads(model, x, lambda y: tf.reduce_sum(y[:, :2]))
    _, g_new = _grads(placed, x, lambda y: tf.reduce_sum(y[:, :2]))
    _, g64 = _grads(twin, x.astype("float64"), lambda y: tf.reduce_sum(y[:, :2]))
    tfpar.testing.assert_within_float32_noise(g_new, g32, g64)


def test_fit_evaluate_predict_match_the_unsplit_model_and_slots_are_placed(virtual_devices):
    """Momentum over 6 steps amplifies round-off (9.8e-6 on weights of ~0.3 on an AVX2 host), so
    the split model is compared with a float64 run, with the unsplit float32 run's deviation from
    it as the tolerance."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(40, 6)).astype("float32")
    y = rng.integers(0, 3, size=(40,))
    reference = _sequential()
    twin = _float64_twin(_sequential, reference)
    placed = split(reference, virtual_devices[:2], microbatches=2)
    for m in (reference, placed, twin):
        m.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
        m.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)  # 40 = 16 + 16 + 8
    assert twin.weights[0].dtype == "float64"
    weights = [[w.numpy() for w in m.weights] for m in (placed, reference, twin)]
    tfpar.testing.assert_within_float32_noise(*weights)
    evaluations = [m.evaluate(x, y, verbose=0) for m in (placed, reference, twin)]
    tfpar.testing.assert_within_float32_noise(*evaluations)
    predictions = [[m.predict(x, verbose=0)] for m in (placed, reference, twin)]
    tfpar.testing.assert_within_float32_noise(*predictions)
    # Optimizer slots live with their variables, on the stage devices.
    devices = {v.value.device.split("/device:")[-1] for v in placed.optimizer.variables if "momentum" in v.path}
    assert devices == {d.split("/device:")[-1] for d in placed.plan.devices}


def test_save_load_and_weights_roundtrip(tmp_path, virtual_devices):
    model = _branchy()
    placed = split(model, virtual_devices[:3], microbatches=2)
    placed.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(6)
    x = [rng.normal(size=(6, 8)).astype("float32"), rng.normal(size=(6, 4)).astype("float32")]
    placed.fit(x, rng.normal(size=(6, 2)), epochs=1, verbose=0)
    path = str(tmp_path / "placed.keras")
    placed.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded) is type(placed) and loaded.microbatches == 2
    assert loaded.plan == placed.plan
    np.testing.assert_allclose(loaded.predict(x, verbose=0), placed.predict(x, verbose=0), rtol=1e-6)
    assert loaded.get_layer("out").kernel.value.device.endswith(placed.plan.stage_of("out").device)
    loaded.fit(x, rng.normal(size=(6, 2)), epochs=1, verbose=0)  # compiled on load
    weights = str(tmp_path / "placed.weights.h5")
    placed.save_weights(weights)
    fresh = split(model, placed.plan)
    fresh.load_weights(weights)
    np.testing.assert_allclose(fresh.predict(x, verbose=0), placed.predict(x, verbose=0), rtol=1e-6)


def test_integer_inputs_and_more_microbatches_than_examples(virtual_devices):
    keras.utils.set_random_seed(7)
    model = keras.Sequential([
        keras.Input((5,), dtype="int32"),
        keras.layers.Embedding(20, 4, name="embed"),
        keras.layers.GlobalAveragePooling1D(name="pool"),
        keras.layers.Dense(2, name="head"),
    ])
    placed = split(model, virtual_devices[:2], microbatches=4)
    x = np.random.default_rng(7).integers(0, 20, size=(2, 5)).astype("int32")  # batch 2 < 4
    np.testing.assert_allclose(placed(x), model(x), rtol=1e-6, atol=1e-6)
    _, g_ref = _grads(model, x, lambda y: tf.reduce_sum(y**2))
    _, g_new = _grads(placed, x, lambda y: tf.reduce_sum(y**2))
    _assert_close_grads(g_ref, g_new)


def test_auto_microbatches_measures_and_keeps_state(virtual_devices):
    model = _branchy()
    placed = split(model, virtual_devices[:2], microbatches="auto", batch_size=8)
    timings = placed.microbatch_timings
    assert sorted(timings) == [1, 2, 4, 8]
    assert placed.microbatches == min(timings, key=lambda m: (timings[m], m))
    for a, b in zip(model.weights, placed.weights):  # tuning ran training steps, then restored
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_data_parallel_scope_is_refused_with_a_clear_error(virtual_devices):
    model = _sequential()
    with (
        tfpar.scope("mirrored", devices=virtual_devices[:2]),
        pytest.raises(RuntimeError, match=r"(?s)Cannot call tfpar.parallel.split\(\) inside.*MirroredStrategy with 2"),
    ):
        split(model, virtual_devices[2:])
    placed = split(model, virtual_devices[2:])
    placed.compile(optimizer="sgd", loss="mse")
    x = np.zeros((4, 6), "float32")
    with (
        tfpar.scope("mirrored", devices=virtual_devices[:2]),
        pytest.raises(RuntimeError, match="Cannot run a split model inside"),
    ):
        placed.fit(x, np.zeros((4, 3)), verbose=0)
    with tfpar.scope("default"):
        placed.fit(x, np.zeros((4, 3)), verbose=0)


def test_errors(virtual_devices):
    model = _sequential()
    other = make_plan(_branchy(), virtual_devices[:2])
    with pytest.raises(ValueError, match=r"not a layer|Received: 'left'"):
        split(model, other)
    with pytest.raises(ValueError, match=r"batch_norm to be one of \['full_batch', 'microbatch'\]"):
        split(model, virtual_devices[:2], batch_norm="sync")
    with pytest.raises(TypeError, match="`microbatches` to be an int"):
        split(model, virtual_devices[:2], microbatches=2.0)
    # A wrong type raises TypeError (ValueError before the validation helper).
    with pytest.raises(TypeError, match=r"`batch_size` to be an int >= 1 or None\. Received: batch_size=2\.5"):
        split(model, virtual_devices[:2], batch_size=2.5)
    with pytest.raises(ValueError, match=r"Received: batch_size=0 \(of type int\)"):
        split(model, virtual_devices[:2], batch_size=0)
    with pytest.raises(TypeError, match="Plan options are only accepted with devices"):
        split(model, make_plan(model, virtual_devices[:2]), balance="params")
    placed = split(model, virtual_devices[:2])
    with pytest.warns(UserWarning, match="jit_compile"):
        placed.compile(optimizer="sgd", loss="mse", jit_compile=True)
    assert placed.jit_compile is False


def test_optimizer_update_runs_on_the_stage_devices(virtual_devices):
    """Adam's per-variable vector math follows each gradient to its stage; only the scalar step
    and learning-rate math stays with the optimizer's iteration counter on the default device."""
    from tfpar.parallel import report

    model = _sequential()
    placed = split(model, make_plan(model, virtual_devices[1:4], balance=[1, 2, 1]), microbatches=2)
    placed.compile(optimizer="adam", loss="mse")
    x = np.ones((4, 6), "float32")
    y = np.zeros((4, 3), "float32")
    placed.train_on_batch(x, y)  # builds the optimizer; the next traced step is the one reported
    placed.make_train_function(force=True)
    nodes = report._executed_nodes(lambda data: tf.constant(placed.train_on_batch(data, y)), x, mark="tfpar_s")
    scope = placed.optimizer.name  # "adam", "adam_1", ... (unique per process)
    # By name: a traced step nested in another function (Keras's multi-step wrapper) is exported
    # both inlined and on its own.
    subs = list({name: device for name, op, device in nodes if op == "Sub" and name.split("/")[0] == scope}.values())
    n_vars = len(placed.trainable_variables)
    on_default = sum(d.endswith(virtual_devices[0]) for d in subs)
    # Per variable, Adam has 2 scalar subtractions (1 - beta**t) and 2 vector ones (g - m, g^2 - v).
    assert len(subs) == 4 * n_vars
    assert on_default == 2 * n_vars
    for device in virtual_devices[1:4]:
        assert any(d.endswith(device) for d in subs)
    slots = {v.value.device.split("/device:")[-1] for v in placed.optimizer.variables if v.shape.rank}
    assert slots == {d.split("/device:")[-1] for d in virtual_devices[1:4]}


def test_model_saved_under_the_old_module_path_still_loads(tmp_path, virtual_devices):
    """SplitModel lived in tfpar/parallel/split.py; files saved then name that module in their config.

    Keras finds the class by its registered name ("tfpar>SplitModel"), which the rename kept.
    """
    model = _branchy()
    placed = split(model, virtual_devices[:2], microbatches=2)
    path = tmp_path / "placed.keras"
    placed.save(str(path))
    old = tmp_path / "old.keras"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(old, "w") as target:
        for item in source.infolist():
            data = source.read(item.filename)
            if item.filename == "config.json":
                config = json.loads(data)
                assert config["module"] == "tfpar.parallel.placed_model"
                assert config["registered_name"] == "tfpar>SplitModel"
                config["module"] = "tfpar.parallel.split"
                data = json.dumps(config).encode()
            target.writestr(item, data)
    loaded = keras.models.load_model(str(old))
    assert type(loaded) is type(placed) and loaded.plan == placed.plan
    x = [np.ones((4, 8), "float32"), np.ones((4, 4), "float32")]
    np.testing.assert_allclose(loaded.predict(x, verbose=0), placed.predict(x, verbose=0), rtol=1e-6)
