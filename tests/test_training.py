"""tfpar.training: global batch / learning-rate helpers, warmup and throughput callbacks."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import tfpar
from tfpar import training


def test_batch_sizes_follow_the_current_strategy():
    assert training.global_batch_size(32) == 32
    with tfpar.scope("mirrored") as strategy:
        assert training.global_batch_size(32) == 128
        assert training.per_replica_batch_size(128) == 32
    assert training.global_batch_size(8, strategy) == 32


def test_per_replica_batch_size_names_valid_sizes():
    strategy = tfpar.get_strategy("mirrored", devices=["cpu:0", "cpu:1", "cpu:2"])
    with pytest.raises(ValueError, match=r"multiple of the 3 replicas\. Received: global_batch_size=32\. Use 30 or 33\."):
        training.per_replica_batch_size(32, strategy)
    with pytest.raises(TypeError, match="global_batch_size` to be an int"):
        training.per_replica_batch_size(32.0, strategy)
    with pytest.raises(ValueError, match=">= 1"):
        training.global_batch_size(0, strategy)


def test_scale_learning_rate_rules():
    assert training.scale_learning_rate(0.1, factor=4) == pytest.approx(0.4)
    assert training.scale_learning_rate(1e-3, factor=4, rule="sqrt") == pytest.approx(2e-3)
    with tfpar.scope("mirrored", devices=["cpu:0", "cpu:1"]):
        assert training.scale_learning_rate(0.1) == pytest.approx(0.2)
    with pytest.raises(ValueError, match=r"rule to be one of \['linear', 'sqrt'\]"):
        training.scale_learning_rate(0.1, factor=2, rule="cubic")
    with pytest.raises(ValueError, match=r"finite number > 0\. Received: "):
        training.scale_learning_rate(-1.0, factor=2)
    with pytest.raises(ValueError, match=r"`factor` to be a finite number > 0"):
        training.scale_learning_rate(0.1, factor=0)


class _RecordLR(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.rates = []

    def on_train_batch_end(self, batch, logs=None):
        self.rates.append(float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))


def _tiny_model(lr=0.4):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
    return model


def test_warmup_ramps_linearly_then_holds_target():
    x, y = np.ones((40, 2), "float32"), np.ones((40, 1), "float32")
    model = _tiny_model()
    warmup = training.LearningRateWarmup(warmup_steps=4)
    recorder = _RecordLR()
    model.fit(x, y, batch_size=5, epochs=1, verbose=0, callbacks=[warmup, recorder])
    np.testing.assert_allclose(recorder.rates, [0.04, 0.13, 0.22, 0.31, 0.4, 0.4, 0.4, 0.4], rtol=1e-5)
    assert warmup.learning_rate_at(2) == pytest.approx(0.22)


def test_warmup_rejects_schedules_and_bad_values():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.9)), loss="mse")
    with pytest.raises(ValueError, match="constant learning rate"):
        model.fit(np.ones((4, 2)), np.ones((4, 1)), verbose=0, callbacks=[training.LearningRateWarmup(2)])
    with pytest.raises(ValueError, match=r"Expected `warmup_steps` to be an int >= 1\. Received: warmup_steps=0"):
        training.LearningRateWarmup(0)
    with pytest.raises(ValueError, match=r"finite number >= 0\. Received: target_learning_rate=-1"):
        training.LearningRateWarmup(3, target_learning_rate=-1)


def test_throughput_checks_skip_first_steps():
    # A wrong type raises TypeError (it raised ValueError before the validation helper).
    with pytest.raises(TypeError, match=r"Expected `skip_first_steps` to be an int >= 0\. Received: skip_first_steps=1\.5"):
        training.Throughput(8, skip_first_steps=1.5)
    with pytest.raises(ValueError, match=r"Received: skip_first_steps=-1 \(of type int\)"):
        training.Throughput(8, skip_first_steps=-1)


class _FakeClock(keras.callbacks.Callback):
    """Drives Throughput's clock: 10 ms per training step, 100 s per validation run. The rate is
    then exact, whatever the machine's load (a wall-clock bound fails on a busy CI host)."""

    def __init__(self):
        super().__init__()
        self.now = 0.0

    def perf_counter(self):
        return self.now

    def on_train_batch_begin(self, batch, logs=None):
        self.now += 0.01

    def on_test_begin(self, logs=None):
        self.now += 100.0


def test_throughput_is_logged_per_epoch_and_excludes_validation(monkeypatch):
    clock = _FakeClock()
    monkeypatch.setattr(training, "time", clock)  # training.time.perf_counter() reads the fake clock
    x, y = np.ones((64, 2), "float32"), np.ones((64, 1), "float32")
    model = _tiny_model(0.01)
    history = model.fit(
        x, y, batch_size=8, epochs=2, verbose=0, validation_data=(x, y),
        callbacks=[clock, training.Throughput(8)],
    )
    rates = history.history["samples_per_second"]
    # 8 examples per 10 ms step = 800/s (the first epoch's first step untimed); counting the 100 s
    # of validation would give < 1/s.
    assert rates == pytest.approx([800.0, 800.0]), rates
