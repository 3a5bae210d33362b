"""``hvd.run(fn, args, kwargs, np=N)``: Horovod's ``horovod.run`` on ``tfpar.launch``.

Runs ``fn(*args, **kwargs)`` in N processes started by :func:`tfpar.launch` (N worker tasks on
this machine, Horovod ranks 0..N-1) and returns their return values as a list ordered by rank.

How ``fn`` reaches the processes: the standard :mod:`pickle` module (cloudpickle is not used),
which pickles a function by reference (its module and name). So ``fn`` must be a module-level
function the processes can import: one defined in a module, or in the script that calls
``hvd.run`` (the processes then load that script under the name ``__mp_main__``, as
:mod:`multiprocessing` does, so its ``if __name__ == "__main__":`` block does not run again). A
lambda, a nested function or a function defined in a notebook cell or an interactive session
cannot be pickled this way; :func:`run` says so before it starts anything. The same holds for
``args``, ``kwargs`` and the return values (returned through a temporary directory).

Each process calls ``hvd.init()`` itself, as under Horovod; ``run`` does not. The rank of a
return value is ``hvd.rank()`` when ``fn`` initialized tfpar.horovod, else the task's place in
the cluster (worker i is rank i, as ``hvd.init()`` would number it).
"""

from __future__ import annotations

import os
import pickle
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

from tfpar.launch._api import launch
from tfpar.launch._horovodrun import check_hosts, parse_hostfile, parse_hosts

__all__ = ["run"]

_ELASTIC = (
    "the N processes are fixed (no elastic Horovod) and a failure stops them all; for fault tolerance "
    "launch the script with `tfpar launch -np N --max-restarts K` and keras.callbacks.BackupAndRestore"
)

# What each process runs: loads the payload (after the caller's script, when fn lives there), calls
# fn and writes its return value for its rank. TensorFlow-free by itself: fn imports what it needs.
_TASK_CODE = r"""
import json, os, pickle, runpy, sys, types
directory = sys.argv[1]
with open(os.path.join(directory, "payload.pkl"), "rb") as handle:
    meta = pickle.load(handle)
    sys.path[:0] = [p for p in meta["sys_path"] if p not in sys.path]
    if meta["main_path"]:
        main = types.ModuleType("__mp_main__")
        main.__dict__.update(runpy.run_path(meta["main_path"], run_name="__mp_main__"))
        sys.modules["__main__"] = sys.modules["__mp_main__"] = main
    fn, args, kwargs = pickle.load(handle)
result = fn(*args, **kwargs)
hvd = sys.modules.get("tfpar.horovod")
if hvd is not None and hvd.is_initialized():
    rank = hvd.rank()
else:
    config = json.loads(os.environ["TF_CONFIG"])
    order = [("chief", i) for i in range(len(config["cluster"].get("chief", [])))]
    order += [("worker", i) for i in range(len(config["cluster"].get("worker", [])))]
    rank = order.index((config["task"]["type"], int(config["task"]["index"])))
path = os.path.join(directory, "result-%d.pkl" % rank)
with open(path + ".tmp", "wb") as handle:
    pickle.dump(result, handle, protocol=pickle.HIGHEST_PROTOCOL)
os.replace(path + ".tmp", path)
"""


def run(
    func: Callable[..., Any],
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    np: int = 1,
    min_np: int | None = None,
    max_np: int | None = None,
    slots: int | None = None,
    reset_limit: int | None = None,
    cooldown_range: Any = None,
    hosts: str | None = None,
    hostfile: str | None = None,
    start_timeout: int | None = None,
    ssh_port: int | None = None,
    ssh_identity_file: str | None = None,
    disable_cache: bool | None = None,
    output_filename: str | None = None,
    verbose: int | None = None,
    use_gloo: bool | None = None,
    use_mpi: bool | None = None,
    mpi_args: str | None = None,
    network_interface: str | None = None,
    executable: str | None = None,
    *,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    output: TextIO | None = None,
    isolate_network: bool | None = None,
) -> list[Any]:
    """Runs ``func(*args, **kwargs)`` in `np` processes (``horovod.run``); their results by rank.

    The processes are ``tfpar.launch``'s worker tasks on this machine (TF_CONFIG on 127.0.0.1,
    output prefixed ``[worker:N]``, no orphans; loopback-only network unless
    ``isolate_network=False``). ``func`` calls ``hvd.init()`` itself, as under Horovod.

    Args:
        func: A module-level function (pickled with :mod:`pickle`, by reference): defined in a
            module or in the calling script, not a lambda, a nested function or a notebook cell.
        args: Positional arguments for `func` (picklable).
        kwargs: Keyword arguments for `func` (picklable).
        np: The number of processes (Horovod ranks), >= 1.
        hosts: horovodrun's ``-H`` (``"localhost:2"``): accepted when every host is this machine
            and the slots add up to >= `np`; other hosts raise ValueError.
        hostfile: A host file (lines ``HOST slots=N``), under the same rule as `hosts`.
        min_np, max_np, slots, reset_limit, cooldown_range: Elastic Horovod: not supported (must
            be None).
        output_filename, mpi_args: Not supported (must be None): the output is printed with a
            ``[worker:N]`` prefix; there is no mpirun.
        start_timeout, ssh_port, ssh_identity_file, disable_cache, network_interface, verbose,
            use_gloo, use_mpi: Accepted and ignored (harmless here: local processes, no ssh,
            TensorFlow's collectives instead of Gloo/MPI); a note is printed for each one set.
        executable: The Python interpreter of the processes (default ``sys.executable``).
        timeout: tfpar: seconds the whole run may take (None: no limit).
        env: tfpar: extra environment variables for the processes.
        output: tfpar: where the prefixed output goes (default ``sys.stdout``).
        isolate_network: tfpar: as in :func:`tfpar.launch` (False for processes that need the
            network).

    Returns:
        The return values of `func`, a list of `np` values ordered by rank.

    Raises:
        TypeError: If `func`, `args` or `kwargs` cannot be pickled by reference (a lambda, a
            notebook function) or an argument has the wrong type.
        ValueError: For a bad `np`, remote `hosts` or too few slots.
        NotImplementedError: For elastic arguments, `output_filename` or `mpi_args`.
        RuntimeError: If a process failed (its output is above, prefixed) or timed out.

    Example:
    >>> import tfpar.horovod as hvd
    >>> hvd.run(os.getenv, args=("TFPAR_LAUNCH_TASK",), np=2)
    ['worker:0', 'worker:1']
    """
    if isinstance(np, bool) or not isinstance(np, int) or np < 1:
        raise ValueError(f"Expected np to be an int >= 1 (the number of processes). Received: np={np!r}")
    _refuse(min_np=min_np, max_np=max_np, slots=slots, reset_limit=reset_limit, cooldown_range=cooldown_range,
            output_filename=output_filename, mpi_args=mpi_args)
    if hosts is not None and hostfile is not None:
        raise ValueError("Pass hosts or hostfile, not both (both list the hosts).")
    if hosts is not None:
        check_hosts(parse_hosts(hosts), np, "hosts")
    elif hostfile is not None:
        check_hosts(parse_hostfile(hostfile), np, "hostfile")
    kwargs = {} if kwargs is None else dict(kwargs)
    payload, main_path = _pickle(func, tuple(args), kwargs)
    out = output if output is not None else sys.stdout
    for name, value in (("start_timeout", start_timeout), ("ssh_port", ssh_port),
                        ("ssh_identity_file", ssh_identity_file), ("disable_cache", disable_cache),
                        ("network_interface", network_interface), ("use_gloo", use_gloo), ("use_mpi", use_mpi)):
        if value:
            out.write(f"[launch] note: hvd.run ignores {name}={value!r}: {_IGNORED[name]}\n")
    directory = tempfile.mkdtemp(prefix="tfpar-hvd-run-")
    try:
        with open(os.path.join(directory, "payload.pkl"), "wb") as handle:
            pickle.dump({"sys_path": [os.path.abspath(p) if p else os.getcwd() for p in sys.path],
                         "main_path": main_path}, handle)
            handle.write(payload)
        code = launch([executable or sys.executable, "-c", _TASK_CODE, directory], workers=np, timeout=timeout,
                      env=env, output=out, isolate_network=isolate_network)
        if code != 0:
            what = "timed out" if code == 124 else f"failed (exit code {code})"
            raise RuntimeError(
                f"hvd.run: the {np} processes running {_name(func)} {what}; their output is above, "
                "prefixed [worker:N]"
            )
        return [_result(directory, rank) for rank in range(np)]
    finally:
        shutil.rmtree(directory, ignore_errors=True)


_IGNORED = {
    "start_timeout": "the processes start locally at once (timeout= bounds the whole run)",
    "ssh_port": "every process runs on this machine, so nothing uses ssh",
    "ssh_identity_file": "every process runs on this machine, so nothing uses ssh",
    "disable_cache": "no ssh or network-interface checks to cache",
    "network_interface": "the processes talk over loopback (127.0.0.1)",
    "use_gloo": "tfpar.horovod runs on TensorFlow's own collectives, not on Gloo",
    "use_mpi": "tfpar.horovod runs on TensorFlow's own collectives, not on MPI",
}


def _refuse(**given: Any) -> None:
    for name, value in given.items():
        if value is None:
            continue
        if name == "output_filename":
            why = "the output of every process is printed with a [worker:N] prefix (see output=)"
        elif name == "mpi_args":
            why = "there is no mpirun to pass them to"
        else:
            why = _ELASTIC
        raise NotImplementedError(f"hvd.run({name}=...) is not supported by tfpar.horovod: {why}. Received: {name}={value!r}")


def _name(func: Any) -> str:
    return f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', repr(func))}"


def _pickle(func: Any, args: tuple, kwargs: dict) -> tuple[bytes, str | None]:
    """The pickled (func, args, kwargs), and the calling script's path when they need it."""
    if not callable(func):
        raise TypeError(f"Expected func to be a callable. Received: func={func!r}")
    hint = (
        "hvd.run pickles func, args and kwargs with the standard pickle module (no cloudpickle), "
        "which pickles functions by reference: func must be a module-level function that the "
        "processes can import, defined in a module or in the script that calls hvd.run, not a "
        "lambda, a nested function or a function defined in a notebook cell or interactive session"
    )
    try:
        payload = pickle.dumps((func, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, AttributeError, TypeError) as error:
        raise TypeError(f"{hint}. Received: func={_name(func)} ({error}). Move it into a .py module.") from None
    if b"__main__" not in payload:
        return payload, None
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not path or not os.path.isfile(path) or not path.endswith(".py"):
        raise TypeError(
            f"{hint}. Received: func={_name(func)} from __main__, which is not a script file here "
            "(a notebook or an interactive session). Move it into a .py module and import it."
        )
    return payload, os.path.abspath(path)


def _result(directory: str, rank: int) -> Any:
    path = os.path.join(directory, f"result-{rank}.pkl")
    if not os.path.exists(path):
        raise RuntimeError(
            f"hvd.run: no result from rank {rank} although every process exited 0; was hvd.shutdown() "
            "or os._exit() called before func returned?"
        )
    with open(path, "rb") as handle:
        return pickle.load(handle)
