"""The `tfpar` command: train end to end, doctor, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tfpar import job


def _tfpar(*args, timeout=600, cwd=None):
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", "TF_CPP_MIN_LOG_LEVEL")}
    return subprocess.run(
        [sys.executable, "-m", "tfpar", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env
    )


@pytest.mark.slow
def test_train_default_reaches_the_documented_accuracy(tmp_path):
    result = _tfpar("train", "--output", str(tmp_path / "report"), "--min-accuracy", "0.9")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "strategy        MirroredStrategy (--strategy auto)" in out
    assert "replicas        2" in out
    assert "samples/s" in out and "test accuracy" in out
    assert "I0000" not in result.stderr and "oneDNN" not in result.stderr  # the banner is filtered
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["replicas"] == 2 and metrics["test_accuracy"] >= 0.9
    assert len(metrics["history"]["loss"]) == job.TrainConfig.epochs
    assert (tmp_path / "report" / "training.png").stat().st_size > 10_000


def test_train_with_options(tmp_path):
    result = _tfpar(
        "train", "--model", "vgg11", "--strategy", "mirrored", "--devices", "3", "--epochs", "1",
        "--batch-size", "30", "--width", "0.125", "--optimizer", "sgd", "--lr", "0.01",
        "--output", str(tmp_path), "--quiet",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "replicas        3" in result.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["config"]["model"] == "vgg11" and metrics["config"]["optimizer"] == "sgd"
    assert metrics["config"]["strategy_options"]["devices"] == ["/device:CPU:0", "/device:CPU:1", "/device:CPU:2"]


def test_train_model_parallel(tmp_path):
    result = _tfpar("train", "--model-parallel", "2", "--microbatches", "2", "--epochs", "1", "--width", "0.125",
                    "--output", str(tmp_path), "--quiet")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| 1     | /device:CPU:1 |" in result.stdout  # the plan table: stage 1 on the second device
    assert "replicas        1 (model split over 2 devices)" in result.stdout
    bad = _tfpar("train", "--model-parallel", "2", "--strategy", "mirrored", timeout=120)
    assert bad.returncode == 2 and "cannot be combined with --strategy mirrored (valid: auto, default)" in bad.stderr
    lonely = _tfpar("train", "--microbatches", "4", timeout=120)
    assert lonely.returncode == 2 and "add --model-parallel K" in lonely.stderr
    ignored = _tfpar("train", "--strategy", "one_device", "--devices", "2", timeout=120)
    assert ignored.returncode == 2 and "--strategy one_device does not take it" in ignored.stderr


def test_plan_command(tmp_path):
    result = _tfpar("plan", "vgg16", "--devices", "4", "--balance", "params", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "4 stages, balance='params'" in result.stdout and "fc1" in result.stdout
    over = _tfpar("plan", "alexnet", "--devices", "2", "--memory-limit", "100MB", timeout=300)
    assert over.returncode == 1 and "over by" in over.stderr
    too_many = _tfpar("plan", "alexnet", "--devices", "50", timeout=300)
    assert too_many.returncode == 2 and "tfpar plan: error:" in too_many.stderr
    bad = _tfpar("plan", "alexnet", "--devices", "2", "--memory-limit", "lots", timeout=120)
    assert bad.returncode == 2 and "expected a size such as 16GB" in bad.stderr


def test_train_on_an_image_folder(tmp_path):
    import numpy as np
    import tensorflow as tf

    from tfpar import datasets

    images, labels = datasets.load_digits()
    for index in range(120):
        folder = tmp_path / "digits" / f"class_{labels[index]}"
        folder.mkdir(parents=True, exist_ok=True)
        png = tf.io.encode_png(np.uint8(images[index] * 15))
        (folder / f"{index}.png").write_bytes(png.numpy())
    result = _tfpar("train", "--data", str(tmp_path / "digits"), "--epochs", "1", "--width", "0.125",
                    "--batch-size", "16", "--output", str(tmp_path / "report"), "--quiet")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"{tmp_path / 'digits'} images 64x64x3" in result.stdout  # read as RGB, resized
    missing = _tfpar("train", "--data", str(tmp_path / "nothing_here"), timeout=120)
    assert missing.returncode == 2 and "received" in missing.stderr and "(not found)" in missing.stderr


def test_train_below_min_accuracy_exits_1(tmp_path):
    result = _tfpar("train", "--strategy", "one_device", "--epochs", "1", "--width", "0.125",
                    "--min-accuracy", "1.0", "--output", str(tmp_path), "--quiet")
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "below --min-accuracy 1.0" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--model", "vgg99"], "invalid choice: 'vgg99' (choose from 'alexnet'"),
        (["train", "--strategy", "mirrord"], "invalid choice: 'mirrord' (choose from 'auto'"),
        (["train", "--epochs", "0"], "expected a positive integer, received '0'"),
        (["train", "--mixed-precision", "fp8"], "choose from 'mixed_float16', 'mixed_bfloat16'"),
        (["fly"], "invalid choice: 'fly' (choose from 'train', 'plan', 'launch', 'doctor'"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_bad_arguments_exit_2_and_name_the_choices(args, message):
    result = _tfpar(*args, timeout=120)
    assert result.returncode == 2
    assert message in result.stderr


@pytest.mark.multiprocess
def test_train_under_launch_runs_multi_worker(tmp_path):
    result = _tfpar("launch", "--workers", "2", "--", sys.executable, "-m", "tfpar", "train", "--epochs", "1",
                    "--width", "0.125", "--quiet", "--output", str(tmp_path / "report"))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "[worker:0] strategy        MultiWorkerMirroredStrategy (--strategy auto)" in result.stdout
    assert "[worker:1] report          written by the chief" in result.stdout
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["metrics.json", "training.png"]


def test_doctor_and_version():
    result = _tfpar("doctor", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tensorflow  2." in result.stdout and "keras       3." in result.stdout
    assert "cluster     none detected" in result.stdout
    version = _tfpar("--version", timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("tfpar ")


def test_train_config_validates():
    with pytest.raises(ValueError, match=r"optimizer to be one of \['adam', 'sgd'\]"):
        job.TrainConfig(optimizer="rmsprop")
    with pytest.raises(ValueError, match="epochs to be a positive int"):
        job.TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="0 < test_fraction < 1"):
        job.TrainConfig(test_fraction=1.5)
