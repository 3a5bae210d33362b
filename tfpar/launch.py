"""Local multi-process launcher: ``tfpar launch`` and :func:`launch` (torchrun-style).

``tfpar launch --workers 2 -- python train.py`` starts one process per task on this machine,
each with its own ``TF_CONFIG`` on free 127.0.0.1 ports, streams their output with a
``[worker:1] `` prefix per line, and supervises them:

* It returns 0 when every task that must finish has exited 0.
* When a task fails (non-zero exit or killed by a signal) it stops the others within seconds
  (SIGTERM to each task's whole process group, a grace period, then SIGKILL), prints the failing
  task's last lines and returns that task's exit code (``128 + signal`` for a signal). No
  process is left behind.
* No orphans, however the launcher ends: each task runs under a small guard process (the leader
  of the task's session and process group; ``_GUARD_CODE``). When the launcher dies, even by
  SIGKILL, the guard notices at once (its stdin, a pipe only the launcher writes to, reaches EOF;
  and its parent pid changes, checked every second) and stops the task and everything it started
  (SIGTERM, the grace period, SIGKILL). On Linux the guard is a child subreaper and also stops
  descendants that left the process group (``setsid``, daemons), also when the task's main
  process exits; the task's main process has ``PR_SET_PDEATHSIG=SIGKILL`` against its guard.
  A normal stop reaches those too: the guard passes SIGTERM on to them, and the launcher asks
  each remaining guard (SIGUSR1) to SIGKILL its tree before it SIGKILLs the process group.
  The guards use no thread-bound mechanism, so ``launch()`` may be called from any thread.
  Measured on 2 cores after a SIGKILL of the launcher: tasks, ps/worker servers and their
  children gone in 0.05-0.23 s when they exit on SIGTERM, in grace + 0.1-0.3 s when they do not
  (a multi-worker ``tfpar train`` mid-epoch); before, they kept running (servers forever).
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

Network (loopback only, by default): TensorFlow's gRPC servers have no authentication and always
listen on every interface (``0.0.0.0``/``[::]``; TensorFlow takes only the port from the cluster
spec), so on the host network any machine that can reach this one could run graphs in the
cluster. By default (``isolate_network=None``, ``--network auto``) the launcher therefore runs all
tasks in a private network namespace whose only interface is loopback: the servers are reachable
by the cluster's own tasks and nothing else, and the tasks have no network access beyond
loopback (no downloads, no package index, no remote storage). The first output line says which
mode is in force. Tasks that need the network opt out with ``--network host``
(``isolate_network=False``). The namespace is a plain one where the process may make it (root
with CAP_SYS_ADMIN: the tasks keep their privileges), else an unprivileged user namespace
(``unshare(CLONE_NEWUSER | CLONE_NEWNET)``) with the same uid/gid. Where the kernel refuses both
(user namespaces disabled by sysctl, AppArmor or a container's seccomp profile) or off Linux, the
launch warns and uses the host network; ``isolate_network=True`` (``--network isolated``,
``--isolate-network``) makes that an error instead. Before issue 12 the default was the host
network.

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
import math
import os
import queue
import shutil
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
_GUARD_KILL_SECONDS = 5.0  # how long stop_all waits for the guards' own SIGKILL of their trees
_SERVE_CODE = "import sys; from tfpar.launch import serve; sys.exit(serve())"
_CLONE_NEWUSER, _CLONE_NEWNET = 0x10000000, 0x40000000
_NETWORK_MODES = ("auto", "isolated", "host")
_USERNS_HINT = (
    "Unprivileged user namespaces may be disabled (sysctl kernel.unprivileged_userns_clone=1, "
    "user.max_user_namespaces > 0, kernel.apparmor_restrict_unprivileged_userns=0, or a "
    "container's seccomp profile)."
)
# The interpreter flags of the launcher's helpers: no site, no PYTHON* variables (fast, and
# independent of the task's environment, which the helpers pass on unchanged).
_HELPER_FLAGS = ("-I", "-S")

# The holder of the private network namespace. Runs in a fresh (single-threaded) interpreter with
# argv[1] = the launcher's pid: makes the network namespace (a plain one when the process may,
# e.g. root with CAP_SYS_ADMIN, so the tasks keep their privileges on the host's files; otherwise
# inside an unprivileged user namespace with the same uid/gid), brings its loopback interface up,
# prints READY and lives until its stdin closes or its parent is no longer the launcher (the
# launcher ended or died). Tasks join its namespaces (see _GUARD_CODE).
_HOLDER_CODE = f"""
import ctypes, fcntl, os, select, socket, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
launcher = int(sys.argv[1])
uid, gid = os.geteuid(), os.getegid()
if libc.unshare({_CLONE_NEWNET}) != 0:
    if libc.unshare({_CLONE_NEWUSER} | {_CLONE_NEWNET}) != 0:
        print("ERROR unshare(CLONE_NEWUSER | CLONE_NEWNET): " + os.strerror(ctypes.get_errno()), flush=True)
        sys.exit(1)
    try:
        for name, text in (("setgroups", "deny"), ("uid_map", f"{{uid}} {{uid}} 1"), ("gid_map", f"{{gid}} {{gid}} 1")):
            with open("/proc/self/" + name, "w") as handle:
                handle.write(text)
    except OSError as error:
        print("ERROR mapping the user namespace: " + str(error), flush=True)
        sys.exit(1)
try:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    request = struct.pack("16sh", b"lo", 0)
    flags = struct.unpack("16sh", fcntl.ioctl(sock, 0x8913, request))[1]  # SIOCGIFFLAGS
    fcntl.ioctl(sock, 0x8914, struct.pack("16sh", b"lo", flags | 1))  # SIOCSIFFLAGS: IFF_UP
except OSError as error:
    print("ERROR bringing up loopback in the namespace: " + str(error), flush=True)
    sys.exit(1)
print("READY", flush=True)
while os.getppid() == launcher:
    if select.select([0], [], [], 1.0)[0] and not os.read(0, 4096):
        break
"""

# The guard: every task runs under one, in a fresh single-threaded interpreter, as the leader of
# the task's own session and process group (which the launcher signals as a whole).
# argv: LAUNCHER_PID GRACE HOLDER_PID|- COMMAND...; stdin: the "lifeline", a pipe whose write end
# only the launcher holds.
#
# It forks the task's main process, which (Linux) joins the holder's namespaces, sets
# PR_SET_PDEATHSIG=SIGKILL (the guard is single-threaded, so "parent thread" = the guard), checks
# that the guard did not die before that, and execs COMMAND with stdin from /dev/null. The guard
# then waits. When the main process exits, it stops what the task left behind (its process group
# and, on Linux, every descendant: the guard is a child subreaper, so even processes that
# started their own session come back to it) and exits with the main process's status (the same
# signal when it was killed), so the launcher sees what the task did. When the launcher dies,
# however it died (lifeline EOF, or the parent pid changed: SIGKILL, a crash, the OOM killer),
# the guard stops the whole task: SIGTERM, GRACE seconds, SIGKILL. SIGTERM, SIGINT and SIGHUP do
# not stop the guard: the launcher signals the process group, so the task gets them itself, and
# the guard passes them on to the descendants that left the group (Linux). SIGUSR1 (from the
# launcher, to the guard only, before it SIGKILLs the group) makes the guard SIGKILL everything
# it would stop, so nothing that left the group survives the guard's own death.
_GUARD_CODE = r"""
import os, select, signal, sys, time
launcher, grace, holder, command = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4:]
me, group = os.getpid(), os.getpgid(0)
linux = sys.platform.startswith("linux")
if linux:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
wake_r, wake_w = os.pipe()
os.set_blocking(wake_w, False)
signal.set_wakeup_fd(wake_w)
pending = []
for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
    signal.signal(signum, lambda signum, frame: pending.append(signum))
signal.signal(signal.SIGCHLD, lambda *_: None)

child = os.fork()
if child == 0:
    code = 127
    try:
        signal.set_wakeup_fd(-1)
        for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1", "SIGCHLD", "SIGPIPE", "SIGXFSZ"):
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), signal.SIG_DFL)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        if holder != "-":
            code = 126
            for name, flag in (("user", 0x10000000), ("net", 0x40000000)):
                target = "/proc/" + holder + "/ns/" + name
                if os.stat(target).st_ino == os.stat("/proc/self/ns/" + name).st_ino:
                    continue  # already there (a plain network namespace needs no user namespace)
                fd = os.open(target, os.O_RDONLY)
                if libc.setns(fd, flag) != 0:
                    raise OSError(ctypes.get_errno(), "cannot join the network namespace (" + name
                                  + "): " + os.strerror(ctypes.get_errno()))
                os.close(fd)
            code = 127
        if linux:
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
            if os.getppid() != me:
                os._exit(137)  # the guard died before prctl took effect
        os.execvp(command[0], command)
    except BaseException as error:
        try:
            os.write(2, ("tfpar launch: could not run " + repr(command) + ": " + str(error) + "\n").encode())
        finally:
            os._exit(code)

status = None


def reap():
    global status
    while True:
        try:
            pid, wstatus = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if pid == child:
            status = wstatus


def tree():
    # Linux: (the members of the task's process group, the descendants of the guard).
    table, kids = {}, {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open("/proc/" + name + "/stat", "rb") as handle:
                    fields = handle.read().rsplit(b")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] not in (b"Z", b"X"):
                table[int(name)] = int(fields[2])
                kids.setdefault(int(fields[1]), []).append(int(name))
    found = {pid for pid, pgid in table.items() if pgid == group}
    todo, seen = [me], set()
    while todo:
        for pid in kids.get(todo.pop(), ()):
            if pid not in seen:
                seen.add(pid)
                todo.append(pid)
    return found, seen


def leftovers():
    members, descendants = tree()
    return (members | descendants) - {me}


def send(pids, signum):
    for pid in pids:
        try:
            os.kill(pid, signum)
        except OSError:
            pass


def sleep(seconds):
    if select.select([wake_r], [], [], seconds)[0]:
        os.read(wake_r, 4096)
    handle_signals()


def handle_signals():
    while pending:
        signum = pending.pop(0)
        if signum == signal.SIGUSR1:  # the launcher is about to SIGKILL the group
            if not linux:
                os.killpg(group, signal.SIGKILL)
            send(leftovers(), signal.SIGKILL)
        elif linux:  # the group got it from the sender; pass it to what left the group
            members, descendants = tree()
            send(descendants - members - {me}, signum)


def stop_everything():
    # SIGTERM, up to `grace` seconds, then SIGKILL: the task's main process and all it started.
    if not linux:
        os.killpg(group, signal.SIGTERM)
        end = time.monotonic() + grace
        while status is None and time.monotonic() < end:
            sleep(0.05)
            reap()
        os.killpg(group, signal.SIGKILL)  # this guard included
    pids = leftovers()
    if not pids:
        return
    send(pids, signal.SIGTERM)
    end = time.monotonic() + grace
    while pids and time.monotonic() < end:
        sleep(0.05)
        reap()
        pids = leftovers()
    send(pids, signal.SIGKILL)
    end = time.monotonic() + 10
    while pids and time.monotonic() < end:
        sleep(0.02)
        reap()
        pids = leftovers()


orphaned = False
while True:
    reap()
    if status is not None:
        break
    if os.getppid() != launcher:
        orphaned = True
        break
    ready = select.select([0, wake_r], [], [], 1.0)[0]
    if wake_r in ready:
        os.read(wake_r, 4096)
    handle_signals()
    if 0 in ready and not os.read(0, 4096):
        orphaned = True
        break

if orphaned:
    stop_everything()
    os._exit(1)
if linux:
    stop_everything()  # what the finished task left behind
if os.WIFSIGNALED(status):
    signum = os.WTERMSIG(status)
    signal.set_wakeup_fd(-1)
    try:
        import resource
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the task may have dumped; not us
        signal.signal(signum, signal.SIG_DFL)
    except (ImportError, OSError, ValueError):
        pass
    os.kill(me, signum)
    time.sleep(1)
    os._exit(128 + signum)
os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)
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
    isolate_network: bool | None = None,
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
        grace_period: Seconds between SIGTERM and SIGKILL when stopping tasks (also when the
            launcher died: each task's guard then stops it the same way).
        isolate_network: Where the tasks' network is. None (the default since issue 12; it was
            False before): a private network namespace with only a loopback interface where
            the kernel allows it (Linux), else the host network with a warning in the output.
            True: the private namespace, or RuntimeError where it is unavailable. False: the
            host network, where TensorFlow's unauthenticated servers listen on all interfaces
            and are reachable from other hosts; pass it for tasks that need the network
            (``pip install``, dataset downloads, remote storage), since isolated tasks reach
            nothing but each other.

    Returns:
        0 when all tasks that must finish succeeded; otherwise the exit code of the task that
        failed last (``128 + signal number`` when it was killed by a signal), or 124 on timeout.

    Raises:
        TypeError: If an argument has the wrong type (e.g. a command string instead of a list).
        ValueError: If an argument has a wrong value (e.g. ``workers=0``).
        RuntimeError: If called inside a task that this launcher started (no nested launches),
            on a non-POSIX system, or when ``isolate_network=True`` is requested where network
            namespaces are unavailable.

    Example:
    >>> tfpar.launch([sys.executable, "train.py"], workers=2)      # loopback only
    0
    >>> tfpar.launch([sys.executable, "fetch_and_train.py"], workers=2, isolate_network=False)
    0
    """
    command = _check_command(command)
    _check_int("workers", workers, 1)
    _check_int("ps", ps, 0)
    _check_int("max_restarts", max_restarts, 0)
    if not isinstance(chief, bool):
        raise TypeError(f"Expected chief to be a bool. Received: chief={chief!r}")
    if isolate_network is not None and not isinstance(isolate_network, bool):
        raise TypeError(
            "Expected isolate_network to be None (isolate where possible), True or False. "
            f"Received: isolate_network={isolate_network!r}"
        )
    if timeout is not None:
        _check_positive("timeout", timeout)
    _check_positive("grace_period", grace_period)
    extra_env = _check_env(env)
    _check_program(command, extra_env)
    if os.name != "posix":
        raise RuntimeError(
            "tfpar launch needs POSIX process groups and signals. "
            f"Received: os.name={os.name!r}. Run it on Linux or macOS (or WSL)."
        )
    if isolate_network and not sys.platform.startswith("linux"):
        raise RuntimeError(
            "isolate_network=True uses Linux network namespaces. "
            f"Received: platform={sys.platform!r}. Pass isolate_network=None (host network with "
            "a warning) or False, and block the cluster's ports with a firewall."
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
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"Expected {name} to be a finite number of seconds > 0. Received: {name}={value}"
            + (". For no time limit pass timeout=None." if name == "timeout" else "")
        )


def _check_program(command: list[str], env: Mapping[str, str]) -> None:
    """Fails before anything starts when COMMAND's program cannot be executed."""
    path = env.get("PATH", os.environ.get("PATH", os.defpath))
    if shutil.which(command[0], path=path) is None:
        where = "" if os.path.dirname(command[0]) else " in PATH"
        raise ValueError(
            f"Could not find an executable program {command[0]!r}{where}. Check the command: it "
            "must be an executable program with its arguments, e.g. [sys.executable, "
            f"'train.py']. Received: command={command!r}"
        )


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
        holder = "-" if self.holder is None else str(self.holder.pid)
        guard = [sys.executable, *_HELPER_FLAGS, "-c", _GUARD_CODE, str(os.getpid()),
                 repr(float(self.grace)), holder]
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
        # Guards still running SIGKILL their whole tree, what left the process group included
        # (the SIGKILL of the group below would kill the guard before it could) ...
        guards = [t.process for t in self.tasks if t.process is not None and t.process.poll() is None]
        for guard in guards:
            try:
                guard.send_signal(signal.SIGUSR1)
            except (ProcessLookupError, PermissionError):
                pass
        end = time.monotonic() + _GUARD_KILL_SECONDS
        while time.monotonic() < end and any(guard.poll() is None for guard in guards):
            time.sleep(_POLL_SECONDS)
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

    @staticmethod
    def _close_lifeline(task: _Task) -> None:
        if task.process is not None and task.process.stdin is not None:
            try:
                task.process.stdin.close()
            except OSError:
                pass

    # -- network ----------------------------------------------------------------------------

    def setup_network(self) -> None:
        """Starts the private network namespace, or says why the tasks use the host network."""
        if self.isolate is False:
            self.say(
                "network: host (requested with --network host / isolate_network=False): "
                "TensorFlow's unauthenticated servers listen on all interfaces, reachable from "
                "other hosts unless a firewall blocks the cluster's ports"
            )
            return
        problem = self.start_namespace()
        if problem is None:
            self.say(
                f"network: isolated (loopback only, private network namespace; helper pid "
                f"{self.holder.pid}); tasks that need the network: --network host"
            )
            return
        if self.isolate:
            raise RuntimeError(
                f"isolate_network=True (--network isolated) could not create a private network "
                f"namespace: {problem}. {_USERNS_HINT} Or pass --network host "
                "(isolate_network=False) on a trusted network or behind a firewall."
            )
        self.say(
            f"WARNING: network isolation is unavailable here ({problem}), so the tasks use the "
            "host network, where TensorFlow's unauthenticated servers listen on all interfaces "
            "and other hosts can reach the cluster's ports unless a firewall blocks them. "
            f"{_USERNS_HINT} Pass --network host (isolate_network=False) to choose the host "
            "network and silence this warning."
        )
        self.say("network: host (isolation unavailable)")

    def start_namespace(self) -> str | None:
        """Starts the process that holds the private network namespace the tasks join.

        Returns:
            None when the namespace is ready, else why it could not be made.
        """
        if not sys.platform.startswith("linux"):
            return f"network namespaces need Linux; platform={sys.platform!r}"
        self.holder = subprocess.Popen(
            [sys.executable, *_HELPER_FLAGS, "-c", _HOLDER_CODE, str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        lines: queue.Queue = queue.Queue()
        holder = self.holder
        threading.Thread(target=lambda: lines.put(holder.stdout.readline()), daemon=True).start()
        try:
            line = lines.get(timeout=30).decode(errors="replace").strip()
        except queue.Empty:
            line = "no answer within 30 s"
        if line == "READY":
            return None
        self.stop_namespace()
        line = line[len("ERROR ") :] if line.startswith("ERROR ") else line
        return line or "the helper exited"

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

    # -- supervision ------------------------------------------------------------------------

    def run(self) -> int:
        handlers = self._install_signal_handlers()
        try:
            self.setup_network()
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
        self._close_lifeline(task)
        self.start(task)

    def report(self, task: _Task) -> None:
        lines = "\n".join(f"  {line}" for line in task.tail) or "  (no output)"
        self.say(
            f"{task.name} failed with {_describe(task.exit_code)}; stopped the other tasks.\n"
            f"last {len(task.tail)} lines of {task.name}:\n{lines}"
        )
        if self.holder is not None:
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
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(
            f"expected a finite number of seconds > 0, e.g. 60. Received: {text!r}"
        )
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
            "      BackupAndRestore after a failure\n"
            "  tfpar launch --workers 2 --network host -- python download_and_train.py\n"
            "      # tasks that need the network (by default they see only loopback)\n"
            "\n"
            "Tasks die within seconds of the launcher, however it ends (even SIGKILL): each runs\n"
            "under a small guard process that stops it (SIGTERM, --grace-period, SIGKILL)."
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
    parser.add_argument("--network", choices=_NETWORK_MODES, default=None,
                        help="auto (default): run the tasks in a private loopback-only network "
                             "namespace where the kernel allows it (Linux), else on the host "
                             "network with a warning; isolated: the private namespace or fail; "
                             "host: the host network, for tasks that need it (downloads, remote "
                             "storage), where TensorFlow's unauthenticated servers are reachable "
                             "from other hosts")
    parser.add_argument("--isolate-network", action="store_true",
                        help="same as --network isolated (kept for compatibility)")
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
                        help="the program every COMMAND task runs, after --")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tfpar launch [options] -- COMMAND ...``.

    Args:
        argv: The arguments after ``launch`` (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 2 for bad arguments (one ``error:`` line on stderr, no
        traceback), 1 when ``--network isolated`` is impossible here, the failing task's exit
        code, 124 on timeout, 128 + N when the launcher was stopped by signal N.

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
        if args.isolate_network and args.network not in (None, "isolated"):
            parser.error(f"--isolate-network contradicts --network {args.network}; pass one of them")
        network = "isolated" if args.isolate_network else (args.network or "auto")
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
            isolate_network={"auto": None, "isolated": True, "host": False}[network],
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
