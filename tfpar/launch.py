"""Local multi-process launcher: ``tfpar launch`` and :func:`launch` (torchrun-style).

``tfpar launch --workers 2 -- python train.py`` starts one process per task on this machine,
each with its own ``TF_CONFIG`` on free 127.0.0.1 ports, streams their output with a
``[worker:1] `` prefix per line, and supervises them:

* It returns 0 when every task that must finish has exited 0.
* When a task fails (non-zero exit or killed by a signal) it stops the others within seconds
  (SIGTERM to each task's whole process group, a grace period, then SIGKILL), prints the failing
  task's last lines and returns that task's exit code (``128 + signal`` for a signal). No
  process is left behind.
* ``max_restarts=K`` restarts the whole cluster after a failure, up to K times, with fresh ports
  (so a port still held by a dying process cannot clash), so that a run using
  ``keras.callbacks.BackupAndRestore`` resumes. Children see ``TFPAR_LAUNCH_RESTART`` = the
  number of restarts so far (0 on the first attempt).
* ``timeout`` bounds the whole launch, restarts included (exit code 124).

Cluster layouts:

* ``workers=N`` (``ps=0``): N tasks ``worker:0..N-1`` run COMMAND (MultiWorkerMirroredStrategy).
  ``chief=True`` adds a ``chief:0`` task that runs COMMAND too.
* ``ps=M > 0``: parameter-server training, as in the TF tutorial. The ``chief:0`` task runs
  COMMAND and is the coordinator (a chief is added even without ``chief=True``); the N worker
  and M ps tasks run TensorFlow servers (:func:`serve`) and are stopped when the chief is done.
  A worker server that dies is restarted in place (same port) while restarts remain, so the
  coordinator's closures move on (ClusterCoordinator retries them: at-least-once); a ps or chief
  failure stops the cluster.

Child environment: the parent's, plus `env`, plus ``TF_CONFIG``, ``TFPAR_LAUNCH_TASK``
(``"worker:1"``), ``TFPAR_LAUNCH_RESTART`` and ``PYTHONUNBUFFERED=1`` (unless set). The current
process's environment is never modified.

Security: TensorFlow's gRPC servers have no authentication and always listen on every interface
(``0.0.0.0``/``[::]``; TensorFlow takes only the port from the cluster spec). The launcher puts
only 127.0.0.1 addresses in ``TF_CONFIG``, so the tasks talk over loopback, but by default their
ports are reachable from other hosts unless a firewall blocks them. ``isolate_network=True``
(``--isolate-network``, Linux) runs all tasks in a private network namespace that has only a
loopback interface: the servers are then reachable by the cluster's own tasks and nothing else
(and the tasks have no network access beyond loopback: no downloads, no remote storage). It uses
an unprivileged user namespace (``unshare(CLONE_NEWUSER | CLONE_NEWNET)``) with the same uid/gid,
so it needs no root, but some systems disable user namespaces.

POSIX only (process groups, signals).

The module itself is callable: ``tfpar.launch(...)`` is :func:`launch` whether ``tfpar.launch``
names this module (after ``import tfpar.launch``) or not, and ``tfpar.launch.main`` /
``tfpar.launch.serve`` stay reachable.
"""

from __future__ import annotations

import argparse
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
import types
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from tfpar import cluster as _cluster

__all__ = ["EXIT_TIMEOUT", "build_parser", "launch", "main", "serve"]

#: Exit code of a launch that ran out of time (as coreutils ``timeout``).
EXIT_TIMEOUT = 124
_POLL_SECONDS = 0.05
_TAIL_LINES = 20
_SERVE_CODE = "import sys; from tfpar.launch import serve; sys.exit(serve())"
_CLONE_NEWUSER, _CLONE_NEWNET = 0x10000000, 0x40000000

# Runs in a fresh (single-threaded) interpreter: makes a user + network namespace with the same
# uid/gid, brings its loopback interface up, prints READY and lives until its stdin closes (the
# launcher ends or dies). Tasks join its namespaces with _JOIN_CODE.
_HOLDER_CODE = f"""
import ctypes, fcntl, os, socket, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
uid, gid = os.geteuid(), os.getegid()
if libc.unshare({_CLONE_NEWUSER} | {_CLONE_NEWNET}) != 0:
    print("ERROR unshare(CLONE_NEWUSER | CLONE_NEWNET): " + os.strerror(ctypes.get_errno()), flush=True)
    sys.exit(1)
try:
    for name, text in (("setgroups", "deny"), ("uid_map", f"{{uid}} {{uid}} 1"), ("gid_map", f"{{gid}} {{gid}} 1")):
        with open("/proc/self/" + name, "w") as handle:
            handle.write(text)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    request = struct.pack("16sh", b"lo", 0)
    flags = struct.unpack("16sh", fcntl.ioctl(sock, 0x8913, request))[1]  # SIOCGIFFLAGS
    fcntl.ioctl(sock, 0x8914, struct.pack("16sh", b"lo", flags | 1))  # SIOCSIFFLAGS: IFF_UP
except OSError as error:
    print("ERROR setting up the namespace: " + str(error), flush=True)
    sys.exit(1)
print("READY", flush=True)
sys.stdin.read()
"""

# Joins the holder's user and network namespaces (argv[1] = its pid), then execs the task.
_JOIN_CODE = f"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for name, flag in (("user", {_CLONE_NEWUSER}), ("net", {_CLONE_NEWNET})):
    fd = os.open("/proc/" + sys.argv[1] + "/ns/" + name, os.O_RDONLY)
    if libc.setns(fd, flag) != 0:
        sys.stderr.write("tfpar launch: cannot join the network namespace (" + name + "): "
                         + os.strerror(ctypes.get_errno()) + "\\n")
        os._exit(126)
    os.close(fd)
try:
    os.execvp(sys.argv[2], sys.argv[2:])
except OSError as error:
    sys.stderr.write("tfpar launch: could not run " + repr(sys.argv[2:]) + ": " + str(error) + "\\n")
    os._exit(127)
"""


@dataclasses.dataclass
class _Task:
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


class _Terminated(Exception):
    """Raised in the supervising thread when the launcher itself gets SIGTERM/SIGHUP."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def launch(
    command: Sequence[str] | None = None,
    *,
    workers: int = 2,
    ps: int = 0,
    chief: bool = False,
    max_restarts: int = 0,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    output: TextIO | None = None,
    grace_period: float = 5.0,
    isolate_network: bool = False,
) -> int:
    """Runs COMMAND as a local multi-process TensorFlow cluster and supervises it.

    Args:
        command: The program each COMMAND task runs, e.g. ``["python", "train.py"]``. None
            re-runs the current script with its arguments (``sys.argv``); in a notebook pass a
            command.
        workers: Number of worker tasks, >= 1.
        ps: Number of parameter-server tasks, >= 0. With ps > 0 the chief runs COMMAND as the
            coordinator and the workers run servers.
        chief: Whether to add a ``chief:0`` task (implied when ps > 0).
        max_restarts: How many times the whole cluster may be restarted after a failure.
        timeout: Seconds the whole launch may take (restarts included), or None for no limit.
        env: Extra environment variables for every task.
        output: Where prefixed output goes; None means ``sys.stdout`` at call time (a notebook
            cell's output when called from a notebook).
        grace_period: Seconds between SIGTERM and SIGKILL when stopping tasks.
        isolate_network: Run all tasks in a private network namespace with only a loopback
            interface (Linux), so the unauthenticated TensorFlow servers are unreachable from
            other hosts; the tasks then have no other network access either.

    Returns:
        0 when all tasks that must finish succeeded; otherwise the exit code of the task that
        failed last (``128 + signal number`` when it was killed by a signal), or 124 on timeout.

    Raises:
        TypeError: If an argument has the wrong type (e.g. a command string instead of a list).
        ValueError: If an argument has a wrong value (e.g. ``workers=0``).
        RuntimeError: If called inside a task that this launcher started (no nested launches),
            on a non-POSIX system, or when `isolate_network` is requested where user namespaces
            are unavailable.

    Example:
    >>> tfpar.launch([sys.executable, "train.py"], workers=2)
    0
    """
    command = _check_command(command)
    _check_int("workers", workers, 1)
    _check_int("ps", ps, 0)
    _check_int("max_restarts", max_restarts, 0)
    if not isinstance(chief, bool):
        raise TypeError(f"Expected chief to be a bool. Received: chief={chief!r}")
    if not isinstance(isolate_network, bool):
        raise TypeError(
            f"Expected isolate_network to be a bool. Received: isolate_network={isolate_network!r}"
        )
    if timeout is not None:
        _check_positive("timeout", timeout)
    _check_positive("grace_period", grace_period)
    extra_env = _check_env(env)
    if os.name != "posix":
        raise RuntimeError(
            "tfpar launch needs POSIX process groups and signals. "
            f"Received: os.name={os.name!r}. Run it on Linux or macOS (or WSL)."
        )
    if isolate_network and not sys.platform.startswith("linux"):
        raise RuntimeError(
            "isolate_network=True uses Linux network namespaces. "
            f"Received: platform={sys.platform!r}. Run without it, behind a firewall."
        )
    if os.environ.get("TFPAR_LAUNCH_TASK"):
        raise RuntimeError(
            "launch() was called inside a task that tfpar launch started "
            f"(TFPAR_LAUNCH_TASK={os.environ['TFPAR_LAUNCH_TASK']}); nested launches would start "
            "a cluster per task. Guard the call, e.g. `if 'TF_CONFIG' not in os.environ:`."
        )
    out = output if output is not None else sys.stdout
    if not hasattr(out, "write"):
        raise TypeError(f"Expected output to have a write() method. Received: output={out!r}")
    return _Launcher(
        command, workers, ps, chief or ps > 0, max_restarts, timeout, extra_env, out, grace_period,
        isolate_network,
    ).run()


def _check_command(command: Any) -> list[str]:
    if command is None:
        script = sys.argv[0] if sys.argv else ""
        if not script or not os.path.isfile(script):
            raise ValueError(
                "command=None re-runs the current script, but there is none (an interactive "
                f"session or notebook). Received: sys.argv={sys.argv!r}. Pass a command, e.g. "
                "tfpar.launch([sys.executable, 'train.py'], workers=2)."
            )
        return [sys.executable, *sys.argv]
    if isinstance(command, (str, bytes)) or not isinstance(command, Sequence):
        raise TypeError(
            "Expected command to be a list of strings such as [sys.executable, 'train.py']. "
            f"Received: command={command!r}. Split a shell string with shlex.split(...)."
        )
    if not command or not all(isinstance(part, str) for part in command):
        raise TypeError(
            "Expected command to be a non-empty list of strings. "
            f"Received: command={list(command)!r}"
        )
    return list(command)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"Expected {name} to be an int. Received: {name}={value!r} (of type {type(value).__name__})"
        )
    if value < minimum:
        raise ValueError(f"Expected {name} >= {minimum}. Received: {name}={value}")


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Expected {name} to be a number of seconds. Received: {name}={value!r}")
    if not value > 0:
        raise ValueError(f"Expected {name} > 0 seconds. Received: {name}={value}")


def _check_env(env: Any) -> dict[str, str]:
    if env is None:
        return {}
    if not isinstance(env, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise TypeError(f"Expected env to be a dict of str to str. Received: env={env!r}")
    reserved = sorted(k for k in env if k == "TF_CONFIG" or k.startswith("TFPAR_LAUNCH_"))
    if reserved:
        raise ValueError(
            f"The launcher sets {', '.join(reserved)} for each task itself; remove it from env. "
            f"Received: env keys={sorted(env)}"
        )
    return dict(env)


class _Launcher:
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
        self.tasks: list[_Task] = []
        self.isolate = isolate
        self.holder: subprocess.Popen | None = None

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

    def _read(self, task: _Task, stream) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            task.tail.append(line)
            self.lines.put((task.name, line))
        stream.close()

    # -- process management -----------------------------------------------------------------

    def layout(self) -> list[_Task]:
        names = []
        if self.chief:
            names.append(("chief", 0))
        names += [("worker", i) for i in range(self.workers)]
        names += [("ps", i) for i in range(self.ps)]
        ports = _cluster.free_ports(len(names))
        tasks = []
        for (ttype, index), port in zip(names, ports):
            runs_command = ttype == "chief" if self.ps else ttype in ("chief", "worker")
            tasks.append(_Task(ttype, index, f"127.0.0.1:{port}", runs_command))
        return tasks

    def spec(self) -> dict[str, list[str]]:
        spec: dict[str, list[str]] = {}
        for task in self.tasks:
            spec.setdefault(task.type, []).append(task.address)
        return spec

    def start(self, task: _Task) -> None:
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
        if self.holder is not None:
            argv = [sys.executable, "-c", _JOIN_CODE, str(self.holder.pid), *argv]
        try:
            task.process = subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
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
        # Also catches grandchildren that outlive their task's main process.
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
        self.drain()

    # -- supervision ------------------------------------------------------------------------

    def start_namespace(self) -> None:
        """Starts the process that holds the private network namespace the tasks join."""
        self.holder = subprocess.Popen(
            [sys.executable, "-c", _HOLDER_CODE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        lines: queue.Queue = queue.Queue()
        threading.Thread(
            target=lambda: lines.put(self.holder.stdout.readline()), daemon=True
        ).start()
        try:
            line = lines.get(timeout=30).decode(errors="replace").strip()
        except queue.Empty:
            line = "no answer within 30 s"
        if line != "READY":
            self.stop_namespace()
            raise RuntimeError(
                "isolate_network=True could not create a private network namespace: "
                f"{line or 'the helper exited'}. User namespaces may be disabled here (see "
                "sysctl kernel.unprivileged_userns_clone, user.max_user_namespaces, or "
                "kernel.apparmor_restrict_unprivileged_userns). Run without isolate_network "
                "on a trusted network or behind a firewall."
            )
        self.say(f"tasks run in a private network namespace (loopback only; helper pid {self.holder.pid})")

    def stop_namespace(self) -> None:
        if self.holder is None:
            return
        try:
            self.holder.stdin.close()
            self.holder.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            self.holder.kill()
            self.holder.wait(timeout=5)
        self.holder.stdout.close()
        self.holder = None

    def run(self) -> int:
        handlers = self._install_signal_handlers()
        try:
            if self.isolate:
                self.start_namespace()
            while True:
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
                code = _exit_code(failed.exit_code)
                self.report(failed)
                if self.restarts < self.max_restarts:
                    self.restarts += 1
                    self.say(
                        f"restarting the cluster with fresh ports (restart {self.restarts} of "
                        f"{self.max_restarts}; TFPAR_LAUNCH_RESTART={self.restarts})"
                    )
                    continue
                if self.max_restarts:
                    self.say(f"no restarts left (max_restarts={self.max_restarts}); giving up")
                return code
        except _Terminated as stop:
            name = signal.Signals(stop.signum).name
            self.say(f"received {name}; stopping all tasks (SIGTERM, then SIGKILL after "
                     f"{self.grace:g} s)")
            self.stop_all()
            return 128 + stop.signum
        except BaseException:
            self.stop_all()
            raise
        finally:
            self.stop_namespace()
            self._restore_signal_handlers(handlers)

    def supervise(self) -> tuple[str, _Task | None]:
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

    def restart_server(self, task: _Task) -> None:
        if task.reader is not None:
            task.reader.join(timeout=5)
        self.drain()
        self.restarts += 1
        self.say(
            f"{task.name} (server) exited with {_describe(task.exit_code)}; restarting it in place "
            f"on {task.address} (restart {self.restarts} of {self.max_restarts}); the coordinator "
            "re-runs the closures it lost"
        )
        try:
            os.killpg(task.process.pid, signal.SIGKILL)  # leftovers of the old server, if any
        except (ProcessLookupError, PermissionError):
            pass
        self.start(task)

    def report(self, task: _Task) -> None:
        lines = "\n".join(f"  {line}" for line in task.tail) or "  (no output)"
        self.say(
            f"{task.name} failed with {_describe(task.exit_code)}; stopped the other tasks.\n"
            f"last {len(task.tail)} lines of {task.name}:\n{lines}"
        )

    # -- the launcher's own signals ---------------------------------------------------------

    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            raise _Terminated(signum)

        previous = {}
        for signum in (signal.SIGTERM, signal.SIGHUP):
            current = signal.getsignal(signum)
            if current in (signal.SIG_DFL, None):  # do not override a handler the app installed
                previous[signum] = current
                signal.signal(signum, handler)
        return previous

    def _restore_signal_handlers(self, previous: dict[int, Any]) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def _exit_code(code: int | None) -> int:
    if code is None:
        return 1
    return 128 - code if code < 0 else code


def _describe(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"signal {signal.Signals(-code).name} (exit code {128 - code})"
        except ValueError:
            return f"signal {-code} (exit code {128 - code})"
    return f"exit code {code}"


# ------------------------------------------------------------------------------------------
# Server entry point for ps tasks (and worker tasks in ps mode)
# ------------------------------------------------------------------------------------------


def serve() -> int:
    """Runs this task's TensorFlow server (from ``TF_CONFIG``) until the process is stopped.

    The launcher runs this in ps tasks, and in worker tasks when ``ps > 0``; it can also be used
    by hand in a parameter-server job. The server gets ``inter_op_parallelism_threads >=
    workers + 1`` (fewer can deadlock, b/172296720) and, on ps tasks, no GPU.

    Returns:
        Never returns normally; 2 if ``TF_CONFIG`` does not name a worker or ps task.

    Example:
    >>> import sys, tfpar.launch  # in a ps task: TF_CONFIG={"cluster": ..., "task": {"type": "ps", ...}}
    >>> sys.exit(tfpar.launch.serve())
    """
    import tensorflow as tf

    config = _cluster.parse_tf_config()
    ttype = config.get("task", {}).get("type")
    if ttype not in ("worker", "ps"):
        print(
            "tfpar serve: expected TF_CONFIG to describe a 'worker' or 'ps' task. "
            f"Received: TF_CONFIG task={config.get('task')!r}",
            file=sys.stderr,
        )
        return 2
    resolver = _cluster.resolve("tf_config")
    workers = len(config["cluster"].get("worker", ()))
    proto = tf.compat.v1.ConfigProto(inter_op_parallelism_threads=max(workers + 1, os.cpu_count() or 1))
    if ttype == "ps":
        proto.device_count["GPU"] = 0
    server = tf.distribute.Server(
        resolver.cluster_spec(),
        job_name=resolver.task_type,
        task_index=resolver.task_id,
        protocol=resolver.rpc_layer or "grpc",
        config=proto,
        start=True,
    )
    address = config["cluster"][ttype][config["task"]["index"]]
    print(
        f"tfpar: {ttype}:{resolver.task_id} server listening on {address} (pid {os.getpid()})",
        flush=True,
    )
    server.join()
    return 0


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected an integer >= {minimum}. Received: {text!r}"
            ) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}. Received: {value}")
        return value

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0. Received: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0. Received: {text}")
    return value


def build_parser(prog: str = "tfpar launch") -> argparse.ArgumentParser:
    """The argument parser of ``tfpar launch`` (for embedding in the ``tfpar`` CLI).

    Example:
    >>> tfpar.launch.build_parser().parse_args(["--workers", "2"]).workers
    2
    """
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Run COMMAND as a local multi-process TensorFlow cluster: one process per task, "
            "each with TF_CONFIG on free 127.0.0.1 ports, output prefixed with [worker:N]. "
            "Exits 0 when all tasks succeed; otherwise stops the rest within seconds and exits "
            "with the failing task's code (124 on timeout)."
        ),
        epilog=(
            "examples:\n"
            "  tfpar launch --workers 2 -- python train.py            # MultiWorkerMirrored\n"
            "  tfpar launch --workers 2 --ps 1 --chief -- python train.py  # parameter server:\n"
            "      the chief runs train.py as the coordinator, workers and ps run servers\n"
            "  tfpar launch --workers 2 --max-restarts 3 -- python train.py  # resume with\n"
            "      BackupAndRestore after a failure"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workers", type=_int_at_least(1), default=2, metavar="N",
                        help="number of worker tasks (>= 1, default 2)")
    parser.add_argument("--ps", type=_int_at_least(0), default=0, metavar="M",
                        help="number of parameter-server tasks (>= 0, default 0); implies --chief")
    parser.add_argument("--chief", action="store_true",
                        help="add a chief task (with --ps it is the coordinator)")
    parser.add_argument("--max-restarts", type=_int_at_least(0), default=0, metavar="K",
                        help="restart the cluster after a failure up to K times (default 0)")
    parser.add_argument("--timeout", type=_seconds, default=None, metavar="S",
                        help="stop everything and exit 124 after S seconds (default: no limit)")
    parser.add_argument("--grace-period", type=_seconds, default=5.0, metavar="S",
                        help="seconds between SIGTERM and SIGKILL when stopping tasks (default 5)")
    parser.add_argument("--isolate-network", action="store_true",
                        help="run the tasks in a private loopback-only network namespace (Linux): "
                             "the unauthenticated TensorFlow servers are unreachable from other "
                             "hosts, and the tasks have no other network access")
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
                        help="the program every COMMAND task runs, after --")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tfpar launch [options] -- COMMAND ...``.

    Args:
        argv: The arguments after ``launch`` (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 2 for bad arguments, the failing task's exit code, 124
        on timeout, 128 + N when the launcher was stopped by signal N.

    Example:
    >>> tfpar.launch.main(["--workers", "2", "--", sys.executable, "-c", "print('hi')"])
    0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if "--" in argv:
        split = argv.index("--")
        options, command = argv[:split], argv[split + 1 :]
    else:
        options, command = argv, None
    try:
        args = parser.parse_args(options)
        if command is None:
            command = args.command
        elif args.command:
            parser.error(f"unrecognized arguments before --: {' '.join(args.command)}")
        if not command:
            parser.error(
                "expected a COMMAND after --, e.g. tfpar launch --workers 2 -- python train.py"
            )
    except SystemExit as exit_:
        return int(exit_.code) if isinstance(exit_.code, int) else 2
    try:
        return launch(
            command,
            workers=args.workers,
            ps=args.ps,
            chief=args.chief,
            max_restarts=args.max_restarts,
            timeout=args.timeout,
            grace_period=args.grace_period,
            isolate_network=args.isolate_network,
        )
    except (TypeError, ValueError) as error:
        print(f"tfpar launch: error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        print(f"tfpar launch: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


class _CallableModule(types.ModuleType):
    """This module's class: calling the module calls :func:`launch`."""

    def __call__(self, *args: Any, **kwargs: Any) -> int:
        return launch(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
