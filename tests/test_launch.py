"""Tests of tfpar.launch: the local multi-process launcher (real processes on 127.0.0.1)."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tfpar.launch import EXIT_TIMEOUT, build_parser, launch, main

SCRIPTS = Path(__file__).parent / "scripts"
TASK = str(SCRIPTS / "launch_task.py")
PY = sys.executable


def _alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def _wait_dead(pids, timeout: float = 10.0) -> list[int]:
    end = time.monotonic() + timeout
    alive = [p for p in pids if _alive(p)]
    while alive and time.monotonic() < end:
        time.sleep(0.05)
        alive = [p for p in alive if _alive(p)]
    return alive


def _recorded_pids(pid_dir: Path) -> list[int]:
    pids = []
    for path in pid_dir.glob("*.pids"):
        text = path.read_text().split()
        pids += [int(p) for p in text]
    return pids


def _wait_for_files(pid_dir: Path, count: int, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        files = [p for p in pid_dir.glob("*.pids") if p.read_text().strip()]
        if len(files) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"expected {count} pid files in {pid_dir} within {timeout} s")


@pytest.fixture
def pid_dir(tmp_path):
    """A directory where tasks record their pids; anything still alive is killed at teardown."""
    directory = tmp_path / "pids"
    directory.mkdir()
    yield directory
    for pid in _recorded_pids(directory):
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _by_prefix(text: str) -> dict[str, list[str]]:
    lines: dict[str, list[str]] = {}
    for line in text.splitlines():
        match = re.match(r"^\[([a-z]+:\d+|launch)\] (.*)$", line)
        assert match, f"line without a task prefix: {line!r}"
        lines.setdefault(match.group(1), []).append(match.group(2))
    return lines


# ---------------------------------------------------------------------------------------------
# Success: TF_CONFIG per task, prefixed output
# ---------------------------------------------------------------------------------------------


@pytest.mark.multiprocess
def test_launch_gives_each_task_its_tf_config_and_prefixes_output():
    out = io.StringIO()
    code = launch(
        [PY, TASK, "report"], workers=2, chief=True, env={"TFPAR_TEST_EXTRA": "x"}, output=out,
        timeout=60,
    )
    assert code == 0, out.getvalue()
    lines = _by_prefix(out.getvalue())
    assert set(lines) == {"launch", "chief:0", "worker:0", "worker:1"}
    reports = {name: json.loads(lines[name][0]) for name in ("chief:0", "worker:0", "worker:1")}
    clusters = {json.dumps(r["tf_config"]["cluster"], sort_keys=True) for r in reports.values()}
    assert len(clusters) == 1, "every task must see the same cluster"
    cluster = reports["chief:0"]["tf_config"]["cluster"]
    assert set(cluster) == {"chief", "worker"} and len(cluster["worker"]) == 2
    addresses = [a for tasks in cluster.values() for a in tasks]
    assert all(a.startswith("127.0.0.1:") for a in addresses)
    assert len({a.rsplit(":", 1)[1] for a in addresses}) == 3, "ports must be distinct"
    for name, report in reports.items():
        ttype, index = name.split(":")
        assert report["tf_config"]["task"] == {"type": ttype, "index": int(index)}
        assert report["task"] == report["launch_task"] == name
        assert report["restart"] == "0"
        assert report["extra"] == "x"
        assert lines[name][1] == "second line"  # stderr is streamed with the prefix too
    assert "TF_CONFIG" not in os.environ


@pytest.mark.multiprocess
def test_output_defaults_to_sys_stdout_at_call_time(capsys):
    assert launch([PY, "-c", "print('hello from a task')"], workers=1, timeout=60) == 0
    assert "[worker:0] hello from a task" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Failures: propagation, SIGKILL, timeout, no leftovers
# ---------------------------------------------------------------------------------------------


@pytest.mark.multiprocess
def test_a_failing_worker_stops_the_others_quickly_and_leaves_no_process(pid_dir):
    out = io.StringIO()
    start = time.monotonic()
    code = launch([PY, TASK, "fail-one", str(pid_dir)], workers=3, output=out, timeout=60)
    elapsed = time.monotonic() - start
    text = out.getvalue()
    assert code == 3, text
    assert elapsed < 20, f"the launcher took {elapsed:.1f} s to propagate the failure"
    assert "worker:1 failed with exit code 3" in text
    # The failing task's last lines are repeated at the end, after the other tasks' output.
    summary = text[text.index("worker:1 failed with exit code 3") :]
    assert "worker 1 is about to fail" in summary and "fatal: simulated failure" in summary
    pids = _recorded_pids(pid_dir)
    assert len(pids) == 4  # worker:0 and worker:2, each with a grandchild
    assert _wait_dead(pids) == [], "tasks or their children survived the launcher"


@pytest.mark.multiprocess
def test_sigkill_of_a_worker_fails_the_launch_and_cleans_up(pid_dir):
    out = io.StringIO()
    result = {}

    def run():
        result["code"] = launch([PY, TASK, "sleep", str(pid_dir)], workers=2, output=out, timeout=60)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        _wait_for_files(pid_dir, 2)
        victim = int((pid_dir / "worker:1.pids").read_text().split()[0])
        os.kill(victim, signal.SIGKILL)
        thread.join(timeout=30)
        assert not thread.is_alive(), "the launcher did not return after a worker was killed"
    finally:
        thread.join(timeout=60)
    assert result["code"] == 128 + signal.SIGKILL, out.getvalue()
    assert "worker:1 failed with signal SIGKILL (exit code 137)" in out.getvalue()
    assert _wait_dead(_recorded_pids(pid_dir)) == []


@pytest.mark.multiprocess
def test_timeout_stops_everything_even_tasks_that_ignore_sigterm(pid_dir):
    out = io.StringIO()
    start = time.monotonic()
    code = launch(
        [PY, TASK, "ignore-term", str(pid_dir)], workers=2, output=out, timeout=3, grace_period=1
    )
    elapsed = time.monotonic() - start
    assert code == EXIT_TIMEOUT, out.getvalue()
    assert "timed out after 3 s" in out.getvalue()
    assert elapsed < 30
    pids = _recorded_pids(pid_dir)
    assert len(pids) == 4
    assert _wait_dead(pids) == []


@pytest.mark.multiprocess
def test_sigterm_to_the_launcher_stops_all_tasks(pid_dir):
    launcher = subprocess.Popen(
        [PY, "-c", "import sys; from tfpar.launch import main; sys.exit(main())",
         "--workers", "2", "--grace-period", "2", "--", PY, TASK, "sleep", str(pid_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        _wait_for_files(pid_dir, 2, timeout=60)
        launcher.send_signal(signal.SIGTERM)
        output, _ = launcher.communicate(timeout=30)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait(timeout=10)
    assert launcher.returncode == 128 + signal.SIGTERM, output.decode()
    assert "received SIGTERM; stopping all tasks" in output.decode()
    assert _wait_dead(_recorded_pids(pid_dir)) == []


# ---------------------------------------------------------------------------------------------
# Restarts
# ---------------------------------------------------------------------------------------------


@pytest.mark.multiprocess
def test_max_restarts_restarts_the_cluster_with_fresh_ports():
    out = io.StringIO()
    code = launch([PY, TASK, "flaky"], workers=2, max_restarts=2, output=out, timeout=60)
    text = out.getvalue()
    assert code == 0, text
    assert "worker:1 failed with exit code 5" in text
    assert "restarting the cluster with fresh ports (restart 1 of 2; TFPAR_LAUNCH_RESTART=1)" in text
    assert "[worker:1] worker:1 succeeded on attempt 1" in text
    assert "restart 2 of 2" not in text
    starts = re.findall(r"starting 2 tasks \(attempt (\d) of 3\): (.*)", text)
    assert [s[0] for s in starts] == ["1", "2"]
    assert starts[0][1] != starts[1][1], "a restart picks fresh ports"


@pytest.mark.multiprocess
def test_without_restarts_the_first_failure_is_final():
    out = io.StringIO()
    assert launch([PY, TASK, "flaky"], workers=2, output=out, timeout=60) == 5
    assert "restarting" not in out.getvalue()


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--workers", "0", "--", PY, "-c", "pass"], "--workers: expected an integer >= 1. Received: 0"),
        (["--workers", "two", "--", PY, "-c", "pass"], "--workers: expected an integer >= 1. Received: 'two'"),
        (["--ps", "-1", "--", PY, "-c", "pass"], "--ps: expected an integer >= 0"),
        (["--max-restarts", "x", "--", PY], "--max-restarts: expected an integer >= 0"),
        (["--timeout", "0", "--", PY], "--timeout: expected a finite number of seconds > 0"),
        (["--timeout", "nan", "--", PY], "--timeout: expected a finite number of seconds > 0, e.g. 60. Received: 'nan'"),
        (["--timeout", "inf", "--", PY], "--timeout: expected a finite number of seconds > 0, e.g. 60. Received: 'inf'"),
        (["--timeout=-inf", "--", PY], "--timeout: expected a finite number of seconds > 0, e.g. 60. Received: '-inf'"),
        (["--grace-period", "NaN", "--", PY], "--grace-period: expected a finite number of seconds > 0, e.g. 60. Received: 'NaN'"),
        (["--grace-period", "Infinity", "--", PY], "--grace-period: expected a finite number of seconds > 0"),
        (["--grace-period", "1e999", "--", PY], "--grace-period: expected a finite number of seconds > 0"),
        (["--workers", "nan", "--", PY], "--workers: expected an integer >= 1. Received: 'nan'"),
        (["--ps", "inf", "--", PY], "--ps: expected an integer >= 0. Received: 'inf'"),
        (["--max-restarts", "1.5", "--", PY], "--max-restarts: expected an integer >= 0. Received: '1.5'"),
        (["--workers", "2"], "expected a COMMAND after --"),
        (["--workers", "2", "--"], "expected a COMMAND after --"),
        (["--nodes", "2", "--", PY], "unrecognized arguments: --nodes"),
        (["--workers", "2", "extra", "--", PY], "unrecognized arguments before --: extra"),
    ],
)
def test_bad_command_lines_exit_2_and_name_the_valid_choices(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "usage: tfpar launch [-h] [--workers N] [--ps M] [--chief]" in err
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1


def test_help_exits_0_and_documents_the_options(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--workers", "--ps", "--chief", "--max-restarts", "--timeout", "COMMAND"):
        assert option in out


@pytest.mark.multiprocess
def test_main_runs_a_command_after_double_dash(capfd):
    code = main(["--workers", "2", "--timeout", "60", "--", PY, "-c", "import os; print(os.environ['TFPAR_LAUNCH_TASK'])"])
    out = capfd.readouterr().out
    assert code == 0, out
    assert "[worker:0] worker:0" in out and "[worker:1] worker:1" in out


@pytest.mark.multiprocess
def test_main_returns_the_failing_exit_code(capfd):
    assert main(["--workers", "1", "--", PY, "-c", "raise SystemExit(7)"]) == 7
    assert "worker:0 failed with exit code 7" in capfd.readouterr().out


@pytest.mark.multiprocess
def test_the_module_is_callable_so_tfpar_launch_works_in_any_import_order():
    code = (
        "import io, sys, tfpar.launch\n"  # the package attribute is now the module
        "out = io.StringIO()\n"
        "code = tfpar.launch([sys.executable, '-c', 'print(1)'], workers=1, output=out, timeout=60)\n"
        "print(code, callable(tfpar.launch.main), callable(tfpar.launch.serve), out.getvalue().count('[worker:0] 1'))\n"
    )
    result = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "0 True True 1", result.stdout + result.stderr


def test_parser_defaults():
    args = build_parser().parse_args([])
    assert (args.workers, args.ps, args.chief, args.max_restarts, args.timeout) == (2, 0, False, 0, None)


# ---------------------------------------------------------------------------------------------
# Python API validation (no process is started)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"command": "python train.py"}, TypeError, "shlex.split"),
        ({"command": [PY, 3]}, TypeError, "non-empty list of strings"),
        ({"command": []}, TypeError, "non-empty list of strings"),
        ({"workers": 0}, ValueError, "Expected workers >= 1. Received: workers=0"),
        ({"workers": 2.0}, TypeError, "Expected workers to be an int"),
        ({"ps": -1}, ValueError, "Expected ps >= 0"),
        ({"max_restarts": True}, TypeError, "Expected max_restarts to be an int"),
        ({"chief": 1}, TypeError, "Expected chief to be a bool"),
        ({"timeout": 0}, ValueError, "Expected timeout to be a finite number of seconds > 0. Received: timeout=0"),
        ({"timeout": float("nan")}, ValueError, "Expected timeout to be a finite number of seconds > 0. Received: timeout=nan. For no time limit pass timeout=None."),
        ({"timeout": float("inf")}, ValueError, "Received: timeout=inf. For no time limit pass timeout=None."),
        ({"timeout": "10"}, TypeError, "number of seconds"),
        ({"grace_period": -1}, ValueError, "Expected grace_period to be a finite number of seconds > 0"),
        ({"grace_period": float("nan")}, ValueError, "Received: grace_period=nan"),
        ({"grace_period": float("inf")}, ValueError, "Received: grace_period=inf"),
        ({"env": {"A": 1}}, TypeError, "dict of str to str"),
        ({"env": {"TF_CONFIG": "{}"}}, ValueError, "sets TF_CONFIG for each task itself"),
        ({"output": 42}, TypeError, "write() method"),
        ({"isolate_network": "yes"}, TypeError, "Expected isolate_network to be None (isolate where possible), True or False. Received: isolate_network='yes'"),
        ({"isolate_network": 1}, TypeError, "Received: isolate_network=1"),
        ({"command": ["/nonexistent/program"]}, ValueError, "Could not find an executable program '/nonexistent/program'. Check the command"),
        ({"command": ["no-such-program-tfpar"]}, ValueError, "'no-such-program-tfpar' in PATH. Check the command"),
        ({"command": [__file__]}, ValueError, "Check the command"),  # not executable
    ],
)
def test_launch_validates_arguments_before_starting_anything(kwargs, error, message):
    kwargs = {"command": [PY, "-c", "pass"], **kwargs}
    with pytest.raises(error, match=re.escape(message)):
        launch(**kwargs)


def test_nested_launch_is_refused(monkeypatch):
    monkeypatch.setenv("TFPAR_LAUNCH_TASK", "worker:0")
    with pytest.raises(RuntimeError, match="inside a task that tfpar launch started"):
        launch([PY, "-c", "pass"])


def test_command_none_without_a_script_says_to_pass_a_command(monkeypatch):
    monkeypatch.setattr(sys, "argv", [""])
    with pytest.raises(ValueError, match=r"Pass a command, e\.g\. tfpar\.launch"):
        launch(None)


@pytest.mark.multiprocess
def test_command_none_reruns_the_current_script(monkeypatch, tmp_path):
    script = tmp_path / "script.py"
    script.write_text("import os, sys; print('args', sys.argv[1:], os.environ['TFPAR_LAUNCH_TASK'])\n")
    monkeypatch.setattr(sys, "argv", [str(script), "--flag"])
    out = io.StringIO()
    assert launch(workers=1, output=out, timeout=60) == 0
    assert "[worker:0] args ['--flag'] worker:0" in out.getvalue()


def test_unknown_program_is_a_clear_error(capsys):
    # Checked before anything starts (the task's guard would only see it after its fork).
    with pytest.raises(ValueError, match="Check the command"):
        launch(["/nonexistent/program"], workers=1, output=io.StringIO(), timeout=60)
    assert main(["--workers", "1", "--", "/nonexistent/program"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tfpar launch: error: Could not find an executable program") and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# TensorFlow clusters through the launcher
# ---------------------------------------------------------------------------------------------


def _results(text: str) -> dict[str, dict]:
    results = {}
    for line in text.splitlines():
        match = re.match(r"^\[([a-z]+:\d+)\] RESULT:(.*)$", line)
        if match:
            results[match.group(1)] = json.loads(match.group(2))
    return results


@pytest.mark.multiprocess
def test_multi_worker_mirrored_custom_loop_through_the_launcher():
    out = io.StringIO()
    code = launch([PY, str(SCRIPTS / "mwms_ctl.py")], workers=2, output=out, timeout=150)
    text = out.getvalue()
    assert code == 0, text
    results = _results(text)
    assert set(results) == {"worker:0", "worker:1"}, text
    first, second = results["worker:0"], results["worker:1"]
    assert first["replicas"] == second["replicas"] == 2
    assert first["checksum"] == second["checksum"]
    assert first["weights"] == second["weights"]
    assert first["moved"] > 0.1, "training did not change the weights"
    # The all-reduce really combined both shards: same weights as one process on the global batch.
    assert first["max_diff_from_single_process"] < 1e-5


@pytest.mark.multiprocess
def test_parameter_server_mode_runs_servers_and_a_coordinator_chief():
    out = io.StringIO()
    code = launch(
        [PY, str(SCRIPTS / "ps_coordinator.py"), "6"], workers=2, ps=1, output=out, timeout=150
    )
    text = out.getvalue()
    assert code == 0, text
    starts = re.search(r"starting 4 tasks \(attempt 1 of 1\): (.*)", text).group(1)
    assert starts.startswith("chief:0=127.0.0.1:")  # --ps implies the coordinator chief
    servers = re.findall(r"^\[((?:worker|ps):\d)\] tfpar: \1 server listening on (\S+) \(pid (\d+)\)$", text, re.M)
    assert sorted(s[0] for s in servers) == ["ps:0", "worker:0", "worker:1"]
    result = _results(text)["chief:0"]
    assert result["counter"] == 6
    assert result["variable_device"].startswith("/job:ps/")
    assert result["task"] == "chief:0" and result["is_chief"] is True
    assert result["detect"] == ["tf_config", 2, 1, True]
    for name, address, _ in servers:
        ttype, index = name.split(":")
        assert result["spec"][ttype][int(index)] == address
        assert result["listening"][address.rsplit(":", 1)[1]], f"nothing listened for {name}"
    # The servers never exit on their own: the launcher stopped them.
    assert _wait_dead([int(s[2]) for s in servers]) == []


@pytest.mark.multiprocess
def test_parameter_server_mode_restarts_a_killed_worker_server_in_place(tmp_path):
    sentinel = tmp_path / "restarted"
    out = io.StringIO()
    result = {}

    def run():
        result["code"] = launch(
            [PY, str(SCRIPTS / "ps_coordinator.py"), "300", str(sentinel)], workers=2, ps=1,
            max_restarts=1,
            output=out, timeout=150, env={"TFPAR_TEST_SLOW_CLOSURES": "1"},
        )

    thread = threading.Thread(target=run)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while "[chief:0] scheduled" not in out.getvalue() and thread.is_alive():
            assert time.monotonic() < deadline, out.getvalue()
            time.sleep(0.05)
        pattern = r"^\[worker:1\] tfpar: worker:1 server listening on (\S+) \(pid (\d+)\)$"
        address, pid = re.search(pattern, out.getvalue(), re.M).groups()
        os.kill(int(pid), signal.SIGKILL)
        # The chief waits (after its RESULT line) until the test saw the new server come up.
        while len(re.findall(pattern, out.getvalue(), re.M)) < 2 and thread.is_alive():
            assert time.monotonic() < deadline + 60, out.getvalue()
            time.sleep(0.05)
    finally:
        sentinel.touch()
        thread.join(timeout=150)
    text = out.getvalue()
    assert result.get("code") == 0, text
    assert (
        f"worker:1 (server) exited with signal SIGKILL (exit code 137); restarting it in place on "
        f"{address} (restart 1 of 1)" in text
    )
    incarnations = re.findall(pattern, text, re.M)
    assert len(incarnations) == 2 and incarnations[1][0] == address  # same address, new process
    # ClusterCoordinator re-runs closures lost with the worker: at-least-once, never fewer.
    assert _results(text)["chief:0"]["counter"] >= 300
    assert "starting 4 tasks (attempt 2" not in text  # the cluster itself was not restarted
    assert _wait_dead([int(p) for _, p in incarnations]) == []
