"""The ``tfpar`` command: ``train``, ``plan``, ``launch``, ``doctor`` (also ``python -m tfpar``).

Exit status: 0 on success; 1 for a result below a bar the user set (``--min-accuracy``, a plan
that does not fit ``--memory-limit``, problems found by ``doctor``) and for a crash; 2 for a
usage error. A usage error is reported the way argparse reports a bad argument: one line on
stderr, ``tfpar <command>: error: <message>``, where the message names the value received, what
is valid and the fix, and never a traceback (``--debug`` adds it).

How a usage error is told from a bug. Catching every ValueError would hide bugs (TensorFlow and
Keras raise ValueError for their own failures too), so the rule is *where* an error is raised,
not only its type. Every handler runs in two phases:

1. **Resolve**: the parsed arguments become validated objects (``tfpar.job.TrainConfig``, the
   data source, the cluster from ``TF_CONFIG``, the model's input shape, the plan's options).
   This phase only runs tfpar's validation of the user's input: it builds no model, reads no
   data and has no TensorFlow side effect (devices are configured after it). Inside it, and only
   inside it (``_user_input()``), ValueError, TypeError and FileNotFoundError are usage errors.
2. **Run**: the work itself. An exception here is a bug or a failure of the environment and
   keeps its traceback (exit 1), with one exception by design: :class:`tfpar.job.InputError`,
   which ``tfpar.job.train`` raises for user input that can only be judged once it is read or
   built (a training image that does not decode, named; more ``--model-parallel`` devices than
   the model has layers). ``tfpar plan`` likewise treats the planner's refusals of its
   arguments (``tfpar.parallel.plan`` checks them before planning) as usage errors, and its
   "no split fits the memory limit" verdict as a result (exit 1).

Both phases raise :class:`UsageError`; :func:`main` prints it and returns 2.

Parsing loads no TensorFlow, so ``tfpar --version``, ``--help`` and argparse's usage errors answer
at once: the choices come from ``tfpar._names`` and the defaults from ``tfpar._train_config``, and
the handlers that need TensorFlow (``train``, ``plan``, ``doctor``) import it first thing, with
its start-up banner filtered. Two argument types need tfpar modules that import TensorFlow
(``--data``: the data readers; ``--memory-limit``: the cost model); :func:`main` runs them right
after parsing and reports a bad value exactly as argparse would (the usage, then ``tfpar train:
error: argument --data: ...``). ``tfpar launch`` never loads TensorFlow.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import re
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from tfpar import _names, cluster, launch  # none of them imports TensorFlow
from tfpar._train_config import OPTIMIZERS, TrainConfig
from tfpar.version import __version__

# TensorFlow's start-up banner (oneDNN, CUDA stubs) is not for command-line users; they can set
# TF_CPP_MIN_LOG_LEVEL themselves to see it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

_BANNER = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog|I0000 .*(oneDNN custom operations|"
    r"cudart_stub|cpu_feature_guard)|To enable the following instructions)"
)


def _import_tensorflow_quietly() -> None:
    """Imports TensorFlow with its C++ banner filtered (TF 2.21 prints it before absl logging is
    configured, so TF_CPP_MIN_LOG_LEVEL cannot hide it); anything else it prints is replayed."""
    if "tensorflow" in sys.modules or os.environ.get("TF_CPP_MIN_LOG_LEVEL") not in ("2", "3"):
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import keras  # noqa: F401
            import tensorflow  # noqa: F401
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines():
                if line and not _BANNER.match(line):
                    print(line, file=sys.stderr)

DEFAULT_VIRTUAL_DEVICES = 2
_MAX_SEED = 2**32 - 1


class UsageError(Exception):
    """A bad argument found after parsing; :func:`main` prints it as one line and returns 2.

    Example:
    >>> tfpar.cli.main(["train", "--image-size", "8"])
    2
    """


@contextlib.contextmanager
def _user_input() -> Iterator[None]:
    """The resolve phase: tfpar's validation of the user's arguments (see the module docstring).

    ValueError, TypeError and FileNotFoundError raised inside become a :class:`UsageError`.
    """
    try:
        yield
    except UsageError:
        raise
    except (ValueError, TypeError, FileNotFoundError) as error:
        raise UsageError(_one_line(error)) from error


def _one_line(error: BaseException | str) -> str:
    """A message on one line: its lines joined, a caret line (under a JSON snippet) dropped."""
    lines = (line.strip() for line in str(error).splitlines())
    return " ".join(line for line in lines if line and set(line) != {"^"})


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, received {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, received {text!r}")
    return value


def _positive_float(text: str) -> float:
    """A finite number > 0 (``float()`` also parses "nan" and "inf", which are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, received {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite positive number, received {text!r}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, received {text!r}") from None
    if not 0 <= value <= _MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected a seed from 0 to {_MAX_SEED}, received {text!r}")
    return value


def _microbatches(text: str) -> int | str:
    return "auto" if text == "auto" else _positive_int(text)


def _data_source(text: str) -> str:
    """``--data``: 'digits', or a path with a layout tfpar reads (a late type: see :func:`main`)."""
    if text == "digits":
        return text
    _import_tensorflow_quietly()
    import tensorflow as tf

    from tfpar.data import readers

    if not tf.io.gfile.glob(text):
        raise argparse.ArgumentTypeError(
            f"expected 'digits' or an existing image folder / TFRecord path / .npz file, received {text!r} (not found)"
        )
    try:
        readers.source_kind(text)  # the layout: class sub-folders with images, TFRecords, .npz
    except ValueError as error:
        raise argparse.ArgumentTypeError(_one_line(error)) from None
    return text


def _fraction(text: str) -> float:
    value = _positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], received {text!r}")
    return value


def _add_train(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model in parallel on bundled real data and report accuracy",
        description=(
            "Train an image classifier under a tfpar strategy. Without arguments: AlexNet "
            "(width 0.25) on the bundled UCI digits under strategy 'auto', on virtual CPUs when "
            "there is no GPU; prints strategy, replicas, samples/s and test accuracy, and writes "
            "metrics.json and training.png."
        ),
    )
    parser.add_argument("--model", default="alexnet", choices=_names.MODELS, metavar="MODEL",
                        help=f"one of: {', '.join(_names.MODELS)} (default: alexnet)")
    parser.add_argument("--strategy", default="auto", choices=_names.STRATEGIES, metavar="NAME",
                        help=f"one of: {', '.join(_names.STRATEGIES)} (default: auto)")
    parser.add_argument("--devices", type=_positive_int, default=None,
                        help="replicas on this host: GPUs to use, or virtual CPUs to create when there "
                             f"is no GPU (at most {_names.MAX_VIRTUAL_DEVICES}; default: all GPUs, or "
                             f"{DEFAULT_VIRTUAL_DEVICES} virtual CPUs)")
    parser.add_argument("--epochs", type=_positive_int, default=TrainConfig.epochs)
    parser.add_argument("--batch-size", type=_positive_int, default=TrainConfig.batch_size,
                        help="global batch size over all replicas (default: %(default)s)")
    parser.add_argument("--lr", type=_positive_float, default=TrainConfig.learning_rate,
                        help="base learning rate for one replica, scaled for the replica count "
                             "(linear for sgd, square root for adam) (default: %(default)s)")
    parser.add_argument("--optimizer", default="adam", choices=OPTIMIZERS)
    parser.add_argument("--width", type=_positive_float, default=TrainConfig.width,
                        help="channel multiplier of AlexNet/VGG (default: %(default)s)")
    parser.add_argument("--image-size", type=_positive_int, default=None,
                        help="side of the square input images, at least the model's minimum (AlexNet "
                             "55, VGG and ResNet 32) (default: 64 for AlexNet, 32 otherwise)")
    parser.add_argument("--data", default="digits", metavar="digits|PATH",
                        help="training data: the bundled UCI 'digits' (default), an image folder "
                             "(class sub-folders), TFRecords (x/y features) or a .npz file")
    parser.add_argument("--on-error", default="raise", choices=("raise", "skip"),
                        help="an image in --data that does not decode: stop and name it (raise, the "
                             "default), or leave such files out with a count (skip)")
    parser.add_argument("--mixed-precision", default=None, choices=_names.MIXED_PRECISION_POLICIES)
    parser.add_argument("--model-parallel", type=_positive_int, default=None, metavar="K",
                        help="split the model's layers over K devices (optimal FLOPs balance) "
                             "instead of data parallelism")
    parser.add_argument("--microbatches", type=_microbatches, default=1, metavar="M",
                        help="micro-batches per step of the split model: an integer or 'auto' (default: 1)")
    parser.add_argument("--seed", type=_seed, default=0, help="seed from 0 to 2**32 - 1 (default: 0)")
    parser.add_argument("--output", default=None, help="report directory (default: tfpar_runs/train-<time>)")
    parser.add_argument("--min-accuracy", type=_fraction, default=None,
                        help="exit with status 1 if the test accuracy is below this")
    parser.add_argument("--steps-per-execution", type=_positive_int, default=1, metavar="N",
                        help="training steps per call of the compiled step function (default: 1)")
    parser.add_argument("--profile", action="store_true",
                        help="profile a window of steps after warm-up and report where the step time goes "
                             "(input, compute, communication, idle, other; per task of a cluster): a table, "
                             "step_breakdown in metrics.json, trace.json (Perfetto), step_breakdown.png and "
                             "TensorFlow's trace in profile/ (TensorBoard)")
    parser.add_argument("--tune", action="store_true",
                        help="measure a few settings first (batch size, steps per execution, gradient "
                             "accumulation under multi_worker) and train with the fastest; the learning "
                             "rate follows the batch size")
    parser.add_argument("--tune-budget", type=_positive_float, default=None, metavar="SECONDS",
                        help="seconds the tuning may take (default: tfpar.tuning's default)")
    parser.add_argument("--quiet", action="store_true", help="one line per epoch instead of a progress bar")
    parser.set_defaults(handler=_train, command_parser=parser, late_types=(("--data", "data", _data_source),))


def _configure_devices(requested: int | None) -> None:
    import tensorflow as tf

    from tfpar import devices

    if tf.config.list_physical_devices("GPU"):
        return  # real accelerators: --devices selects how many (see _strategy_options)
    if cluster.detect() is not None and requested is None:
        return  # a worker of a cluster (tfpar launch, Slurm): one replica per worker process
    devices.configure_virtual_devices(requested or DEFAULT_VIRTUAL_DEVICES, "CPU")


_DEVICE_STRATEGIES = ("auto", "mirrored", "central_storage")


def _check_train_arguments(args: argparse.Namespace) -> str | None:
    """Combinations argparse cannot check; returns the error message, or None."""
    if args.model_parallel and args.strategy not in ("auto", "default"):
        return (
            "--model-parallel splits one model replica over devices and runs under the 'default' "
            f"strategy; it cannot be combined with --strategy {args.strategy} (valid: auto, default)"
        )
    if args.tune and args.strategy in ("parameter_server", "ps"):
        return (
            "--tune measures settings with short synchronous fits; it does not run under --strategy "
            f"{args.strategy} (asynchronous workers). Tune under --strategy mirrored and pass its --batch-size"
        )
    if args.tune_budget is not None and not args.tune:
        return "--tune-budget limits the tuning: add --tune"
    if args.microbatches != 1 and not args.model_parallel:
        return "--microbatches applies to a split model: add --model-parallel K"
    if args.devices is not None and not args.model_parallel and args.strategy not in _DEVICE_STRATEGIES:
        return (
            f"--devices sets the replicas of a one-host strategy ({', '.join(_DEVICE_STRATEGIES)}); "
            f"--strategy {args.strategy} does not take it"
        )
    return None


def _check_device_count(args: argparse.Namespace) -> None:
    """Refuses more virtual CPUs than :data:`tfpar.devices.MAX_VIRTUAL_DEVICES`, before any are made."""
    import tensorflow as tf

    from tfpar import devices

    if tf.config.list_physical_devices("GPU"):
        return  # GPUs: --devices is checked against the GPUs found (see _strategy_options)
    for flag, value in (("--devices", args.devices), ("--model-parallel", args.model_parallel)):
        if value is not None and value > devices.MAX_VIRTUAL_DEVICES:
            raise UsageError(
                f"{flag} {value}: this host has no GPU, so that many virtual CPU devices would be "
                f"created; at most {devices.MAX_VIRTUAL_DEVICES} are allowed (every one is a replica "
                "that copies the model and traces the training step: 8 take about 40 s for the "
                "first step on 2 cores). Use 2-8 to test data parallelism."
            )


def _check_output(path: str | None) -> None:
    """Refuses a report directory that cannot be created, before training rather than after."""
    if path is None:
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--output {path!r} is a file; expected a directory (new or existing)")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--output {path!r} cannot be created: {parent!r} is not a writable directory")


def _strategy_options(args: argparse.Namespace) -> dict[str, object]:
    if args.model_parallel or args.devices is None or args.strategy not in _DEVICE_STRATEGIES:
        return {}
    from tfpar import devices

    available = devices.default_replica_devices()
    if args.devices > len(available):
        raise ValueError(
            f"--devices {args.devices}, but this host has {len(available)} devices: {', '.join(available)}"
        )
    return {"devices": available[: args.devices]}


def _train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        model=args.model,
        strategy=args.strategy,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        optimizer=args.optimizer,
        data=args.data,
        image_size=args.image_size,
        width=args.width,
        mixed_precision=args.mixed_precision,
        model_parallel=args.model_parallel,
        microbatches=args.microbatches,
        seed=args.seed,
        output_dir=args.output,
        verbose=2 if args.quiet or not sys.stdout.isatty() else 1,
        on_error=args.on_error,
        steps_per_execution=args.steps_per_execution,
        profile=args.profile,
        tune=args.tune,
        tune_budget=args.tune_budget,
    )


def _check_cluster() -> None:
    """The cluster this process belongs to: a malformed TF_CONFIG or Slurm step is the user's to fix.

    detect() raises ValueError for malformed values, and RuntimeError (its only one) for a
    multi-task Slurm step without the variables srun sets: both are usage errors.
    """
    try:
        cluster.detect()
    except RuntimeError as error:
        raise UsageError(_one_line(error)) from error


def _train(args: argparse.Namespace) -> int:
    _import_tensorflow_quietly()
    from tfpar import job

    with _user_input():  # resolve: validation only, nothing built, no TensorFlow side effect
        problem = _check_train_arguments(args)
        if problem:
            raise UsageError(problem)
        config = _train_config(args)
        _check_cluster()
        _check_device_count(args)
        _check_output(args.output)
    _configure_devices(args.devices or args.model_parallel)
    with _user_input():
        config = dataclasses.replace(config, strategy_options=_strategy_options(args))
    try:
        result = job.train(config)
    except job.InputError as error:  # user input judged once read or built (see the docstring)
        raise UsageError(_one_line(error)) from error
    print(
        "\n".join(
            [
                "",
                "== tfpar train: summary ==",
                f"strategy        {result.strategy} (--strategy {args.strategy})",
                f"replicas        {result.replicas}"
                + (f" (model split over {args.model_parallel} devices)" if args.model_parallel else ""),
                f"samples/s       {result.samples_per_second:,.0f} (last epoch)",
                f"test accuracy   {result.test_accuracy:.4f}",
                f"test loss       {result.test_loss:.4f}",
                f"report          {result.report_dir}/metrics.json, {result.report_dir}/training.png"
                + (", trace.json, step_breakdown.png" if result.step_breakdown else "")
                + (", tuning.png" if result.tuning else "")
                if result.report_dir
                else "report          written by the chief",
            ]
            + _tuned_lines(result)
        )
    )
    if args.min_accuracy is not None and result.test_accuracy < args.min_accuracy:
        print(f"tfpar train: test accuracy {result.test_accuracy:.4f} is below --min-accuracy {args.min_accuracy}")
        return 1
    return 0


def _tuned_lines(result: Any) -> list[str]:
    """Summary lines of --profile and --tune."""
    lines = []
    if result.tuning:
        chosen = ", ".join(f"{key} {value}" for key, value in result.tuning["chosen"].items())
        lines.append(f"tuned           {chosen} (of {len(result.tuning['candidates'])} measured)")
    if result.step_breakdown:
        shares = result.step_breakdown["shares"]
        parts = ", ".join(f"{part} {100 * share:.0f}%" for part, share in shares.items())
        lines.append(f"step            {result.step_breakdown['step_ms']:.1f} ms: {parts}")
    return lines


def _memory(text: str) -> float:
    """``--memory-limit``: a size such as 16GB (a late type: see :func:`main`)."""
    _import_tensorflow_quietly()
    from tfpar.parallel import cost

    try:
        value = cost.parse_bytes(text, name="--memory-limit")
    except ValueError:
        value = None
    if value is None or value <= 0:
        raise argparse.ArgumentTypeError(
            f"expected a size such as 16GB or 512MB (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), "
            f"received {text!r}"
        )
    return value


def _add_plan(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="print the optimal model-parallel placement of a model over N devices",
        description="Plan a split of MODEL's layers over N devices and print the stage table "
        "(devices need not exist here: this plans for the target machine).",
    )
    parser.add_argument("model", choices=_names.MODELS, metavar="MODEL",
                        help=f"one of: {', '.join(_names.MODELS)}")
    parser.add_argument("--devices", type=_positive_int, required=True, help="number of devices (stages)")
    parser.add_argument("--balance", default="flops", choices=["flops", "params", "memory", "time"])
    parser.add_argument("--microbatches", type=_microbatches, default=1, metavar="M",
                        help="micro-batches per step: an integer or 'auto' (GPipe's m >= 4p)")
    parser.add_argument("--batch-size", type=_positive_int, default=32)
    parser.add_argument("--memory-limit", default=None, metavar="SIZE",
                        help="memory of each device, e.g. 16GB (the plan says which stage overflows)")
    parser.add_argument("--input-shape", type=_positive_int, nargs=3, default=None, metavar=("H", "W", "C"),
                        help="model input shape (default: the model's own, e.g. 224 224 3)")
    parser.set_defaults(handler=_plan, command_parser=parser, late_types=(("--memory-limit", "memory_limit", _memory),))


def _plan(args: argparse.Namespace) -> int:
    _import_tensorflow_quietly()
    from tfpar import models, parallel

    with _user_input():  # resolve: the input shape is checked for the model before building it
        options = {}
        if args.input_shape is not None:
            options["input_shape"] = models.check_input_shape(args.model, tuple(args.input_shape))
    model = models.get(args.model, **options)
    limits = None if args.memory_limit is None else [args.memory_limit] * args.devices
    try:
        plan = parallel.plan(
            model,
            args.devices,
            balance=args.balance,
            microbatches=args.microbatches,
            batch_size=args.batch_size,
            memory_limits=limits,
            check_devices=False,
        )
    except ValueError as error:
        if isinstance(error, parallel.planner.MemoryLimitError):
            # A result, not a usage error: the table of what overflows by how much (exit 1).
            print(f"tfpar plan: error: {error}", file=sys.stderr)
            return 1
        raise UsageError(_one_line(error)) from error  # the planner's checks of its arguments
    print(plan.summary())
    return 0


def _add_launch(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "launch",
        help="run a command as a local multi-worker (or parameter-server) cluster",
        description="Run COMMAND as N local tasks with TF_CONFIG on free 127.0.0.1 ports.",
        add_help=False,
    )
    parser.add_argument("launch_args", nargs=argparse.REMAINDER)
    parser.set_defaults(handler=lambda args: launch.main(args.launch_args))


def _add_doctor(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("doctor", help="print versions, devices, cluster and known problems")
    parser.set_defaults(handler=_doctor)


def _doctor(args: argparse.Namespace) -> int:
    _import_tensorflow_quietly()
    from tfpar import doctor

    report = doctor.collect()
    print(doctor.format_report(report))
    return 1 if report.problems else 0


def _add_debug(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("--debug", action="store_true", default=default,
                        help="show the traceback of a usage error too")


def build_parser() -> argparse.ArgumentParser:
    """The ``tfpar`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="tfpar", description="One-line, correct data and model parallelism for TensorFlow / Keras 3."
    )
    parser.add_argument("--version", action="version", version=f"tfpar {__version__}")
    _add_debug(parser, False)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    _add_train(subparsers)
    _add_plan(subparsers)
    _add_launch(subparsers)
    _add_doctor(subparsers)
    for name in ("train", "plan", "doctor"):  # `tfpar train ... --debug` works too
        _add_debug(subparsers.choices[name], argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tfpar`` console script.

    Returns:
        The exit status: 0 success, 1 a result below the user's bar or a crash, 2 a usage error
        (printed as one line, ``tfpar <command>: error: ...``; ``--debug`` adds the traceback).
        argparse's own errors exit 2 through ``SystemExit``.

    Example:
    >>> tfpar.cli.main(["train", "--epochs", "1"])
    0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["launch"]:  # everything after `launch` belongs to the launcher's own parser
        return launch.main(argv[1:])
    args = build_parser().parse_args(argv)
    _convert_late_types(args)
    try:
        return int(args.handler(args) or 0)
    except UsageError as error:
        if args.debug:
            traceback.print_exception(error)
        print(f"tfpar {args.command}: error: {error}", file=sys.stderr)
        return 2


def _convert_late_types(args: argparse.Namespace) -> None:
    """Runs the argument types that need TensorFlow, right after parsing (see the module docstring).

    A bad value is reported as argparse reports one: the command's usage, then ``tfpar <command>:
    error: argument <flag>: <message>``, exit status 2.
    """
    late_types: Sequence[tuple[str, str, Callable[[str], object]]] = getattr(args, "late_types", ())
    for flag, dest, convert in late_types:
        value = getattr(args, dest)
        if value is None:
            continue
        try:
            setattr(args, dest, convert(value))
        except argparse.ArgumentTypeError as error:
            args.command_parser.error(f"argument {flag}: {error}")


if __name__ == "__main__":
    sys.exit(main())
