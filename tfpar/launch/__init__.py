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
  of the task's session and process group; ``GUARD_CODE`` in ``_guard``). When the launcher dies, even by
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

Layout (no module imports TensorFlow at import time; only :func:`serve` loads it, when it runs):
``_api`` (:func:`launch` and its argument checks), ``_supervisor`` (starting, supervising,
stopping and restarting the tasks), ``_guard`` (the guard and namespace-holder programs),
``_network`` (the private network namespace), ``_cli`` (:func:`build_parser`, :func:`main`),
``_horovodrun`` (horovodrun's flags: ``-np``, ``-H`` on this machine only, and the verdict on every
other flag, shared with ``tfpar.horovod.run``), ``_serve`` (:func:`serve`).

The package itself is callable: ``tfpar.launch(...)`` is :func:`launch` whether ``tfpar.launch``
names this package (after ``import tfpar.launch``) or not, and ``tfpar.launch.main`` /
``tfpar.launch.serve`` stay reachable (and ``python -c "from tfpar.launch import serve"``, which
the launcher runs in server tasks, keeps working).
"""

from __future__ import annotations

import sys
import types
from typing import Any

from tfpar.launch._api import launch
from tfpar.launch._cli import build_parser, main
from tfpar.launch._serve import serve
from tfpar.launch._supervisor import EXIT_TIMEOUT

__all__ = ["EXIT_TIMEOUT", "build_parser", "launch", "main", "serve"]


class _CallableModule(types.ModuleType):
    """This package's class: calling the package calls :func:`launch`."""

    def __call__(self, *args: Any, **kwargs: Any) -> int:
        return launch(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
