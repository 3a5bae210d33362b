"""The ``tfpar launch`` command line: its parser and :func:`main` (no TensorFlow)."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence

from tfpar.launch import _horovodrun
from tfpar.launch._api import launch
from tfpar.launch._network import NETWORK_MODES

__all__ = ["build_parser", "main"]


def _int_at_least(minimum: int) -> Callable[[str], int]:
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
        usage=(
            "%(prog)s [-h] [--workers N] [--ps M] [--chief] [--max-restarts K] [--timeout S]\n"
            "       [--grace-period S] [--network {auto,isolated,host}] [--isolate-network]\n"
            "       [-np N] [-H HOST:SLOTS,...] [horovodrun flags] [--] COMMAND ..."
        ),
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
            "  tfpar launch -np 2 python train.py     # horovodrun style: a Horovod script with\n"
            "      `import tfpar.horovod as hvd` as 2 workers (ranks 0, 1); -- is optional\n"
            "\n"
            "Tasks die within seconds of the launcher, however it ends (even SIGKILL): each runs\n"
            "under a small guard process that stops it (SIGTERM, --grace-period, SIGKILL)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workers", type=_int_at_least(1), default=2, metavar="N", action=_StoreGiven,
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
    parser.add_argument("--network", choices=NETWORK_MODES, default=None,
                        help="auto (default): run the tasks in a private loopback-only network "
                             "namespace where the kernel allows it (Linux), else on the host "
                             "network with a warning; isolated: the private namespace or fail; "
                             "host: the host network, for tasks that need it (downloads, remote "
                             "storage), where TensorFlow's unauthenticated servers are reachable "
                             "from other hosts")
    parser.add_argument("--isolate-network", action="store_true",
                        help="same as --network isolated (kept for compatibility)")
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
                        help="the program every COMMAND task runs, after -- (or, as with "
                             "horovodrun, right after the options)")
    _horovodrun.add_arguments(parser)
    return parser


class _StoreGiven(argparse.Action):
    """Stores the value and records that the option was given (``--workers`` beside ``-np``)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_given", True)


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
    try:
        args, command, network = _parse(argv)
    except SystemExit as exit_:
        return int(exit_.code) if isinstance(exit_.code, int) else 2
    for note in args.notes:
        print(f"tfpar launch: note: {note}", file=sys.stderr)
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


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str], str]:
    """(options, COMMAND, network mode) from the arguments after ``launch``.

    Raises:
        SystemExit: For bad arguments, after argparse printed the usage and one error line.
    """
    parser = build_parser()
    if "--" in argv:
        split = argv.index("--")
        options, command = argv[:split], argv[split + 1 :]
    else:
        options, command = argv, None
    args = parser.parse_args(options)
    if command is None:
        command = args.command
    elif args.command:
        parser.error(
            f"unrecognized arguments before --: {' '.join(args.command)} (the command goes either "
            "after -- or, without --, last: everything after it is its own arguments)"
        )
    if not command:
        parser.error("expected a COMMAND after --, e.g. tfpar launch --workers 2 -- python train.py")
    if args.isolate_network and args.network not in (None, "isolated"):
        parser.error(f"--isolate-network contradicts --network {args.network}; pass one of them")
    network = "isolated" if args.isolate_network else (args.network or "auto")
    args.notes = _horovodrun_flags(parser, args)
    return args, command, network


def _horovodrun_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """Applies -np, -H and --hostfile to `args` (-np N: N workers); refuses what cannot be
    honoured with one ``error:`` line (SystemExit 2); returns the notes for ignored flags."""
    notes, errors = _horovodrun.verdicts(args)
    if errors:
        parser.error(errors[0])
    hosts_given = args.hosts is not None or args.hostfile is not None
    if args.num_proc is None:
        if hosts_given:
            parser.error("-H/--hostfile needs -np N (the number of processes), e.g. -np 2 -H localhost:2")
        return notes
    if getattr(args, "workers_given", False) and args.workers != args.num_proc:
        parser.error(
            f"-np {args.num_proc} contradicts --workers {args.workers}: both give the number of "
            "worker tasks; pass one of them"
        )
    if args.ps or args.chief:
        parser.error(
            "-np N starts N worker tasks (Horovod ranks 0..N-1) and takes no --ps/--chief; for "
            "parameter-server training or a chief task use --workers N with --ps M / --chief"
        )
    if args.hosts is not None and args.hostfile is not None:
        parser.error("-H and --hostfile both list the hosts; pass one of them")
    try:
        if args.hosts is not None:
            _horovodrun.check_hosts(_horovodrun.parse_hosts(args.hosts), args.num_proc, "-H")
        elif args.hostfile is not None:
            _horovodrun.check_hosts(_horovodrun.parse_hostfile(args.hostfile), args.num_proc, "--hostfile")
    except ValueError as error:
        parser.error(str(error))
    args.workers = args.num_proc
    return notes
