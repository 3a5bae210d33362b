"""The ``tfpar`` command: ``train``, ``plan``, ``launch``, ``doctor`` (also ``python -m tfpar``).

Bad arguments exit with status 2 and name the valid choices (argparse).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from collections.abc import Sequence

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


_import_tensorflow_quietly()

from tfpar import devices, job, launch, models, strategies  # noqa: E402
from tfpar.version import __version__  # noqa: E402

DEFAULT_VIRTUAL_DEVICES = 2


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, received {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, received {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, received {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, received {text!r}")
    return value


def _microbatches(text: str) -> int | str:
    return "auto" if text == "auto" else _positive_int(text)


def _data_source(text: str) -> str:
    import tensorflow as tf

    if text == "digits" or tf.io.gfile.glob(text):
        return text
    raise argparse.ArgumentTypeError(
        f"expected 'digits' or an existing image folder / TFRecord path / .npz file, received {text!r} (not found)"
    )


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
    parser.add_argument("--model", default="alexnet", choices=models.available(), metavar="MODEL",
                        help=f"one of: {', '.join(models.available())} (default: alexnet)")
    parser.add_argument("--strategy", default="auto", choices=strategies.available_strategies(), metavar="NAME",
                        help=f"one of: {', '.join(strategies.available_strategies())} (default: auto)")
    parser.add_argument("--devices", type=_positive_int, default=None,
                        help="replicas on this host: GPUs to use, or virtual CPUs to create when there "
                             f"is no GPU (default: all GPUs, or {DEFAULT_VIRTUAL_DEVICES} virtual CPUs)")
    parser.add_argument("--epochs", type=_positive_int, default=job.TrainConfig.epochs)
    parser.add_argument("--batch-size", type=_positive_int, default=job.TrainConfig.batch_size,
                        help="global batch size over all replicas (default: %(default)s)")
    parser.add_argument("--lr", type=_positive_float, default=job.TrainConfig.learning_rate,
                        help="base learning rate for one replica, scaled for the replica count "
                             "(linear for sgd, square root for adam) (default: %(default)s)")
    parser.add_argument("--optimizer", default="adam", choices=job.OPTIMIZERS)
    parser.add_argument("--width", type=_positive_float, default=job.TrainConfig.width,
                        help="channel multiplier of AlexNet/VGG (default: %(default)s)")
    parser.add_argument("--image-size", type=_positive_int, default=None,
                        help="side of the square input images (default: 64 for AlexNet, 32 otherwise)")
    parser.add_argument("--data", default="digits", type=_data_source, metavar="digits|PATH",
                        help="training data: the bundled UCI 'digits' (default), an image folder "
                             "(class sub-folders), TFRecords (x/y features) or a .npz file")
    parser.add_argument("--mixed-precision", default=None, choices=strategies.MIXED_PRECISION_POLICIES)
    parser.add_argument("--model-parallel", type=_positive_int, default=None, metavar="K",
                        help="split the model's layers over K devices (optimal FLOPs balance) "
                             "instead of data parallelism")
    parser.add_argument("--microbatches", type=_microbatches, default=1, metavar="M",
                        help="micro-batches per step of the split model: an integer or 'auto' (default: 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="report directory (default: tfpar_runs/train-<time>)")
    parser.add_argument("--min-accuracy", type=_fraction, default=None,
                        help="exit with status 1 if the test accuracy is below this")
    parser.add_argument("--quiet", action="store_true", help="one line per epoch instead of a progress bar")
    parser.set_defaults(handler=_train)


def _configure_devices(requested: int | None) -> None:
    import tensorflow as tf

    from tfpar import cluster

    if tf.config.list_physical_devices("GPU"):
        return  # real accelerators: --devices selects how many (see _strategy_options)
    if cluster.detect() is not None and requested is None:
        return  # a worker of a cluster (tfpar launch, Slurm): one replica per worker process
    devices.configure_virtual_devices(requested or DEFAULT_VIRTUAL_DEVICES, "CPU")


_DEVICE_STRATEGIES = ("auto", "mirrored", "central_storage")


def _usage_error(message: str) -> int:
    print(f"tfpar train: error: {message}", file=sys.stderr)
    return 2


def _check_train_arguments(args: argparse.Namespace) -> str | None:
    """Combinations argparse cannot check; returns the error message, or None."""
    if args.model_parallel and args.strategy not in ("auto", "default"):
        return (
            "--model-parallel splits one model replica over devices and runs under the 'default' "
            f"strategy; it cannot be combined with --strategy {args.strategy} (valid: auto, default)"
        )
    if args.microbatches != 1 and not args.model_parallel:
        return "--microbatches applies to a split model: add --model-parallel K"
    if args.devices is not None and not args.model_parallel and args.strategy not in _DEVICE_STRATEGIES:
        return (
            f"--devices sets the replicas of a one-host strategy ({', '.join(_DEVICE_STRATEGIES)}); "
            f"--strategy {args.strategy} does not take it"
        )
    return None


def _strategy_options(args: argparse.Namespace) -> dict[str, object]:
    if args.model_parallel or args.devices is None or args.strategy not in _DEVICE_STRATEGIES:
        return {}
    available = devices.default_replica_devices()
    if args.devices > len(available):
        raise ValueError(
            f"--devices {args.devices}, but this host has {len(available)} devices: {', '.join(available)}"
        )
    return {"devices": available[: args.devices]}


def _train(args: argparse.Namespace) -> int:
    problem = _check_train_arguments(args)
    if problem:
        return _usage_error(problem)
    _configure_devices(args.devices or args.model_parallel)
    try:
        options = _strategy_options(args)
    except ValueError as error:
        return _usage_error(str(error))
    config = job.TrainConfig(
        model=args.model,
        strategy=args.strategy,
        strategy_options=options,
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
    )
    result = job.train(config)
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
                if result.report_dir
                else "report          written by the chief",
            ]
        )
    )
    if args.min_accuracy is not None and result.test_accuracy < args.min_accuracy:
        print(f"tfpar train: test accuracy {result.test_accuracy:.4f} is below --min-accuracy {args.min_accuracy}")
        return 1
    return 0


def _memory(text: str) -> float:
    units = {"kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "b": 1.0}
    lowered = text.strip().lower()
    for unit, scale in units.items():
        if lowered.endswith(unit):
            try:
                return float(lowered[: -len(unit)]) * scale
            except ValueError:
                break
    raise argparse.ArgumentTypeError(f"expected a size such as 16GB or 512MB, received {text!r}")


def _add_plan(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="print the optimal model-parallel placement of a model over N devices",
        description="Plan a split of MODEL's layers over N devices and print the stage table "
        "(devices need not exist here: this plans for the target machine).",
    )
    parser.add_argument("model", choices=models.available(), metavar="MODEL",
                        help=f"one of: {', '.join(models.available())}")
    parser.add_argument("--devices", type=_positive_int, required=True, help="number of devices (stages)")
    parser.add_argument("--balance", default="flops", choices=["flops", "params", "memory", "time"])
    parser.add_argument("--microbatches", type=_microbatches, default=1, metavar="M",
                        help="micro-batches per step: an integer or 'auto' (GPipe's m >= 4p)")
    parser.add_argument("--batch-size", type=_positive_int, default=32)
    parser.add_argument("--memory-limit", type=_memory, default=None, metavar="SIZE",
                        help="memory of each device, e.g. 16GB (the plan says which stage overflows)")
    parser.add_argument("--input-shape", type=_positive_int, nargs=3, default=None, metavar=("H", "W", "C"),
                        help="model input shape (default: the model's own, e.g. 224 224 3)")
    parser.set_defaults(handler=_plan)


def _plan(args: argparse.Namespace) -> int:
    from tfpar import parallel

    options = {} if args.input_shape is None else {"input_shape": tuple(args.input_shape)}
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
        print(f"tfpar plan: error: {error}", file=sys.stderr)
        # An infeasible memory limit is a result (1); anything else is a bad argument (2).
        return 1 if "memory_limits" in str(error) else 2
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
    from tfpar import doctor

    report = doctor.collect()
    print(doctor.format_report(report))
    return 1 if report.problems else 0


def build_parser() -> argparse.ArgumentParser:
    """The ``tfpar`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="tfpar", description="One-line, correct data and model parallelism for TensorFlow / Keras 3."
    )
    parser.add_argument("--version", action="version", version=f"tfpar {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    _add_train(subparsers)
    _add_plan(subparsers)
    _add_launch(subparsers)
    _add_doctor(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tfpar`` console script.

    Example:
    >>> tfpar.cli.main(["train", "--epochs", "1"])
    0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["launch"]:  # everything after `launch` belongs to the launcher's own parser
        return launch.main(argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
