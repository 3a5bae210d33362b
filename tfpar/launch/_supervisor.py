"""The supervisor of one launch: starts the tasks under their guards, streams their output,
stops them all on the first failure, restarts the cluster or a worker server, and reports.

``launch()`` (``tfpar.launch._api``) checks the arguments and runs :class:`Launcher`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from tfpar import cluster
from tfpar.launch._guard import GUARD_CODE, HELPER_FLAGS
from tfpar.launch._network import NetworkNamespace, setup_network

__all__ = ["EXIT_TIMEOUT", "Launcher", "Task", "Terminated"]

#: Exit code of a launch that ran out of time (as coreutils ``timeout``).
EXIT_TIMEOUT = 124
_POLL_SECONDS = 0.05
_TAIL_LINES = 20
_GUARD_KILL_SECONDS = 5.0  # how long stop_all waits for the guards' own SIGKILL of their trees
_SERVE_CODE = "import sys; from tfpar.launch import serve; sys.exit(serve())"


@dataclasses.dataclass
class Task:
    """One task of the cluster (``worker:1``) and its current process."""

    type: str
    index: int
    address: str
    runs_command: bool
    process: subprocess.Popen | None = None
    reader: threading.Thread | None = None
    tail: collections.deque = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=_TAIL_LINES)
    )
    exit_code: int | None = None

    @property
    def name(self) -> str:
        return f"{self.type}:{self.index}"


class Terminated(Exception):
    """Raised in the supervising thread when the launcher itself gets SIGTERM/SIGHUP."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class Launcher:
    """Runs and supervises one launch (arguments already checked by ``launch()``)."""

    def __init__(self, command, workers, ps, chief, max_restarts, timeout, env, out, grace, isolate):
        self.command = command
        self.workers = workers
        self.ps = ps
        self.chief = chief
        self.max_restarts = max_restarts
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.timeout = timeout
        self.env = env
        self.out = out
        self.grace = grace
        self.lines: queue.Queue = queue.Queue()
        self.restarts = 0
        self.tasks: list[Task] = []
        self.isolate = isolate
        self.namespace = NetworkNamespace()

    # -- output -----------------------------------------------------------------------------

    def say(self, message: str) -> None:
        self.drain()
        for line in message.splitlines():
            self.out.write(f"[launch] {line}\n")
        self._flush()

    def _flush(self) -> None:
        flush = getattr(self.out, "flush", None)
        if flush is not None:
            try:
                flush()
            except (OSError, ValueError):
                pass

    def drain(self) -> None:
        wrote = False
        while True:
            try:
                prefix, line = self.lines.get_nowait()
            except queue.Empty:
                break
            self.out.write(f"[{prefix}] {line}\n")
            wrote = True
        if wrote:
            self._flush()

    def _read(self, task: Task, stream) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            task.tail.append(line)
            self.lines.put((task.name, line))
        stream.close()

    # -- process management -----------------------------------------------------------------

    def layout(self) -> list[Task]:
        names = []
        if self.chief:
            names.append(("chief", 0))
        names += [("worker", i) for i in range(self.workers)]
        names += [("ps", i) for i in range(self.ps)]
        ports = cluster.free_ports(len(names))
        tasks = []
        for (ttype, index), port in zip(names, ports):
            runs_command = ttype == "chief" if self.ps else ttype in ("chief", "worker")
            tasks.append(Task(ttype, index, f"127.0.0.1:{port}", runs_command))
        return tasks

    def spec(self) -> dict[str, list[str]]:
        spec: dict[str, list[str]] = {}
        for task in self.tasks:
            spec.setdefault(task.type, []).append(task.address)
        return spec

    def start(self, task: Task) -> None:
        env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG" and not k.startswith("TFPAR_LAUNCH_")}
        env.update(self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        if not task.runs_command:
            env.setdefault("GRPC_FAIL_FAST", "use_caller")  # as in the TF PS tutorial
            env.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # servers: warnings and errors only
        env["TF_CONFIG"] = json.dumps(
            {"cluster": self.spec(), "task": {"type": task.type, "index": task.index}}
        )
        env["TFPAR_LAUNCH_TASK"] = task.name
        env["TFPAR_LAUNCH_RESTART"] = str(self.restarts)
        argv = self.command if task.runs_command else [sys.executable, "-c", _SERVE_CODE]
        holder = self.namespace.holder
        guard = [sys.executable, *HELPER_FLAGS, "-c", GUARD_CODE, str(os.getpid()),
                 repr(float(self.grace)), "-" if holder is None else str(holder.pid)]
        self._close_lifeline(task)
        try:
            task.process = subprocess.Popen(
                [*guard, *argv],
                env=env,
                stdin=subprocess.PIPE,  # the guard's lifeline: EOF when this process is gone
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: stop the task with its children
            )
        except OSError as error:
            raise ValueError(
                f"Could not start {task.name}: {error}. Check the command: it must be an "
                f"executable program with its arguments. Received: command={argv!r}"
            ) from error
        task.exit_code = None
        task.tail.clear()
        task.reader = threading.Thread(
            target=self._read, args=(task, task.process.stdout), daemon=True,
            name=f"tfpar-launch-{task.name}",
        )
        task.reader.start()

    def signal_all(self, signum: int) -> None:
        for task in self.tasks:
            if task.process is not None:
                try:
                    os.killpg(task.process.pid, signum)
                except (ProcessLookupError, PermissionError):
                    pass

    def stop_all(self) -> None:
        """SIGTERM every task's process group, wait the grace period, SIGKILL what is left."""
        if not any(t.process is not None for t in self.tasks):
            return
        self.signal_all(signal.SIGTERM)
        end = time.monotonic() + self.grace
        while time.monotonic() < end and any(
            t.process is not None and t.process.poll() is None for t in self.tasks
        ):
            self.drain()
            time.sleep(_POLL_SECONDS)
        self._guards_kill_their_trees()
        # ... and this catches what is left: grandchildren that outlive their task's main process.
        self.signal_all(signal.SIGKILL)
        for task in self.tasks:
            if task.process is not None:
                try:
                    task.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.say(f"{task.name} (pid {task.process.pid}) did not exit after SIGKILL")
        for task in self.tasks:
            if task.reader is not None:
                task.reader.join(timeout=5)
            self._close_lifeline(task)
        self.drain()

    def _guards_kill_their_trees(self) -> None:
        """Guards still running SIGKILL their whole tree, what left the process group included
        (the SIGKILL of the group that follows would kill the guard before it could) ..."""
        guards = [t.process for t in self.tasks if t.process is not None and t.process.poll() is None]
        for guard in guards:
            try:
                guard.send_signal(signal.SIGUSR1)
            except (ProcessLookupError, PermissionError):
                pass
        end = time.monotonic() + _GUARD_KILL_SECONDS
        while time.monotonic() < end and any(guard.poll() is None for guard in guards):
            time.sleep(_POLL_SECONDS)

    @staticmethod
    def _close_lifeline(task: Task) -> None:
        if task.process is not None and task.process.stdin is not None:
            try:
                task.process.stdin.close()
            except OSError:
                pass

    # -- supervision ------------------------------------------------------------------------

    def run(self) -> int:
        handlers = self._install_signal_handlers()
        try:
            setup_network(self.namespace, self.isolate, self.say)
            while True:
                code = self.attempt()
                if code is not None:
                    return code
        except Terminated as stop:
            name = signal.Signals(stop.signum).name
            self.say(f"received {name}; stopping all tasks (SIGTERM, then SIGKILL after "
                     f"{self.grace:g} s)")
            self.stop_all()
            return 128 + stop.signum
        except BaseException:
            self.stop_all()
            raise
        finally:
            self.namespace.stop()
            self._restore_signal_handlers(handlers)

    def attempt(self) -> int | None:
        """Runs the cluster once; returns the launch's exit code, or None to restart it."""
        self.tasks = self.layout()
        layout = ", ".join(f"{t.name}={t.address}" for t in self.tasks)
        self.say(
            f"starting {len(self.tasks)} tasks (attempt {self.restarts + 1} of "
            f"{self.max_restarts + 1}): {layout}"
        )
        # Servers first, then the tasks that run COMMAND.
        for task in sorted(self.tasks, key=lambda t: t.runs_command):
            self.start(task)
        outcome, failed = self.supervise()
        self.stop_all()
        if outcome == "ok":
            self.say("all tasks finished successfully")
            return 0
        if outcome == "timeout":
            self.say(f"timed out after {self.timeout:g} s; stopped all tasks")
            return EXIT_TIMEOUT
        assert failed is not None  # outcome == "failed"
        code = exit_code(failed.exit_code)
        self.report(failed)
        if self.restarts < self.max_restarts:
            self.restarts += 1
            self.say(
                f"restarting the cluster with fresh ports (restart {self.restarts} of "
                f"{self.max_restarts}; TFPAR_LAUNCH_RESTART={self.restarts})"
            )
            return None
        if self.max_restarts:
            self.say(f"no restarts left (max_restarts={self.max_restarts}); giving up")
        return code

    def supervise(self) -> tuple[str, Task | None]:
        while True:
            self.drain()
            pending = False
            for task in self.tasks:
                if task.process is None or task.exit_code is not None:
                    continue
                code = task.process.poll()
                if code is None:
                    pending = pending or task.runs_command
                    continue
                task.exit_code = code
                if task.runs_command and code == 0:
                    continue
                if not task.runs_command and task.type == "worker" and self.restarts < self.max_restarts:
                    self.restart_server(task)
                    pending = True
                    continue
                return "failed", task
            if not pending:
                return "ok", None
            if self.deadline is not None and time.monotonic() >= self.deadline:
                return "timeout", None
            time.sleep(_POLL_SECONDS)

    def restart_server(self, task: Task) -> None:
        if task.reader is not None:
            task.reader.join(timeout=5)
        self.drain()
        self.restarts += 1
        self.say(
            f"{task.name} (server) exited with {describe(task.exit_code)}; restarting it in place "
            f"on {task.address} (restart {self.restarts} of {self.max_restarts}); the coordinator "
            "re-runs the closures it lost"
        )
        assert task.process is not None  # it exited: supervise() polled it
        try:
            os.killpg(task.process.pid, signal.SIGKILL)  # leftovers of the old server, if any
        except (ProcessLookupError, PermissionError):
            pass
        self._close_lifeline(task)
        self.start(task)

    def report(self, task: Task) -> None:
        lines = "\n".join(f"  {line}" for line in task.tail) or "  (no output)"
        self.say(
            f"{task.name} failed with {describe(task.exit_code)}; stopped the other tasks.\n"
            f"last {len(task.tail)} lines of {task.name}:\n{lines}"
        )
        if self.namespace.holder is not None:
            self.say(
                "note: the tasks run without network access (network: isolated, loopback only); "
                "if they need it (downloads, package index, remote storage), run with "
                "--network host (isolate_network=False)"
            )

    # -- the launcher's own signals ---------------------------------------------------------

    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            raise Terminated(signum)

        previous: dict[int, Any] = {}
        for signum in (signal.SIGTERM, signal.SIGHUP):
            current = signal.getsignal(signum)
            if current in (signal.SIG_DFL, None):  # do not override a handler the app installed
                previous[signum] = current
                signal.signal(signum, handler)
        return previous

    def _restore_signal_handlers(self, previous: dict[int, Any]) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def exit_code(code: int | None) -> int:
    """The launch's exit code for a task's ``Popen.returncode`` (``128 + N`` for signal N)."""
    if code is None:
        return 1
    return 128 - code if code < 0 else code


def describe(code: int | None) -> str:
    """``"exit code 7"`` or ``"signal SIGKILL (exit code 137)"`` for a ``Popen.returncode``."""
    if code is not None and code < 0:
        try:
            return f"signal {signal.Signals(-code).name} (exit code {128 - code})"
        except ValueError:
            return f"signal {-code} (exit code {128 - code})"
    return f"exit code {code}"
