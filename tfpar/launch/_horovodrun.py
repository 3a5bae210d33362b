"""horovodrun's flags for ``tfpar launch`` and ``tfpar.horovod.run`` (no TensorFlow).

``tfpar launch -np N [-H host:slots,...] python train.py`` starts N worker tasks on this machine,
which are Horovod ranks 0..N-1 for ``import tfpar.horovod as hvd``. ``-H`` / ``--hostfile`` are
accepted only where they can be honest: every host is this machine (``localhost``,
``127.0.0.1``, ``::1`` or this host's name) and the slots add up to at least N; any other host is
a usage error naming the alternatives (TF_CONFIG on every host, or Slurm's ``srun``), since
``tfpar launch`` starts nothing over ssh.

Every other horovodrun flag in :data:`FLAGS` is either *ignored* (harmless here: one
``tfpar launch: note:`` line says why) or *refused* (a usage error naming the supported
alternative); a flag in neither list is an unrecognized argument. Never a silent no-op.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import socket

__all__ = ["FLAGS", "HorovodrunFlag", "add_arguments", "check_hosts", "parse_hostfile", "parse_hosts", "verdicts"]

_MULTI_HOST = (
    "tfpar launch starts every task on this machine (no ssh). For several machines start the "
    "script on every host with TF_CONFIG set for it (one process per rank; Kubeflow, Vertex AI "
    "and SageMaker set it), or under Slurm with `srun python train.py` (ranks from the Slurm step)"
)
_COLLECTIVES = "tfpar.horovod runs on TensorFlow's own collectives (ring on CPU, NCCL on GPU)"
_FUSION = (
    "Horovod's tensor-fusion knob; TensorFlow's collectives pack tensors themselves (tune them "
    "with tfpar.get_strategy('multi_worker', bytes_per_pack=...))"
)
_ELASTIC = (
    "the N tasks are fixed (no elastic Horovod) and a failure stops them all; for fault "
    "tolerance use --max-restarts K (restarts all N tasks) with "
    "keras.callbacks.BackupAndRestore (training resumes from the last backup)"
)
_NO_SSH = "every task runs on this machine, so nothing uses ssh"


@dataclasses.dataclass(frozen=True)
class HorovodrunFlag:
    """One horovodrun flag: its spellings, how many values it takes, and what tfpar does."""

    flags: tuple[str, ...]
    nargs: int  # 0: a switch; 1 or 2: values
    verdict: str  # "ignored" or "refused"
    why: str
    metavar: str = "X"

    @property
    def dest(self) -> str:
        long = next((f for f in self.flags if f.startswith("--")), self.flags[0])
        return "horovodrun_" + long.lstrip("-").replace("-", "_")


#: horovodrun's flags besides -np and -H, with what tfpar does with each.
FLAGS = (
    HorovodrunFlag(("--gloo",), 0, "ignored", f"{_COLLECTIVES}, not on Gloo; no controller to choose"),
    HorovodrunFlag(("--mpi",), 0, "ignored", f"{_COLLECTIVES}, not on MPI; no controller to choose"),
    HorovodrunFlag(("-p", "--ssh-port"), 1, "ignored", _NO_SSH, "PORT"),
    HorovodrunFlag(("-i", "--ssh-identity-file"), 1, "ignored", _NO_SSH, "FILE"),
    HorovodrunFlag(("--disable-cache",), 0, "ignored", "tfpar launch runs no ssh or network-interface checks to cache"),
    HorovodrunFlag(("--start-timeout",), 1, "ignored",
                   "the tasks start locally at once; --timeout S bounds the whole run", "S"),
    HorovodrunFlag(("--network-interface", "--network-interfaces"), 1, "ignored",
                   "the tasks talk over loopback (127.0.0.1)", "NIC"),
    HorovodrunFlag(("--verbose",), 0, "ignored",
                   "tfpar launch always prints its [launch] lines and every task's output"),
    HorovodrunFlag(("--fusion-threshold-mb",), 1, "ignored", _FUSION, "MB"),
    HorovodrunFlag(("--cycle-time-ms",), 1, "ignored", _FUSION, "MS"),
    HorovodrunFlag(("--cache-capacity",), 1, "ignored", "Horovod's response cache; TensorFlow's collectives have none", "N"),
    HorovodrunFlag(("--hierarchical-allreduce",), 0, "ignored", f"{_COLLECTIVES}, which choose their own algorithm"),
    HorovodrunFlag(("--hierarchical-allgather",), 0, "ignored", f"{_COLLECTIVES}, which choose their own algorithm"),
    HorovodrunFlag(("--autotune",), 0, "ignored", f"Horovod's autotuner of the fusion knobs; {_FUSION.split('; ')[1]}"),
    HorovodrunFlag(("--log-level",), 1, "ignored",
                   "Horovod's backend log level; TensorFlow's is the TF_CPP_MIN_LOG_LEVEL variable", "LEVEL"),
    HorovodrunFlag(("--autotune-log-file",), 1, "refused",
                   "there is no autotuner, so no log to write; drop the flag", "FILE"),
    HorovodrunFlag(("--timeline-filename",), 1, "refused",
                   "Horovod's timeline is not available; profile a run with TensorBoard's profiler "
                   "(tf.profiler.experimental.start(logdir) in the script)", "FILE"),
    HorovodrunFlag(("--output-filename",), 1, "refused",
                   "tfpar launch prints every task's output prefixed with [worker:N]; redirect it, "
                   "e.g. tfpar launch -np 2 python train.py > run.log", "DIR"),
    HorovodrunFlag(("--elastic",), 0, "refused", _ELASTIC),
    HorovodrunFlag(("--min-np", "--min-num-proc"), 1, "refused", _ELASTIC, "N"),
    HorovodrunFlag(("--max-np", "--max-num-proc"), 1, "refused", _ELASTIC, "N"),
    HorovodrunFlag(("--slots-per-host",), 1, "refused", _ELASTIC, "N"),
    HorovodrunFlag(("--host-discovery-script",), 1, "refused", _ELASTIC, "SCRIPT"),
    HorovodrunFlag(("--reset-limit",), 1, "refused", _ELASTIC, "N"),
    HorovodrunFlag(("--elastic-timeout",), 1, "refused", _ELASTIC, "S"),
    HorovodrunFlag(("--mpi-args",), 1, "refused", "there is no mpirun to pass them to; drop the flag", "ARGS"),
    HorovodrunFlag(("--binding-args",), 1, "refused", "there is no mpirun to pass them to; drop the flag", "ARGS"),
    HorovodrunFlag(("--jsrun",), 0, "refused", _MULTI_HOST),
    HorovodrunFlag(("--config-file",), 1, "refused", "pass the flags on the command line instead", "FILE"),
    HorovodrunFlag(("-cb", "--check-build"), 0, "refused",
                   "tfpar doctor prints the TensorFlow build, devices and cluster instead"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds -np, -H, --hostfile and every flag of :data:`FLAGS` to ``tfpar launch``'s parser."""
    group = parser.add_argument_group(
        "horovodrun flags",
        "tfpar launch -np N [-H localhost:N] python train.py runs a Horovod script (with\n"
        "`import tfpar.horovod as hvd`) as N worker tasks, Horovod ranks 0..N-1; the command may\n"
        "follow without --. Other horovodrun flags are either ignored with a one-line note\n"
        "(harmless here) or refused with the supported alternative, as listed below.",
    )
    group.add_argument("-np", "--num-proc", type=_positive_int, default=None, metavar="N", dest="num_proc",
                       help="number of processes (Horovod ranks): N worker tasks, same as --workers N")
    group.add_argument("-H", "--hosts", default=None, metavar="HOST:SLOTS,...",
                       help="accepted when every host is this machine (localhost, 127.0.0.1, ::1 or "
                            "this host's name) with slots adding up to >= N; other hosts are "
                            "refused (tfpar launch starts no remote tasks: use TF_CONFIG on every "
                            "host, or srun under Slurm)")
    group.add_argument("-hostfile", "--hostfile", default=None, metavar="FILE",
                       help="lines `HOST slots=N`; accepted under the same rule as -H")
    for flag in FLAGS:
        kwargs: dict = {"dest": flag.dest, "default": None, "help": f"{flag.verdict}: {flag.why}"}
        if flag.nargs == 0:
            kwargs["action"] = "store_true"
        else:
            kwargs["metavar"] = flag.metavar
            if flag.nargs > 1:
                kwargs["nargs"] = flag.nargs
        group.add_argument(*flag.flags, **kwargs)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1. Received: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1. Received: {value}")
    return value


def verdicts(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(notes for the ignored flags given, errors for the refused flags given), one line each."""
    notes, errors = [], []
    for flag in FLAGS:
        value = getattr(args, flag.dest, None)
        if value is None or value is False:
            continue
        spelled = "/".join(flag.flags)
        if flag.verdict == "ignored":
            notes.append(f"horovodrun flag {spelled} is ignored: {flag.why}")
        else:
            errors.append(f"horovodrun flag {spelled} is not supported here: {flag.why}")
    return notes, errors


def parse_hosts(hosts: str) -> list[tuple[str, int]]:
    """``"host1:2,host2"`` -> ``[("host1", 2), ("host2", 1)]`` (horovodrun's -H syntax).

    Raises:
        ValueError: For an empty entry or slots that are not a positive integer.
    """
    if not isinstance(hosts, str) or not hosts.strip():
        raise ValueError(f"Expected -H/hosts as host:slots,... e.g. localhost:2. Received: {hosts!r}")
    parsed = []
    for entry in hosts.split(","):
        entry = entry.strip()
        host, slots = entry, "1"
        if entry.startswith("["):  # [::1]:2
            host, _, rest = entry[1:].partition("]")
            slots = rest[1:] if rest.startswith(":") else "1"
        elif entry.count(":") == 1:
            host, slots = entry.split(":")
        if not host or not slots.isdigit() or int(slots) < 1:
            raise ValueError(
                f"Expected -H/hosts as host:slots,... with slots >= 1, e.g. localhost:2. Received: {hosts!r}"
            )
        parsed.append((host, int(slots)))
    return parsed


def parse_hostfile(path: str) -> list[tuple[str, int]]:
    """A horovodrun host file (lines ``HOST slots=N``; blank lines and ``#`` comments skipped)."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as error:
        raise ValueError(f"Could not read the host file: {error}. Received: hostfile={path!r}") from None
    parsed = []
    for number, line in enumerate(lines, 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        slots = 1
        for word in words[1:]:
            key, _, value = word.partition("=")
            if key != "slots" or not value.isdigit() or int(value) < 1:
                raise ValueError(
                    f"Expected host file lines `HOST slots=N`. Received line {number} of {path}: {line!r}"
                )
            slots = int(value)
        parsed.append((words[0], slots))
    if not parsed:
        raise ValueError(f"The host file names no host. Received: hostfile={path!r}")
    return parsed


def _is_this_machine(host: str) -> bool:
    name = host.strip().lower()
    if name in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        pass
    own = socket.gethostname().lower()
    return name in (own, own.split(".")[0])


def check_hosts(hosts: list[tuple[str, int]], np: int, option: str = "-H") -> None:
    """Accepts hosts that are all this machine with >= `np` slots in all; else ValueError (one line)."""
    remote = [host for host, _ in hosts if not _is_this_machine(host)]
    if remote:
        raise ValueError(
            f"{option} names other hosts ({', '.join(remote)}): multi-host runs are not started by "
            f"tfpar launch. {_MULTI_HOST}. On this machine alone: -H localhost:{np}"
        )
    slots = sum(count for _, count in hosts)
    if slots < np:
        raise ValueError(
            f"{option} gives {slots} slot{'s' if slots != 1 else ''} for {np} processes: the slots "
            f"must add up to >= -np. Received: {', '.join(f'{h}:{s}' for h, s in hosts)}. Pass e.g. "
            f"-H localhost:{np}"
        )
