"""launch(): the Python entry point of the launcher. Checks every argument, then supervises."""

from __future__ import annotations

import math
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from tfpar.launch._supervisor import Launcher

__all__ = ["launch"]


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
    _check_platform(isolate_network)
    out = output if output is not None else sys.stdout
    if not hasattr(out, "write"):
        raise TypeError(f"Expected output to have a write() method. Received: output={out!r}")
    return Launcher(
        command, workers, ps, chief or ps > 0, max_restarts, timeout, extra_env, out, grace_period,
        isolate_network,
    ).run()


def _check_platform(isolate_network: bool | None) -> None:
    """Refuses a system without process groups, isolation off Linux, and nested launches."""
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
