"""The `tfpar` command: train end to end, doctor, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tfpar import cli, job


def _never(name):
    def refuse(*args, **kwargs):
        raise AssertionError(f"{name} ran before the bad argument was refused")

    return refuse


def _tfpar(*args, timeout=600, cwd=None):
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", "TF_CPP_MIN_LOG_LEVEL")}
    return subprocess.run(
        [sys.executable, "-m", "tfpar", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env
    )


@pytest.mark.multiprocess
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


@pytest.mark.multiprocess
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


@pytest.mark.multiprocess
def test_train_model_parallel(tmp_path):
    result = _tfpar("train", "--model-parallel", "2", "--microbatches", "2", "--epochs", "1", "--width", "0.125",
                    "--output", str(tmp_path), "--quiet")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| 1     | /device:CPU:1 |" in result.stdout  # the plan table: stage 1 on the second device
    assert "replicas        1 (model split over 2 devices)" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model-parallel", "2", "--strategy", "mirrored"],
         "cannot be combined with --strategy mirrored (valid: auto, default)"),
        (["--microbatches", "4"], "add --model-parallel K"),
        (["--strategy", "one_device", "--devices", "2"], "--strategy one_device does not take it"),
        (["--tune", "--strategy", "ps"], "it does not run under --strategy ps"),
        (["--tune-budget", "10"], "--tune-budget limits the tuning: add --tune"),
    ],
)
def test_train_refuses_combinations_in_process(capsys, monkeypatch, args, message):
    monkeypatch.setattr(cli, "_configure_devices", _never("configuring devices"))
    assert cli.main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tfpar train: error: ") and message in err and err.count("\n") == 1


@pytest.mark.multiprocess
def test_plan_command(tmp_path):
    result = _tfpar("plan", "vgg16", "--devices", "4", "--balance", "params", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "4 stages, balance='params'" in result.stdout and "fc1" in result.stdout
    over = _tfpar("plan", "alexnet", "--devices", "2", "--memory-limit", "100MB", timeout=300)
    assert over.returncode == 1 and "over by" in over.stderr


def test_plan_errors_in_process(capsys):
    # A plan that does not fit the memory limit is a result (exit 1, the per-stage table); a
    # bad argument is a usage error (exit 2, one line).
    assert cli.main(["plan", "alexnet", "--devices", "2", "--memory-limit", "1MB", "--input-shape", "64", "64", "3"]) == 1
    over = capsys.readouterr().err
    assert over.startswith("tfpar plan: error: No split of model 'alexnet'") and "over by" in over
    assert cli.main(["plan", "alexnet", "--devices", "50", "--input-shape", "64", "64", "3"]) == 2
    too_many = capsys.readouterr().err
    assert too_many.startswith("tfpar plan: error: Expected at most 25 devices") and too_many.count("\n") == 1
    with pytest.raises(SystemExit) as exit_:
        cli.main(["plan", "alexnet", "--devices", "2", "--memory-limit", "lots"])
    assert exit_.value.code == 2 and "expected a size such as 16GB" in capsys.readouterr().err
    for limit in ("512MiB", "2.5GB", "1e9"):  # binary units and plain bytes parse too
        assert cli._memory(limit) > 0


@pytest.mark.multiprocess
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


def test_train_data_errors_in_process(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for data, message in [
        (tmp_path / "nothing_here", "nothing_here' (not found)"),
        (tmp_path / "empty", "Found neither class sub-folders of images nor *.tfrecord files"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            cli.main(["train", "--data", str(data)])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "tfpar train: error: argument --data: " in err and message in err


@pytest.mark.multiprocess
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
        (["train", "--lr", "nan"], "expected a finite positive number, received 'nan'"),
        (["train", "--width", "inf"], "expected a finite positive number, received 'inf'"),
        (["train", "--mixed-precision", "fp8"], "choose from 'mixed_float16', 'mixed_bfloat16'"),
        (["fly"], "invalid choice: 'fly' (choose from 'train', 'plan', 'launch', 'doctor'"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_bad_arguments_exit_2_and_name_the_choices(capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        cli.main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.multiprocess
def test_train_under_launch_runs_multi_worker(tmp_path):
    result = _tfpar("launch", "--workers", "2", "--", sys.executable, "-m", "tfpar", "train", "--epochs", "1",
                    "--width", "0.125", "--quiet", "--output", str(tmp_path / "report"))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "[worker:0] strategy        MultiWorkerMirroredStrategy (--strategy auto)" in result.stdout
    assert "[worker:1] report          written by the chief" in result.stdout
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["metrics.json", "training.png"]


@pytest.mark.multiprocess
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


def test_train_says_what_it_does_before_the_slow_steps_of_many_replicas(tmp_path, monkeypatch):
    """From job._MANY_REPLICAS replicas on (8), building and tracing are announced first."""
    import numpy as np

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "small.npz", x=rng.random((40, 8, 8, 1), np.float32), y=np.arange(40) % 2)
    monkeypatch.setattr(job, "_MANY_REPLICAS", 1)  # the default strategy has 1 replica
    lines = []
    config = job.TrainConfig(model="vgg11", strategy="default", epochs=1, batch_size=20, width=0.125,
                             data=str(tmp_path / "small.npz"), output_dir=str(tmp_path / "report"), verbose=0)
    job.train(config, log=lines.append)
    assert lines[0].startswith("tfpar: building vgg11 on 1 replicas (each holds a copy of every variable")
    assert lines[2] == "tfpar: tracing the training step on 1 replicas before the first epoch starts"


def test_a_slurm_step_without_the_srun_variables_is_a_usage_error(capsys, monkeypatch):
    """A multi-task Slurm step missing SLURM_STEP_* (sbatch without srun): one line, exit 2."""
    from tfpar import cluster

    for name in ("TF_CONFIG", *cluster.SLURM_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    monkeypatch.setattr(cli, "_configure_devices", _never("configuring devices"))
    monkeypatch.setattr(job, "train", _never("training"))
    assert cli.main(["train"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tfpar train: error: Slurm cluster discovery needs the variables that srun sets")
    assert "Missing: SLURM_STEP_NODELIST, SLURM_STEP_TASKS_PER_NODE" in err and err.count("\n") == 1


# The command line without TensorFlow: parsing, --version, --help and argparse's usage errors.
# (argv, exit status); each runs in one fresh interpreter that must never import tensorflow/keras.
TF_FREE_ARGV = [
    (["--version"], 0),
    (["--help"], 0),
    (["train", "--help"], 0),
    (["plan", "--help"], 0),
    (["doctor", "--help"], 0),
    (["launch", "--help"], 0),
    ([], 2),
    (["fly"], 2),
    (["train", "--model", "vgg99"], 2),
    (["train", "--strategy", "mirrord"], 2),
    (["train", "--lr", "nan"], 2),
    (["train", "--epochs", "0"], 2),
    (["train", "--mixed-precision", "fp8"], 2),
    (["train", "--optimizer", "rmsprop"], 2),
    (["train", "--seed", "-1"], 2),
    (["plan", "vgg99", "--devices", "2"], 2),
    (["plan", "alexnet"], 2),
    (["launch", "--workers", "0", "--", "true"], 2),
    (["launch", "--network", "none", "--", "true"], 2),
]


@pytest.mark.multiprocess
def test_parsing_help_and_usage_errors_import_no_tensorflow():
    code = (
        "import contextlib, io, json, sys\n"
        "from tfpar import cli\n"
        "cli.build_parser()\n"
        "codes = []\n"
        f"for argv, _ in {TF_FREE_ARGV!r}:\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        "        try:\n"
        "            codes.append(cli.main(argv))\n"
        "        except SystemExit as exit_:\n"
        "            codes.append(exit_.code)\n"
        "print(json.dumps([codes, sorted(m for m in ('tensorflow', 'keras') if m in sys.modules)]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    codes, loaded = json.loads(result.stdout.splitlines()[-1])
    assert codes == [status for _, status in TF_FREE_ARGV]
    assert loaded == [], f"parsing imported {loaded}"


@pytest.mark.multiprocess
@pytest.mark.parametrize("args", [["--version"], ["train", "--lr", "nan"]], ids=["version", "usage-error"])
def test_the_console_script_answers_without_importing_tensorflow(args):
    """The real `python -m tfpar`, traced with -X importtime (every module it imports, on stderr)."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "tfpar", *args],
                            capture_output=True, text=True, timeout=120)
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "tfpar.cli" in imported, result.stderr[-2000:]
    assert not {name for name in imported if name.split(".")[0] in ("tensorflow", "keras")}
    assert result.returncode == (0 if args == ["--version"] else 2)


@pytest.mark.multiprocess
def test_the_parser_names_equal_the_registries():
    """tfpar._names copies the built-in names so the parser needs no TensorFlow; they must not drift."""
    code = (
        "import json\n"
        "from tfpar import _names, devices, models, strategies\n"
        "print(json.dumps({\n"
        "    'models': [list(_names.MODELS), models.available()],\n"
        "    'strategies': [list(_names.STRATEGIES), strategies.available_strategies()],\n"
        "    'mixed_precision': [list(_names.MIXED_PRECISION_POLICIES), list(strategies.MIXED_PRECISION_POLICIES)],\n"
        "    'max_virtual_devices': [_names.MAX_VIRTUAL_DEVICES, devices.MAX_VIRTUAL_DEVICES],\n"
        "}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for name, (copied, registry) in json.loads(result.stdout.splitlines()[-1]).items():
        assert copied == registry, f"tfpar._names: {name} differs from its registry"
