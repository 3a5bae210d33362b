"""Every bad input gives a clear, early error (issue 12).

A table of bad inputs, each with the class of its outcome:

* Python API: the exception type, and a pattern the message must match (it names the offending
  value, and usually what is valid).
* ``tfpar`` command, run in-process through ``tfpar.cli.main``: exit status 2, exactly one
  ``tfpar <command>: error: ...`` line naming the value (argparse adds its usage lines before it)
  and never a traceback. Resolve-phase errors must come before any expensive work: the tests
  make configuring devices, building a model and training fail loudly if they are reached.
* A handful of subprocess runs check the real console script end to end.

Never a hang: every test has a timeout. No test asserts wall-clock time.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfpar
from tfpar import cli, cluster, devices, job, models, training
from tfpar import data as td
from tfpar.data import readers
from tfpar.parallel import cost

pytestmark = pytest.mark.timeout(120)

NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> SimpleNamespace:
    """Bad (and a few good) files and folders, made once."""
    root = tmp_path_factory.mktemp("bad_inputs")
    jpeg = tf.io.encode_jpeg(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).numpy()

    def folder(name: str, files: dict[str, bytes]) -> str:
        for relative, content in files.items():
            path = root / name / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        (root / name).mkdir(exist_ok=True)
        return str(root / name)

    paths = SimpleNamespace(
        empty_dir=folder("empty", {}),
        no_images=folder("no_images", {"cats/readme.txt": b"not an image"}),
        corrupt=folder("corrupt", {"a/good.jpg": jpeg, "b/corrupt.jpg": b"<html>404 Not Found</html>"}),
        truncated=folder("truncated", {"a/good.jpg": jpeg, "a/truncated.jpg": jpeg[: len(jpeg) // 2],
                                       "b/good.jpg": jpeg}),
        text=str(root / "notes.txt"),
        tiny_text=str(root / "tiny.txt"),
        garbage_npz=str(root / "garbage.npz"),
        garbage_npy=str(root / "garbage.npy"),
        pickled_npz=str(root / "pickled.npz"),
        only_x_npz=str(root / "only_x.npz"),
        image_file=str(root / "photo.jpg"),
        a_file=str(root / "a_file"),
    )
    (root / "notes.txt").write_text("epoch,loss\n1,0.5\n2,0.25\n" * 20)
    (root / "tiny.txt").write_text("hi\n")
    (root / "garbage.npz").write_bytes(b"\x00garbage bytes, not a zip archive" * 4)
    (root / "garbage.npy").write_bytes(b"\x00garbage bytes, not an npy file" * 4)
    np.savez(root / "pickled.npz", x=np.array([{"a": 1}] * 4, dtype=object), y=np.arange(4))
    np.savez(root / "only_x.npz", x=np.zeros((4, 8, 8, 1), np.float32))
    (root / "photo.jpg").write_bytes(jpeg)
    (root / "a_file").write_text("a file, not a folder")
    paths.gzip_records = readers.write_tfrecords(
        {"x": np.zeros((4, 2), np.float32)}, str(root / "gzip"), num_files=1, compression_type="GZIP"
    )[0]
    return paths


@pytest.fixture(scope="module")
def small_model() -> keras.Model:
    return keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(4, name="d1"), keras.layers.Dense(2, name="d2")], name="small"
    )


def _first(dataset: tf.data.Dataset) -> list:
    return list(dataset.as_numpy_iterator())


# === Python API: (id, call, exception type, pattern the message matches) ===
# `call(bad, model)` makes the call; `bad` holds the files above, `model` a tiny built model.

Call = Callable[[SimpleNamespace, keras.Model], Any]
API_CASES: list[tuple[str, Call, type[BaseException], str]] = [
    # tfpar.training: NaN / inf / wrong types
    ("lr-nan", lambda b, m: training.scale_learning_rate(NAN, factor=2), ValueError, r"finite .*base_learning_rate=nan"),
    ("lr-inf", lambda b, m: training.scale_learning_rate(INF, factor=2), ValueError, r"base_learning_rate=inf"),
    ("lr-negative", lambda b, m: training.scale_learning_rate(-0.1, factor=2), ValueError, r"base_learning_rate=-0.1"),
    ("lr-string", lambda b, m: training.scale_learning_rate("0.1", factor=2), TypeError, r"base_learning_rate='0.1' \(of type str\)"),
    ("factor-nan", lambda b, m: training.scale_learning_rate(0.1, factor=NAN), ValueError, r"factor=nan"),
    ("factor-neg-inf", lambda b, m: training.scale_learning_rate(0.1, factor=-INF), ValueError, r"factor=-inf"),
    ("warmup-target-nan", lambda b, m: training.LearningRateWarmup(3, target_learning_rate=NAN), ValueError, r"target_learning_rate=nan"),
    ("warmup-initial-inf", lambda b, m: training.LearningRateWarmup(3, initial_learning_rate=INF), ValueError, r"initial_learning_rate=inf"),
    ("warmup-target-string", lambda b, m: training.LearningRateWarmup(3, target_learning_rate="1e-3"), TypeError, r"target_learning_rate='1e-3'"),
    ("warmup-steps-float", lambda b, m: training.LearningRateWarmup(2.5), TypeError, r"warmup_steps=2.5"),
    ("throughput-zero", lambda b, m: training.Throughput(0), ValueError, r"global_batch_size=0"),
    # tfpar.job.TrainConfig: checked when made, before TensorFlow does anything
    ("config-lr-nan", lambda b, m: job.TrainConfig(learning_rate=NAN), ValueError, r"learning_rate=nan"),
    ("config-lr-inf", lambda b, m: job.TrainConfig(learning_rate=INF), ValueError, r"learning_rate=inf"),
    ("config-lr-string", lambda b, m: job.TrainConfig(learning_rate="1e-3"), TypeError, r"learning_rate='1e-3'"),
    ("config-width-inf", lambda b, m: job.TrainConfig(width=INF), ValueError, r"width=inf"),
    ("config-width-nan", lambda b, m: job.TrainConfig(width=NAN), ValueError, r"width=nan"),
    ("config-test-fraction-nan", lambda b, m: job.TrainConfig(test_fraction=NAN), ValueError, r"test_fraction=nan"),
    ("config-image-size-too-small", lambda b, m: job.TrainConfig(image_size=8), ValueError, r"image_size >= 55.*alexnet.*image_size=8"),
    ("config-image-size-vgg", lambda b, m: job.TrainConfig(model="vgg11", image_size=16), ValueError, r"image_size >= 32.*image_size=16"),
    ("config-model-typo", lambda b, m: job.TrainConfig(model="alexnett"), ValueError, r"Did you mean 'alexnet'.*name='alexnett'"),
    ("config-strategy-typo", lambda b, m: job.TrainConfig(strategy="mirrord"), ValueError, r"'mirrored'.*strategy='mirrord'"),
    ("config-seed-negative", lambda b, m: job.TrainConfig(seed=-1), ValueError, r"0 <= seed <= 4294967295.*seed=-1"),
    ("config-microbatches-zero", lambda b, m: job.TrainConfig(microbatches=0), ValueError, r"microbatches=0"),
    ("config-mixed-precision", lambda b, m: job.TrainConfig(mixed_precision="fp8"), ValueError, r"mixed_float16.*mixed_precision='fp8'"),
    ("config-data-empty-folder", lambda b, m: job.TrainConfig(data=b.empty_dir), ValueError, r"Found neither class sub-folders.*empty'"),
    ("config-data-text-file", lambda b, m: job.TrainConfig(data=b.text), ValueError, r"notes.txt' is not a TFRecord file"),
    ("config-data-no-images", lambda b, m: job.TrainConfig(data=b.no_images), ValueError, r"\['cats'\].*no image files"),
    ("load-data-corrupt-jpeg", lambda b, m: job.load_data(job.TrainConfig(data=b.corrupt)), job.InputError, r"corrupt\.jpg' is not a JPEG, PNG"),
    ("load-data-truncated-jpeg", lambda b, m: job.load_data(job.TrainConfig(data=b.truncated)), job.InputError, r"cannot decode the image file \S*truncated\.jpg"),
    ("load-data-npz-without-y", lambda b, m: job.load_data(job.TrainConfig(data=b.only_x_npz)), job.InputError, r"\(image, label\) pairs.*only_x\.npz"),
    # tfpar.devices
    ("virtual-devices-10000", lambda b, m: tfpar.configure_virtual_devices(10000), ValueError, r"1 <= n <= 64.*n=10000"),
    ("virtual-devices-zero", lambda b, m: tfpar.configure_virtual_devices(0), ValueError, r"n=0"),
    ("virtual-devices-float", lambda b, m: tfpar.configure_virtual_devices(2.0), TypeError, r"n=2.0"),
    ("virtual-devices-nan", lambda b, m: tfpar.configure_virtual_devices(NAN), TypeError, r"n=nan"),
    ("gpu-memory-nan", lambda b, m: tfpar.configure_virtual_devices(4, "GPU", memory_limit_mb=NAN), TypeError, r"memory_limit_mb=nan"),
    ("gpu-memory-zero", lambda b, m: tfpar.configure_virtual_devices(4, "GPU", memory_limit_mb=0), ValueError, r"memory_limit_mb=0"),
    ("device-name", lambda b, m: devices.normalize_device("cpu:x"), ValueError, r"device='cpu:x'"),
    # tfpar.parallel: planner and cost options
    ("bytes-overflow", lambda b, m: cost.parse_bytes("1e999GB"), ValueError, r"finite.*'1e999GB'"),
    ("bytes-nan", lambda b, m: cost.parse_bytes(NAN), ValueError, r"Received: nan"),
    ("bytes-inf", lambda b, m: cost.parse_bytes(INF), ValueError, r"Received: inf"),
    ("bytes-nan-string", lambda b, m: cost.parse_bytes("nanGB"), ValueError, r"'nanGB'"),
    ("plan-speed-nan", lambda b, m: tfpar.parallel.plan(m, 2, device_speeds=[1.0, NAN]), ValueError, r"device_speeds=\[1.0, nan\]"),
    ("plan-speed-inf", lambda b, m: tfpar.parallel.plan(m, 2, device_speeds=[INF, 1.0]), ValueError, r"device_speeds=\[inf, 1.0\]"),
    ("plan-memory-nan", lambda b, m: tfpar.parallel.plan(m, 2, memory_limits=NAN), ValueError, r"Received: nan"),
    ("plan-memory-inf-string", lambda b, m: tfpar.parallel.plan(m, 2, memory_limits="infGB"), ValueError, r"'infGB'"),
    ("plan-batch-float", lambda b, m: tfpar.parallel.plan(m, 2, batch_size=2.5), TypeError, r"batch_size=2.5"),
    ("plan-too-many-devices", lambda b, m: tfpar.parallel.plan(m, 3), ValueError, r"at most 2 devices.*Received: 3 devices"),
    # tfpar.models: input size checked from the name, before building
    ("input-too-small", lambda b, m: models.check_input_shape("alexnet", (8, 8, 3)), ValueError, r"at least 55x55.*input_shape=\(8, 8, 3\)"),
    ("input-channels-first", lambda b, m: models.check_input_shape("vgg16", (3, 224, 224)), ValueError, r"channels-first.*input_shape=\(224, 224, 3\)"),
    ("input-two-dims", lambda b, m: models.check_input_shape("resnet50", (32, 32)), ValueError, r"three integers.*input_shape=\(32, 32\)"),
    ("min-size-unknown-model", lambda b, m: models.min_input_size("vgg17"), ValueError, r"Available names.*name='vgg17'"),
    ("model-width-nan", lambda b, m: models.vgg11(input_shape=(32, 32, 3), width=NAN), ValueError, r"width=nan"),
    ("model-dropout-nan", lambda b, m: models.get("vgg11", input_shape=(32, 32, 3), dropout=NAN), ValueError, r"dropout=nan"),
    # tfpar.data: files named, what was expected said
    ("read-empty-folder", lambda b, m: td.read(b.empty_dir), ValueError, r"Found neither .*empty'.*Expected an image folder"),
    ("read-text-file", lambda b, m: td.read(b.text), ValueError, r"notes.txt' is not a TFRecord file.*starts with b'epoch"),
    ("read-tiny-text-file", lambda b, m: td.read(b.tiny_text), ValueError, r"tiny.txt' is not a TFRecord file"),
    ("read-garbage-npz", lambda b, m: td.read(b.garbage_npz), ValueError, r"garbage.npz' is not a .npz file"),
    ("read-garbage-npy", lambda b, m: td.read(b.garbage_npy), ValueError, r"garbage.npy' is not a .npy file"),
    ("read-pickled-npz", lambda b, m: td.read(b.pickled_npz), ValueError, r"pickled.npz' holds object arrays"),
    ("read-one-image-file", lambda b, m: td.read(b.image_file), ValueError, r"photo.jpg' is not a TFRecord file: it is a JPEG image"),
    ("read-gzip-without-compression", lambda b, m: td.read_tfrecords(b.gzip_records), ValueError, r"GZIP-compressed: pass compression_type='GZIP'"),
    ("read-no-match", lambda b, m: td.read(b.empty_dir + "/*.tfrecord"), ValueError, r"Nothing matches .*\*\.tfrecord'"),
    ("images-corrupt", lambda b, m: td.read_images(b.corrupt), ValueError, r"1 of 2 files .*corrupt\.jpg' is not a JPEG.*on_error='skip'"),
    ("images-truncated", lambda b, m: _first(td.read_images(b.truncated)), tf.errors.InvalidArgumentError, r"cannot decode the image file\] \[\S*truncated\.jpg"),
    ("images-on-error", lambda b, m: td.read_images(b.corrupt, on_error="ignore"), ValueError, r"\['raise', 'skip'\].*on_error='ignore'"),
    ("pipeline-batched", lambda b, m: td.pipeline(tf.data.Dataset.range(8).batch(2), batch_size=4), ValueError, r"batches of batches.*BatchDataset.*\.unbatch\(\)"),
    ("pipeline-batched-mapped", lambda b, m: td.pipeline(tf.data.Dataset.range(8).batch(2).map(lambda x: x * 2).prefetch(1), batch_size=4), ValueError, r"Expected unbatched examples"),
    ("pipeline-batch-zero", lambda b, m: td.pipeline(tf.data.Dataset.range(8), batch_size=0), ValueError, r"batch_size"),
    ("split-nan", lambda b, m: td.split(tf.data.Dataset.range(8), NAN), ValueError, r"fractions=nan"),
    ("split-list-nan", lambda b, m: td.split(tf.data.Dataset.range(8), [0.5, NAN]), ValueError, r"fractions=\[0.5, nan\]"),
    ("from-numpy-lengths", lambda b, m: td.from_numpy(np.zeros((4, 2)), np.zeros(3)), ValueError, r"'x': 4, 'y': 3"),
    # tfpar.cluster: TF_CONFIG
    ("tf-config-json", lambda b, m: cluster.parse_tf_config("{bad"), ValueError, r"(?s)not valid JSON.*TF_CONFIG=\{bad"),
    ("tf-config-index-nan", lambda b, m: cluster.parse_tf_config(
        '{"cluster": {"worker": ["127.0.0.1:2222"]}, "task": {"type": "worker", "index": NaN}}'), ValueError, r"task index to be an integer. Received: nan"),
    ("tf-config-port", lambda b, m: cluster.parse_tf_config(
        {"cluster": {"worker": ["127.0.0.1:99999"]}, "task": {"type": "worker", "index": 0}}), ValueError, r"port in 1..65535.*127.0.0.1:99999"),
]


@pytest.mark.parametrize(("call", "error", "pattern"), [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_bad_input_gives_a_clear_error(bad, small_model, call, error, pattern):
    with pytest.raises(error, match=pattern):
        call(bad, small_model)


# === tfpar command, in-process: (id, argv, TF_CONFIG or None, pattern the error line matches) ===
# "{name}" in an argument is replaced by that path of the `bad` fixture.

CLI_CASES: list[tuple[str, list[str], str | None, str]] = [
    ("lr-nan", ["train", "--lr", "nan"], None, r"argument --lr: expected a finite positive number, received 'nan'"),
    ("lr-inf", ["train", "--lr", "inf"], None, r"argument --lr: .*received 'inf'"),
    ("lr-minus-inf", ["train", "--lr=-inf"], None, r"argument --lr: .*received '-inf'"),
    ("lr-zero", ["train", "--lr", "0"], None, r"argument --lr: .*received '0'"),
    ("width-inf", ["train", "--width", "inf"], None, r"argument --width: .*received 'inf'"),
    ("width-nan", ["train", "--width", "NaN"], None, r"argument --width: .*received 'NaN'"),
    ("min-accuracy-nan", ["train", "--min-accuracy", "nan"], None, r"argument --min-accuracy: .*received 'nan'"),
    ("min-accuracy-above-1", ["train", "--min-accuracy", "1.5"], None, r"\(0, 1\], received '1.5'"),
    ("epochs-zero", ["train", "--epochs", "0"], None, r"argument --epochs: expected a positive integer, received '0'"),
    ("batch-size-float", ["train", "--batch-size", "1.5"], None, r"argument --batch-size: .*received '1.5'"),
    ("seed-negative", ["train", "--seed", "-1"], None, r"argument --seed: expected a seed from 0 to 4294967295, received '-1'"),
    ("seed-too-big", ["train", "--seed", str(2**32)], None, r"received '4294967296'"),
    ("data-missing", ["train", "--data", "{empty_dir}/nothing"], None, r"argument --data: .*nothing' \(not found\)"),
    ("data-empty-folder", ["train", "--data", "{empty_dir}"], None, r"argument --data: Found neither class sub-folders .*empty'"),
    ("data-text-file", ["train", "--data", "{text}"], None, r"argument --data: .*notes.txt' is not a TFRecord file"),
    ("data-garbage-npz", ["train", "--data", "{garbage_npz}"], None, r"garbage.npz' is not a .npz file"),
    ("data-folder-without-images", ["train", "--data", "{no_images}"], None, r"no image files"),
    ("image-size-8", ["train", "--image-size", "8"], None, r"^tfpar train: error: Expected image_size >= 55.*image_size=8"),
    ("image-size-vgg", ["train", "--model", "vgg11", "--image-size", "31"], None, r"image_size >= 32.*vgg11.*image_size=31"),
    ("devices-1000", ["train", "--devices", "1000"], None, r"^tfpar train: error: --devices 1000: .*at most 64"),
    ("model-parallel-1000", ["train", "--model-parallel", "1000"], None, r"--model-parallel 1000: .*at most 64"),
    ("model-parallel-with-mirrored", ["train", "--model-parallel", "2", "--strategy", "mirrored"], None, r"cannot be combined with --strategy mirrored"),
    ("microbatches-alone", ["train", "--microbatches", "4"], None, r"--microbatches applies to a split model"),
    ("output-is-a-file", ["train", "--output", "{a_file}"], None, r"--output '\S*a_file' is a file"),
    ("model-typo", ["train", "--model", "vgg99"], None, r"argument --model: invalid choice: 'vgg99'"),
    ("tf-config-json", ["train"], "{bad", r"^tfpar train: error: TF_CONFIG is not valid JSON.*TF_CONFIG=\{bad"),
    ("tf-config-job", ["train"], json.dumps({"cluster": {"wrker": ["127.0.0.1:2222"]}, "task": {"type": "worker", "index": 0}}),
     r"Unknown job name 'wrker'.*Did you mean 'worker'"),
    ("tf-config-index", ["train"], json.dumps({"cluster": {"worker": ["127.0.0.1:2222"]}, "task": {"type": "worker", "index": 3}}),
     r"Task index 3 is out of range"),
    ("plan-input-too-small", ["plan", "alexnet", "--devices", "2", "--input-shape", "8", "8", "3"], None,
     r"^tfpar plan: error: alexnet needs an input of at least 55x55 .*input_shape=\(8, 8, 3\)"),
    ("plan-channels-first", ["plan", "vgg16", "--devices", "2", "--input-shape", "3", "224", "224"], None, r"channels-first"),
    ("plan-memory-nan", ["plan", "alexnet", "--devices", "2", "--memory-limit", "nanGB"], None, r"argument --memory-limit: .*received 'nanGB'"),
    ("plan-memory-overflow", ["plan", "alexnet", "--devices", "2", "--memory-limit", "1e999GB"], None, r"received '1e999GB'"),
    ("plan-memory-zero", ["plan", "alexnet", "--devices", "2", "--memory-limit", "0GB"], None, r"received '0GB'"),
    ("plan-devices-zero", ["plan", "alexnet", "--devices", "0"], None, r"argument --devices: .*received '0'"),
    ("command-typo", ["trian"], None, r"invalid choice: 'trian'"),
]
# Cases that fail after the model is built (the planner's check of the device count).
CLI_AFTER_BUILD_CASES: list[tuple[str, list[str], str | None, str]] = [
    ("plan-more-devices-than-layers", ["plan", "alexnet", "--devices", "50", "--input-shape", "64", "64", "3"], None,
     r"^tfpar plan: error: Expected at most 25 devices: model 'alexnet' has 25 layers"),
]


def _expensive(name: str) -> Callable[..., Any]:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"{name} ran before the bad argument was refused")

    return refuse


def _run_cli(argv: list[str], bad: SimpleNamespace, capsys) -> tuple[int, list[str]]:
    argv = [arg.format(**vars(bad)) for arg in argv]
    try:
        status = cli.main(argv)
    except SystemExit as exit_:  # argparse's errors
        status = exit_.code
    return status, capsys.readouterr().err.splitlines()


def _assert_one_error_line(lines: list[str], pattern: str) -> None:
    text = "\n".join(lines)
    assert "Traceback" not in text, text
    errors = [line for line in lines if line.startswith("tfpar") and ": error: " in line]
    assert len(errors) == 1, text
    # Anything else is argparse's usage text, printed before the error line.
    assert lines[-1] == errors[0] and all(line.startswith(("usage:", " ")) for line in lines[:-1]), text
    assert re.search(pattern, errors[0]), f"{pattern!r} not in {errors[0]!r}"


@pytest.mark.parametrize(("argv", "tf_config", "pattern"), [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_argument_exits_2_with_one_line(bad, capsys, monkeypatch, argv, tf_config, pattern):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    if tf_config is not None:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    monkeypatch.setattr(cli, "_configure_devices", _expensive("configuring devices"))
    monkeypatch.setattr(models, "get", _expensive("building the model"))
    monkeypatch.setattr(job, "train", _expensive("training"))
    status, lines = _run_cli(argv, bad, capsys)
    assert status == 2, lines
    _assert_one_error_line(lines, pattern)


@pytest.mark.parametrize(("argv", "tf_config", "pattern"), [c[1:] for c in CLI_AFTER_BUILD_CASES],
                         ids=[c[0] for c in CLI_AFTER_BUILD_CASES])
def test_cli_bad_argument_found_by_the_planner_exits_2(bad, capsys, argv, tf_config, pattern):
    status, lines = _run_cli(argv, bad, capsys)
    assert status == 2, lines
    _assert_one_error_line(lines, pattern)


@pytest.mark.parametrize("argv", [["--debug", "train", "--image-size", "8"], ["train", "--image-size", "8", "--debug"]])
def test_debug_shows_the_traceback_of_a_usage_error(bad, capsys, argv):
    status, lines = _run_cli(argv, bad, capsys)
    text = "\n".join(lines)
    assert status == 2
    assert "Traceback (most recent call last)" in text and "ValueError: Expected image_size >= 55" in text
    assert lines[-1].startswith("tfpar train: error: Expected image_size >= 55")


def test_a_bug_keeps_its_traceback(bad, monkeypatch):
    """A ValueError outside the resolve phase is not a usage error: it propagates (exit 1)."""
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("a bug inside tfpar")

    monkeypatch.setattr(cli, "_configure_devices", lambda requested: None)
    monkeypatch.setattr(job, "train", broken)
    with pytest.raises(ValueError, match="a bug inside tfpar"):
        cli.main(["train", "--strategy", "default"])


# === the real console script: a handful of subprocesses ===


def _tfpar(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", "TF_CPP_MIN_LOG_LEVEL")}
    return subprocess.run([sys.executable, "-m", "tfpar", *args], capture_output=True, text=True, timeout=300,
                          env={**clean, **(env or {})})


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ": error: " in line]


@pytest.mark.multiprocess
def test_console_script_refuses_nan_learning_rate():
    result = _tfpar("train", "--lr", "nan")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert _error_lines(result.stderr) == ["tfpar train: error: argument --lr: expected a finite positive number, received 'nan'"]


@pytest.mark.multiprocess
def test_console_script_reports_a_malformed_tf_config_in_one_line():
    result = _tfpar("train", env={"TF_CONFIG": '{"cluster": {"worker": ["127.0.0.1:2222"]}, "task": '})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    (line,) = _error_lines(result.stderr)
    assert line.startswith("tfpar train: error: TF_CONFIG is not valid JSON")


def test_skipping_undecodable_training_images(bad, recwarn):
    """`tfpar train --on-error skip` (TrainConfig.on_error) trains on the images that decode."""
    x_train, y_train, x_test, y_test = job.load_data(job.TrainConfig(data=bad.truncated, on_error="skip"))
    assert len(y_train) + len(y_test) == 2  # of 3 files: a/truncated.jpg is left out
    with pytest.raises(ValueError, match=r"on_error to be 'raise' or 'skip'. Received: on_error='ignore'"):
        job.TrainConfig(on_error="ignore")


@pytest.mark.multiprocess
def test_console_script_names_a_corrupt_training_image(bad):
    """Found once the data is read (after the strategy is made): still a usage error, exit 2."""
    result = _tfpar("train", "--data", bad.truncated, "--strategy", "default", "--epochs", "1")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = _error_lines(result.stderr)
    assert line.startswith(f"tfpar train: error: Cannot read the training data {bad.truncated!r}")
    assert "truncated.jpg" in line and "on_error=skip" in line
    assert "--on-error {raise,skip}" in _tfpar("train", "--help").stdout

