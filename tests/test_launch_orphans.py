"""No orphans, whatever dies (issue 12 part 3): every process a launch started is gone within a
bounded time after its launcher was SIGKILLed, for the ``tfpar launch`` command (multi-worker and
parameter-server with the real ``serve()`` servers), for ``tfpar.launch()`` called from a Python
process (in its main thread or another thread), with the default isolated network and the host
network, including tasks' children that leave the process group (``setsid``, daemons).

Real processes; every pid a test learns about is killed in a ``finally`` if it is still alive.
Deadlines are generous ("gone within 20 s"); nothing here asserts speed.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tfpar import launch as launch_module
from tfpar.launch._guard import GUARD_CODE, HELPER_FLAGS

pytestmark = [
    pytest.mark.multiprocess,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find processes"),
]

SCRIPTS = Path(__file__).parent / "scripts"
TASK = str(SCRIPTS / "launch_task.py")
PY = sys.executable
GONE_WITHIN = 20.0  # seconds; the guard's default grace period is 5 s
# What one `tree` task leaves in PID_DIR: itself, bash, bash's python child, a child in its own
# session, a double-forked daemon.
TREE_LABELS = ("task", "bash", "under-bash", "own-session", "daemon")


def _alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as handle:
                    ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(name))
    found, todo = [], [root]
    while todo:
        for pid in children.get(todo.pop(), ()):
            found.append(pid)
            todo.append(pid)
    return found


def _still_alive_after(pids, timeout: float = GONE_WITHIN) -> list[int]:
    end = time.monotonic() + timeout
    alive = [p for p in pids if _alive(p)]
    while alive and time.monotonic() < end:
        time.sleep(0.05)
        alive = [p for p in alive if _alive(p)]
    return alive


def _pid_files(pid_dir: Path) -> dict[str, int]:
    pids = {}
    for path in pid_dir.glob("*.pids"):
        text = path.read_text().split()
        if text:
            pids[path.name[: -len(".pids")]] = int(text[0])
    return pids


def _wait_until(predicate, what: str, process: subprocess.Popen | None = None, timeout: float = 120.0):
    end = time.monotonic() + timeout
    while not predicate():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the launcher exited ({process.returncode}) before {what}")
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def _kill_all(pids) -> None:
    for pid in pids:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class _Tracked:
    """Every pid a test saw; whatever is still alive at the end is SIGKILLed."""

    def __init__(self) -> None:
        self.pids: set[int] = set()

    def add(self, pids) -> None:
        self.pids.update(pids)


@pytest.fixture
def tracked(tmp_path):
    tracker = _Tracked()
    yield tracker
    _kill_all(tracker.pids)
    pid_dir = tmp_path / "pids"
    if pid_dir.exists():
        _kill_all(_pid_files(pid_dir).values())


def _launcher(args: list[str], log: Path) -> subprocess.Popen:
    """`tfpar launch ARGS` as a separate process (in its own session, like a shell job)."""
    return subprocess.Popen(
        [PY, "-m", "tfpar", "launch", *args], stdout=log.open("w"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _sigkill_and_check(
    launcher: subprocess.Popen, tracked: _Tracked, expected: list[int], log: Path, exclude: tuple[int, ...] = ()
) -> None:
    """SIGKILLs the launcher, then asserts that every process it started is gone in time."""
    tree = [pid for pid in _descendants(launcher.pid) if pid not in exclude]
    tracked.add(tree)
    tracked.add(expected)
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait(timeout=30)
    alive = _still_alive_after(sorted(set(tree + expected)))
    text = log.read_text()
    assert alive == [], (
        f"{len(alive)} of {len(set(tree + expected))} processes outlived the SIGKILLed launcher by {GONE_WITHIN:g} s: "
        f"{alive}\n{text[-3000:]}"
    )


def _helper_pid(text: str) -> int | None:
    match = re.search(r"helper pid (\d+)", text)
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------------------------------------
# `tfpar launch` (the command) SIGKILLed
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("network", ["auto", "host"])
def test_sigkill_of_the_launcher_stops_every_task_and_everything_they_started(tmp_path, tracked, network):
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    log = tmp_path / "launch.log"
    launcher = _launcher(
        ["--workers", "2", "--chief", "--network", network, "--", PY, TASK, "tree", str(pid_dir)], log
    )
    tracked.add([launcher.pid])
    try:
        _wait_until(lambda: len(_pid_files(pid_dir)) == 3 * len(TREE_LABELS), "every task's tree", launcher)
        pids = _pid_files(pid_dir)
        tracked.add(pids.values())
        helper = _helper_pid(log.read_text())
        expected = list(pids.values()) + ([helper] if helper else [])
        if network == "auto" and helper is None:
            assert "network: host (isolation unavailable)" in log.read_text()
        # The daemon and the own-session child left the task's process group; the daemon's
        # parent exited. They are found anyway: the task's guard is their subreaper.
        _sigkill_and_check(launcher, tracked, expected, log)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(timeout=30)


def test_sigkill_of_a_parameter_server_launcher_stops_the_servers_and_the_chief(tmp_path, tracked):
    """The worker and ps tasks run the real tfpar.launch.serve() (TensorFlow servers that never
    exit on their own); the chief runs a command that prints nothing more once it started."""
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    log = tmp_path / "launch.log"
    launcher = _launcher(["--workers", "2", "--ps", "1", "--", PY, TASK, "sleep", str(pid_dir)], log)
    tracked.add([launcher.pid])
    pattern = r"^\[((?:worker|ps):\d)\] tfpar: \1 server listening on \S+ \(pid (\d+)\)$"
    try:
        _wait_until(
            lambda: len(re.findall(pattern, log.read_text(), re.M)) == 3 and (pid_dir / "chief:0.pids").exists()
            and len((pid_dir / "chief:0.pids").read_text().split()) == 2,
            "three servers and the chief", launcher, timeout=240,
        )
        servers = [int(pid) for _, pid in re.findall(pattern, log.read_text(), re.M)]
        chief = [int(p) for p in (pid_dir / "chief:0.pids").read_text().split()]
        tracked.add(servers + chief)
        helper = _helper_pid(log.read_text())
        _sigkill_and_check(launcher, tracked, servers + chief + ([helper] if helper else []), log)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(timeout=30)


# ---------------------------------------------------------------------------------------------
# tfpar.launch() called from a Python process (a notebook kernel, a script) that is SIGKILLed
# ---------------------------------------------------------------------------------------------

PARENT = textwrap.dedent(
    """
    import io, os, sys, threading, time
    import tfpar
    pid_dir, where, fork = sys.argv[1], sys.argv[2], sys.argv[3] == "fork"
    command = [sys.executable, {task!r}, "tree", pid_dir]
    def run():
        tfpar.launch(command, workers=2, output=io.StringIO(), timeout=600)
    if where == "thread":
        threading.Thread(target=run, daemon=True).start()
    if fork:
        # A process forked while the launch runs inherits every descriptor of the launcher,
        # the write ends of the tasks' lifelines included, and outlives the launcher.
        while len(os.listdir(pid_dir)) < 10:
            time.sleep(0.05)
        child = os.fork()
        if child == 0:
            time.sleep(600)
            os._exit(0)
        with open(os.path.join(pid_dir, "forked.pid"), "w") as handle:
            handle.write(str(child))
    if where == "thread":
        time.sleep(600)
    else:
        run()
    """
).format(task=TASK)


@pytest.mark.parametrize(
    "where, fork",
    [("main", ""), ("thread", ""), ("thread", "fork")],
    ids=["main-thread", "other-thread", "other-thread-and-a-fork-holding-the-lifelines"],
)
def test_sigkill_of_a_python_process_calling_tfpar_launch_stops_its_tasks(tmp_path, tracked, where, fork):
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    log = tmp_path / "parent.log"
    parent = subprocess.Popen(
        [PY, "-c", PARENT, str(pid_dir), where, fork or "no"], stdout=log.open("w"),
        stderr=subprocess.STDOUT, start_new_session=True,
    )
    tracked.add([parent.pid])
    try:
        _wait_until(lambda: len(_pid_files(pid_dir)) == 2 * len(TREE_LABELS), "every task's tree", parent)
        forked = None
        if fork:
            _wait_until(lambda: (pid_dir / "forked.pid").exists() and (pid_dir / "forked.pid").read_text(), "the fork", parent)
            forked = int((pid_dir / "forked.pid").read_text())
            tracked.add([forked])
        pids = list(_pid_files(pid_dir).values())
        tracked.add(pids)
        _sigkill_and_check(parent, tracked, pids, log, exclude=(forked,) if forked else ())
        if fork:
            assert _alive(forked), "the fork should still hold the lifelines (the case under test)"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(timeout=30)


# ---------------------------------------------------------------------------------------------
# The guard itself
# ---------------------------------------------------------------------------------------------


def test_a_task_whose_launcher_died_before_the_guard_looked_is_stopped_at_once(tmp_path, tracked):
    """The race: the launcher dies between fork and the guard's first check. Here the guard is
    started by the test, which is not the launcher pid it is given (1, as after a reparent)."""
    marker = tmp_path / "started"
    command = [PY, "-c", f"import os, time; open({str(marker)!r}, 'w').write(str(os.getpid())); time.sleep(600)"]
    guard = subprocess.Popen(
        [PY, *HELPER_FLAGS, "-c", GUARD_CODE, "1", "2.0", "-", *command],
        stdin=subprocess.PIPE, start_new_session=True,
    )
    tracked.add([guard.pid])
    try:
        guard.wait(timeout=GONE_WITHIN)
        if marker.exists() and marker.read_text():
            started = int(marker.read_text())
            tracked.add([started])
            assert _still_alive_after([started]) == [], "the command outlived its orphaned guard"
        assert _descendants(guard.pid) == []
    finally:
        guard.stdin.close()
        if guard.poll() is None:
            guard.kill()
            guard.wait(timeout=30)


@pytest.mark.parametrize("network", [None, False])
def test_a_finished_task_leaves_nothing_behind_not_even_children_in_their_own_session(tmp_path, tracked, network):
    """Before the guard, a task's child that started its own session outlived the launch."""
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    import io

    out = io.StringIO()
    code = launch_module.launch(
        [PY, TASK, "tree", str(pid_dir), "exit"], workers=1, output=out, timeout=120,
        isolate_network=network,
    )
    pids = _pid_files(pid_dir)
    tracked.add(pids.values())
    assert code == 0, out.getvalue()
    assert sorted(label.split(".", 1)[1] for label in pids) == sorted(TREE_LABELS)
    assert _still_alive_after(pids.values()) == [], out.getvalue()


def _stop_while_running(tmp_path, tracked, term: dict[str, str]) -> tuple[dict[str, int], Path, str]:
    """Runs a tree on worker:0, then makes worker:1 fail so the launcher stops worker:0 (its
    normal stop: SIGTERM to the process group, the grace period, then SIGKILL)."""
    import io
    import threading

    pid_dir, stop = tmp_path / "pids", tmp_path / "stop"
    pid_dir.mkdir()
    out, result = io.StringIO(), {}
    env = {"TFPAR_TEST_TERM": term["tree"], "TFPAR_TEST_TERM_TASK": term["task"]}

    def run() -> None:
        result["code"] = launch_module.launch(
            [PY, TASK, "tree", str(pid_dir), "fail-on", str(stop)], workers=2, output=out, timeout=120,
            grace_period=1, env=env,
        )

    thread = threading.Thread(target=run)
    thread.start()
    try:
        _wait_until(lambda: len(_pid_files(pid_dir)) == len(TREE_LABELS), "worker:0's tree")
        tracked.add(_pid_files(pid_dir).values())
    finally:
        stop.touch()
        thread.join(timeout=120)
    assert result.get("code") == 1, out.getvalue()
    pids = _pid_files(pid_dir)
    tracked.add(pids.values())
    return pids, pid_dir, out.getvalue()


def test_a_normal_stop_also_kills_children_that_left_the_process_group_and_ignore_sigterm(tmp_path, tracked):
    """The launcher's SIGKILL of the process group would kill the guard before it could act:
    the launcher first asks each remaining guard to SIGKILL its whole tree."""
    pids, _, text = _stop_while_running(tmp_path, tracked, {"tree": "ignore", "task": "ignore"})
    assert _still_alive_after(pids.values()) == [], text


def test_a_normal_stop_passes_sigterm_to_children_that_left_the_process_group(tmp_path, tracked):
    """The task's own process ignores SIGTERM; its children that left the process group (which
    the launcher's signal does not reach) get SIGTERM from the guard before the SIGKILL."""
    pids, pid_dir, text = _stop_while_running(tmp_path, tracked, {"tree": "record", "task": "ignore"})
    received = sorted(path.name[: -len(".term")].split(".", 1)[1] for path in pid_dir.glob("*.term"))
    assert received == ["daemon", "own-session", "under-bash"], text
    assert _still_alive_after(pids.values()) == [], text


@pytest.mark.parametrize(
    "command, code, description",
    [
        ("import sys; sys.exit(3)", 3, "exit code 3"),
        ("import os, signal; os.kill(os.getpid(), signal.SIGTERM)", 143, "signal SIGTERM (exit code 143)"),
        ("import os, signal; os.kill(os.getpid(), signal.SIGABRT)", 134, "signal SIGABRT (exit code 134)"),
    ],
)
def test_the_guard_passes_on_how_the_task_ended(command, code, description):
    import io

    out = io.StringIO()
    assert launch_module.launch([PY, "-c", command], workers=1, output=out, timeout=60) == code
    assert f"worker:0 failed with {description}" in out.getvalue()
