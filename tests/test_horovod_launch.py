"""tfpar launch with horovodrun's flags (-np, -H, the command without --) and ``hvd.run`` (issue 15).

The parsing tests call the launcher's parser in-process (they start nothing); the others run real
processes: the ``tfpar`` command as users type it, and Horovod's public
``examples/tensorflow2/tensorflow2_mnist.py`` changed only in its import lines, offline data and
step counts (``tests/scripts/hvd_tf2_mnist.py``), under ``tfpar launch -np 2`` and through
``horovod.run``.
"""

from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tfpar.launch import main
from tfpar.launch._cli import _parse
from tfpar.launch._horovodrun import FLAGS

SCRIPTS = Path(__file__).parent / "scripts"
MNIST = str(SCRIPTS / "hvd_tf2_mnist.py")
PY = sys.executable
PRINT_TASK = [PY, "-c", "import os; print('task', os.environ['TFPAR_LAUNCH_TASK'])"]


def _cli(args: list[str], cwd: Path | None = None, timeout: float = 150) -> subprocess.CompletedProcess:
    """`python -m tfpar launch ARGS` as a user runs it (killed at `timeout`; its guards then stop the tasks)."""
    return subprocess.run([PY, "-m", "tfpar", "launch", *args], capture_output=True, text=True, timeout=timeout,
                           cwd=cwd)


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    return errors[0]


# ---------------------------------------------------------------------------------------------
# Parsing (in-process, nothing starts)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, workers, command",
    [
        (["-np", "2", "python", "train.py"], 2, ["python", "train.py"]),
        (["-np", "2", "--", "python", "train.py"], 2, ["python", "train.py"]),
        (["--num-proc", "3", "python", "train.py", "--lr", "0.1", "-np", "9"], 3,
         ["python", "train.py", "--lr", "0.1", "-np", "9"]),  # after the command: the command's own
        (["-np", "2", "--workers", "2", "python", "t.py"], 2, ["python", "t.py"]),
        (["-np", "2", "-H", "localhost:2", "python", "t.py"], 2, ["python", "t.py"]),
        (["-np", "2", "-H", "localhost:1,127.0.0.1:1", "python", "t.py"], 2, ["python", "t.py"]),
        (["-np", "3", "--hosts", f"{socket.gethostname()}:4", "python", "t.py"], 3, ["python", "t.py"]),
        (["-np", "2", "-H", "[::1]:2", "--", "python", "t.py"], 2, ["python", "t.py"]),
        (["--workers", "3", "--", "python", "t.py"], 3, ["python", "t.py"]),
    ],
)
def test_np_and_local_hosts_start_n_workers(argv, workers, command):
    args, parsed_command, _ = _parse(argv)
    assert (args.workers, parsed_command, args.notes) == (workers, command, [])


def test_hostfile_of_local_hosts_is_accepted(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two local slots\nlocalhost slots=1\n127.0.0.1 slots=1\n")
    args, command, _ = _parse(["-np", "2", "--hostfile", str(hostfile), "python", "t.py"])
    assert (args.workers, command) == (2, ["python", "t.py"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["-np", "2", "-H", "host1:2,host2:2", "python", "t.py"],
         "-H names other hosts (host1, host2): multi-host runs are not started by tfpar launch"),
        (["-np", "2", "-H", "localhost:1,10.0.0.7:1", "python", "t.py"], "TF_CONFIG set for it"),
        (["-np", "2", "-H", "gpu-node-3:2", "python", "t.py"], "srun python train.py"),
        (["-np", "4", "-H", "localhost:2", "python", "t.py"], "-H gives 2 slots for 4 processes"),
        (["-np", "2", "-H", "localhost:zero", "python", "t.py"], "Expected -H/hosts as host:slots"),
        (["-H", "localhost:2", "python", "t.py"], "-H/--hostfile needs -np N"),
        (["-np", "2", "--workers", "3", "python", "t.py"], "-np 2 contradicts --workers 3"),
        (["-np", "2", "--ps", "1", "python", "t.py"], "-np N starts N worker tasks"),
        (["-np", "0", "python", "t.py"], "argument -np/--num-proc: expected an integer >= 1. Received: 0"),
        (["-np", "2", "python", "t.py", "--", "x"], "unrecognized arguments before --: python t.py"),
        (["-np", "2"], "expected a COMMAND"),
    ],
)
def test_dishonest_hosts_and_contradictions_are_one_line_errors(capsys, argv, message):
    assert main(argv) == 2
    assert message in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("flag", [f for f in FLAGS if f.verdict == "refused"], ids=lambda f: f.flags[-1])
def test_refused_horovodrun_flags_exit_2_with_one_line_naming_the_alternative(capsys, flag):
    argv = ["-np", "2", flag.flags[-1], *(["1"] * flag.nargs), "python", "t.py"]
    assert main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"horovodrun flag {'/'.join(flag.flags)} is not supported here: {flag.why}" in line


@pytest.mark.parametrize("flag", [f for f in FLAGS if f.verdict == "ignored"], ids=lambda f: f.flags[-1])
def test_ignored_horovodrun_flags_give_one_note_each_and_keep_the_command(flag):
    argv = ["-np", "2", flag.flags[0], *(["1"] * flag.nargs), "python", "t.py", "--gloo"]
    args, command, _ = _parse(argv)
    assert command == ["python", "t.py", "--gloo"] and args.workers == 2
    assert args.notes == [f"horovodrun flag {'/'.join(flag.flags)} is ignored: {flag.why}"]


def test_the_common_horovodrun_flags_all_have_a_verdict():
    given = {spelling for flag in FLAGS for spelling in flag.flags}
    for spelling in ("--gloo", "--mpi", "-p", "--ssh-port", "--verbose", "--timeline-filename",
                     "--fusion-threshold-mb", "--cycle-time-ms", "--autotune", "--elastic", "--min-np",
                     "--max-np"):
        assert spelling in given


def test_help_documents_np_hosts_and_the_horovodrun_flags(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for text in ("-np N, --num-proc N", "-H HOST:SLOTS,..., --hosts", "--hostfile", "without --",
                 "--gloo", "ignored:", "--timeline-filename", "refused:", "tfpar launch -np 2 python train.py"):
        assert text in out, text


def test_hvd_run_refuses_what_it_cannot_do_before_starting_anything():
    import tfpar.horovod as hvd

    with pytest.raises(TypeError, match=r"pickle module \(no cloudpickle\).*not a lambda"):
        hvd.run(lambda: 1, np=2)
    with pytest.raises(ValueError, match=r"hosts names other hosts \(node7\)"):
        hvd.run(os.getenv, args=("HOME",), np=2, hosts="node7:2")
    with pytest.raises(ValueError, match="hosts gives 1 slot for 2 processes"):
        hvd.run(os.getenv, args=("HOME",), np=2, hosts="localhost:1")
    with pytest.raises(NotImplementedError, match=r"min_np=.*--max-restarts"):
        hvd.run(os.getenv, args=("HOME",), np=2, min_np=1)
    with pytest.raises(ValueError, match="np to be an int >= 1"):
        hvd.run(os.getenv, np=0)


# ---------------------------------------------------------------------------------------------
# Real processes
# ---------------------------------------------------------------------------------------------


@pytest.mark.multiprocess
@pytest.mark.parametrize("dashes", [[], ["--"]], ids=["without --", "with --"])
def test_the_tfpar_command_runs_np_tasks_with_or_without_double_dash(dashes):
    result = _cli(["-np", "2", "--gloo", "--timeout", "60", *dashes, *PRINT_TASK])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[worker:0] task worker:0" in result.stdout and "[worker:1] task worker:1" in result.stdout
    assert "worker:2" not in result.stdout
    notes = [line for line in result.stderr.splitlines() if line.startswith("tfpar launch: note:")]
    assert notes == ["tfpar launch: note: horovodrun flag --gloo is ignored: tfpar.horovod runs on TensorFlow's "
                     "own collectives (ring on CPU, NCCL on GPU), not on Gloo; no controller to choose"]


@pytest.mark.multiprocess
def test_the_tfpar_command_refuses_remote_hosts_in_one_line_and_starts_nothing():
    result = _cli(["-np", "2", "-H", "host1:2,host2:2", *PRINT_TASK], timeout=60)
    assert result.returncode == 2 and "[launch]" not in result.stdout
    assert "multi-host runs are not started by tfpar launch" in _one_error_line(result.stderr)


@pytest.mark.multiprocess
def test_hvd_run_returns_the_results_ordered_by_rank():
    import tfpar.horovod as hvd

    out = io.StringIO()
    assert hvd.run(os.getenv, args=("TFPAR_LAUNCH_TASK",), np=2, output=out, timeout=60) == ["worker:0", "worker:1"]
    assert hvd.run(os.getenv, args=("TFPAR_LAUNCH_TASK",), np=3, hosts="localhost:3", output=out, timeout=60) == [
        "worker:0", "worker:1", "worker:2"]
    assert "all tasks finished successfully" in out.getvalue()


@pytest.mark.multiprocess
def test_hvd_run_raises_when_a_process_fails():
    import tfpar.horovod as hvd

    out = io.StringIO()
    with pytest.raises(RuntimeError, match=r"the 2 processes running sys.exit failed \(exit code 3\)"):
        hvd.run(sys.exit, args=(3,), np=2, output=out, timeout=60)


def _mnist_report(output: str) -> tuple[dict[int, str], list[float]]:
    checksums = {int(m.group(1)): m.group(2) for m in re.finditer(
        r"rank (\d) of 2: weights checksum ([0-9.e+-]+), last loss", output)}
    losses = [float(x) for x in re.findall(r"Step #\d+\tLoss: ([0-9.]+)", output)]
    return checksums, losses


@pytest.mark.multiprocess
def test_horovod_tensorflow2_mnist_example_under_tfpar_launch_np_2(tmp_path):
    result = _cli(["-np", "2", "--timeout", "240", PY, MNIST], cwd=tmp_path, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Traceback" not in output
    checksums, losses = _mnist_report(result.stdout)
    assert set(checksums) == {0, 1} and checksums[0] == checksums[1], output[-3000:]
    assert len(losses) == 3 and losses[-1] < losses[0] / 10, losses
    assert list(tmp_path.glob("checkpoints-1.index")), "rank 0 saves the checkpoint"


@pytest.mark.multiprocess
def test_horovod_tensorflow2_mnist_example_through_horovod_run(tmp_path):
    # The example's own `horovod.run(train, np=2, hosts=..., use_gloo=True, ...)` path: train lives
    # in the script's __main__; rank 0 returns the Keras model (pickled back), rank 1 None.
    result = subprocess.run([PY, MNIST, "2", "localhost:2", "gloo"], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Traceback" not in output
    assert "horovod.run returned ['Sequential', 'NoneType']" in result.stdout
    assert "[launch] note: hvd.run ignores use_gloo=True" in result.stdout
    checksums, losses = _mnist_report(result.stdout)
    assert set(checksums) == {0, 1} and checksums[0] == checksums[1], output[-3000:]
    assert losses[-1] < losses[0] / 10, losses
