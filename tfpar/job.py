"""The main job: train an image classifier in parallel and report accuracy and throughput.

``tfpar train`` is a thin command-line layer over :func:`train`; notebooks can call it directly.
With no arguments it trains AlexNet (width 0.25, 64x64 inputs) on the bundled UCI digits (1,797
real handwritten digits, no download) under ``tfpar.scope("auto")``, evaluates on a held-out split
and writes a report (``metrics.json`` and a loss/accuracy plot).

:class:`TrainConfig` lives in ``tfpar._train_config`` (no TensorFlow import, so the command line
can read its defaults before TensorFlow loads) and is public here.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import platform
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tfpar import cluster, datasets, models, strategies, training
from tfpar._train_config import OPTIMIZERS, TrainConfig  # noqa: F401  (public here: tfpar.job.*)
from tfpar.version import __version__

# Image side used for each model family when the data is smaller (the digits are 8x8).
_MIN_SIDE = {"alexnet": 64, "vgg": 32, "resnet": 32}
# From this many replicas on, train() says what it is doing before the slow steps (building the
# replicated model, tracing the step once per replica), so a long start is not silent.
_MANY_REPLICAS = 8


class InputError(ValueError):
    """The user's input cannot be trained on, found only once :func:`train` reads or builds it.

    :class:`TrainConfig` checks every option when it is made, before TensorFlow does anything.
    What it cannot check without doing the work raises this: training data whose files do not
    read or decode (the message names the file), or a model split the model does not allow
    (more ``model_parallel`` devices than layers). A ``ValueError``, so ``except ValueError``
    still catches it; ``tfpar train`` reports it as a usage error (exit status 2).

    Example:
    >>> try:
    ...     tfpar.job.train(tfpar.job.TrainConfig(data="/data/with-a-corrupt-jpeg"))
    ... except tfpar.job.InputError as error:
    ...     print(error)
    Cannot read the training data '/data/with-a-corrupt-jpeg': ...
    """


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What :func:`train` measured.

    Attributes:
        strategy: Class name of the strategy used.
        replicas: Number of replicas in sync.
        test_accuracy: Accuracy on the held-out split.
        test_loss: Loss on the held-out split.
        samples_per_second: Training throughput of the last epoch.
        history: Keras history (per-epoch metrics).
        report_dir: Directory holding ``metrics.json`` and ``training.png`` (None if not written).
        step_breakdown: With ``config.profile``: ``metrics.json``'s ``"step_breakdown"``.
        tuning: With ``config.tune``: ``metrics.json``'s ``"tuning"`` (candidates and choice).
        config: The configuration trained with: the tuned settings when ``config.tune``.
    """

    strategy: str
    replicas: int
    test_accuracy: float
    test_loss: float
    samples_per_second: float
    history: dict[str, list[float]]
    report_dir: Path | None
    step_breakdown: dict[str, Any] | None = None
    tuning: dict[str, Any] | None = None
    config: TrainConfig | None = None


def _read_path(path: str, side: int, on_error: str = "raise") -> tuple[np.ndarray, np.ndarray]:
    from tfpar import data

    folder = tf.io.gfile.isdir(path) and _has_subfolders(path)
    options = {"image_size": (side, side), "on_error": on_error} if folder else {}
    dataset = data.read(path, **options)
    spec = dataset.element_spec
    if isinstance(spec, dict):
        if not {"x", "y"} <= set(spec):
            raise ValueError(
                f"Expected TFRecords with features 'x' (image) and 'y' (label), as "
                f"tfpar.data.write_tfrecords({{'x': images, 'y': labels}}, ...) writes. "
                f"Received: features {sorted(spec)} in data={path!r}"
            )
        dataset = dataset.map(lambda example: (example["x"], example["y"]))
    elif not (isinstance(spec, tuple) and len(spec) == 2):
        raise ValueError(
            "Expected (image, label) pairs: a .npz with arrays 'x' and 'y', TFRecords with "
            f"features 'x' and 'y', or an image folder. Received: elements {spec} in data={path!r}"
        )
    images, labels = [], []
    for image, label in dataset.as_numpy_iterator():
        images.append(image)
        labels.append(label)
    if not images:
        raise ValueError(f"Expected at least one example in data={path!r}. Received: an empty dataset")
    x = np.stack(images).astype("float32")
    if x.ndim == 3:
        x = x[..., None]
    scale = 255.0 if x.max() > 1.0 else 1.0
    return x / scale, np.asarray(labels).astype("int64").reshape(-1)


def _has_subfolders(path: str) -> bool:
    return any(tf.io.gfile.isdir(f"{path}/{name}") for name in tf.io.gfile.listdir(path))


def load_data(config: TrainConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Returns ``(x_train, y_train, x_test, y_test)`` as float32 images in [0, 1] and int labels.

    Raises:
        InputError: If the data cannot be read: a file that does not decode or parse (the
            message names it), or elements that are not (image, label) pairs.
    """
    side = config.image_size or _MIN_SIDE[_family(config.model)]
    if config.data == "digits":
        images, labels = datasets.load_digits()
        images = images / 16.0
    else:
        try:
            images, labels = _read_path(config.data, side, config.on_error)
        except (ValueError, tf.errors.InvalidArgumentError, tf.errors.DataLossError,
                tf.errors.NotFoundError, tf.errors.PermissionDeniedError) as error:
            raise InputError(f"Cannot read the training data {config.data!r}: {_reason(error)}") from error
    order = np.random.default_rng(config.seed).permutation(len(labels))
    images, labels = images[order], labels[order]
    images = tf.image.resize(images, (side, side)).numpy().astype("float32")
    n_test = max(1, int(round(len(labels) * config.test_fraction)))
    return images[n_test:], labels[n_test:], images[:n_test], labels[:n_test]


def _reason(error: Exception) -> str:
    """The user-facing part of an error: TensorFlow's op errors carry a function-node prefix,
    and a failed ``tf.debugging.Assert`` prints its data as ``[...] [...]``."""
    text = getattr(error, "message", None) or str(error)
    text = re.sub(r"\{\{[^}]*\}\}\s*", "", text).strip()
    if "assertion failed: " in text:
        text = text.split("assertion failed: ", 1)[1].split("\n", 1)[0].strip()
        text = " ".join(re.findall(r"\[(.*?)\](?=\s*\[|\s*$)", text)) or text
    return text.split("\n", 1)[0].strip().replace("\\'", "'").replace('\\"', '"')


def _family(model: str) -> str:
    name = model.lower()
    return next((family for family in _MIN_SIDE if name.startswith(family)), "vgg")


def build_model(config: TrainConfig, input_shape: tuple[int, ...], num_classes: int) -> keras.Model:
    """Builds the configured model (call inside the strategy scope)."""
    options: dict[str, Any] = {"input_shape": input_shape, "num_classes": num_classes}
    if "width" in models.accepted_options(config.model):
        options["width"] = config.width
    model = models.get(config.model, **options)
    # A few hundred steps: BatchNormalization's default momentum (0.99) would leave the moving
    # statistics far from the data; 0.9 tracks them within an epoch.
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    return model


def train(config: TrainConfig | None = None, *, log: Callable[[str], None] = print) -> TrainResult:
    """Trains `config.model` on the bundled digits under `config.strategy` and writes a report.

    Args:
        config: What to train; default :class:`TrainConfig()`.
        log: Where progress lines go.

    Returns:
        A :class:`TrainResult`.

    Raises:
        InputError: If the data cannot be read, or the model cannot be split as configured.

    Example:
    >>> result = tfpar.job.train(tfpar.job.TrainConfig(epochs=2))
    >>> result.test_accuracy
    0.93...
    """
    config = config or TrainConfig()
    keras.utils.set_random_seed(config.seed)
    # The strategy comes first: multi_worker must exist before TensorFlow's first operation.
    name = "default" if config.model_parallel else config.strategy
    strategy = strategies.get_strategy(name, **config.strategy_options)
    x_train, y_train, x_test, y_test = load_data(config)
    num_classes = int(y_train.max()) + 1
    with strategies.scope(strategy, mixed_precision=config.mixed_precision):
        replicas = strategy.num_replicas_in_sync
        if replicas >= _MANY_REPLICAS:
            log(
                f"tfpar: building {config.model} on {replicas} replicas (each holds a copy of "
                "every variable; the training step is traced once per replica at the first step)"
            )
        model = build_model(config, x_train.shape[1:], num_classes)
        placement = ""
        if config.model_parallel:
            from tfpar import parallel

            try:
                model = parallel.split(
                    model, config.model_parallel, config.microbatches, batch_size=config.batch_size
                )
            except ValueError as error:  # the plan's checks of model_parallel / microbatches
                raise InputError(
                    f"Cannot split {config.model} over model_parallel={config.model_parallel} "
                    f"devices: {error}"
                ) from error
            placement = (
                f", split over {config.model_parallel} devices in {model.microbatches} "
                f"micro-batch(es):\n{model.plan.summary()}"
            )
        learning_rate = _compile(model, config, replicas)
    log(
        f"tfpar {__version__}: training {config.model} ({model.count_params():,} parameters) on "
        f"{len(y_train)} {'digits' if config.data == 'digits' else config.data} images "
        f"{x_train.shape[1]}x{x_train.shape[2]}x{x_train.shape[3]}, strategy "
        f"{strategies.strategy_name(strategy)} with {replicas} replica(s), global batch {config.batch_size}, "
        f"learning rate {learning_rate:.3g}{placement}"
    )
    if replicas >= _MANY_REPLICAS:
        log(f"tfpar: tracing the training step on {replicas} replicas before the first epoch starts")
    report_dir = _report_directory(config)
    tuned = None
    if config.tune:
        config, tuned = _tune(model, config, x_train, y_train, strategy, replicas, log)
    callbacks: list[keras.callbacks.Callback] = [training.Throughput(config.batch_size)]
    if replicas > 1:
        # The warmup counts optimizer updates: one per `accumulation` batches when tuning chose it.
        accumulation = int((tuned.chosen if tuned is not None else {}).get("gradient_accumulation_steps", 1))
        steps_per_epoch = -(-len(y_train) // config.batch_size)
        callbacks.append(training.LearningRateWarmup(warmup_steps=max(1, steps_per_epoch // accumulation)))
    profiler = None
    if config.profile:
        profiler = _profiler(config, len(y_train), report_dir, strategy, log)
        callbacks.append(profiler)
    started = time.perf_counter()
    history = model.fit(
        x_train,
        y_train,
        batch_size=config.batch_size,
        epochs=config.epochs,
        validation_data=(x_test, y_test),
        callbacks=callbacks,
        verbose=config.verbose,
    )
    elapsed = time.perf_counter() - started
    test_loss, test_accuracy = model.evaluate(x_test, y_test, batch_size=config.batch_size, verbose=0)
    rates = history.history.get("samples_per_second") or [len(y_train) * config.epochs / elapsed]
    result = TrainResult(
        strategy=strategies.strategy_name(strategy),
        replicas=replicas,
        test_accuracy=float(test_accuracy),
        test_loss=float(test_loss),
        samples_per_second=float(rates[-1]),
        history={k: [float(v) for v in values] for k, values in history.history.items()},
        report_dir=None,
        step_breakdown=profiler.report.to_json() if profiler is not None and profiler.report else None,
        tuning=tuned.to_json() if tuned is not None else None,
        config=config,
    )
    if not cluster.is_chief(getattr(strategy, "cluster_resolver", None)):
        return result  # under multi_worker only the chief writes the report
    write_report(config, result, elapsed, directory=report_dir)
    if profiler is not None and profiler.report is not None:
        profiler.report.write_trace(report_dir / "trace.json")
        profiler.report.plot(report_dir / "step_breakdown.png")
    if tuned is not None:
        tuned.plot(report_dir / "tuning.png")
    return dataclasses.replace(result, report_dir=report_dir)


def _compile(model: keras.Model, config: TrainConfig, replicas: int, *, batch_factor: float = 1.0,
             accumulation: int = 1) -> float:
    """Compiles `model` for `config`; returns the learning rate: the base rate scaled for the
    replica count and, after tuning, for a batch `batch_factor` times the configured one and
    `accumulation` steps (linear for SGD, square root for Adam)."""
    rule = "linear" if config.optimizer == "sgd" else "sqrt"
    factor = replicas * batch_factor * accumulation
    learning_rate = training.scale_learning_rate(config.learning_rate, factor=factor, rule=rule)
    options: dict[str, Any] = {"gradient_accumulation_steps": accumulation} if accumulation > 1 else {}
    optimizer = (
        keras.optimizers.SGD(learning_rate, momentum=0.9, **options)
        if config.optimizer == "sgd"
        else keras.optimizers.Adam(learning_rate, **options)
    )
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"],
                  steps_per_execution=config.steps_per_execution)
    return learning_rate


def _tune(model: keras.Model, config: TrainConfig, x_train: np.ndarray, y_train: np.ndarray,
          strategy: tf.distribute.Strategy, replicas: int, log: Callable[[str], None]) -> tuple[TrainConfig, Any]:
    """Measures candidate settings (``tfpar.tuning.tune``), compiles for the fastest and returns
    the config trained with and the tuning result.

    Tuning restores the weights and optimizer state; the model is then compiled afresh, as for
    an untuned run (measured: under multi_worker, training on with the tuning's step function
    ran 2-3x slower per step than a fresh compile), with the learning rate rescaled for the
    chosen batch size and accumulation.
    """
    from tfpar import tuning

    with strategy.scope():
        try:
            tuned = tuning.tune(
                model, x_train, y_train, batch_size=config.batch_size,
                steps_per_execution=config.steps_per_execution, budget_seconds=config.tune_budget, log=log,
            )
        except ValueError as error:  # e.g. a strategy tuning does not measure (parameter_server)
            raise InputError(f"Cannot tune {config.model} under {strategies.strategy_name(strategy)}: {error}") from error
        chosen = dict(tuned.chosen)
        tuned_config = dataclasses.replace(
            config,
            batch_size=int(chosen.get("batch_size", config.batch_size)),
            steps_per_execution=int(chosen.get("steps_per_execution", config.steps_per_execution)),
            microbatches=int(chosen["microbatches"]) if "microbatches" in chosen else config.microbatches,
        )
        accumulation = int(chosen.get("gradient_accumulation_steps", 1))
        learning_rate = _compile(model, tuned_config, replicas, batch_factor=tuned_config.batch_size / config.batch_size,
                                 accumulation=accumulation)
        if "microbatches" in chosen:
            tuning.apply_settings(model, {"microbatches": int(chosen["microbatches"])})
    rule = "linear" if config.optimizer == "sgd" else "sqrt"
    log(tuned.table())
    log(
        f"tfpar tune: training with {tuning.describe(chosen)}; learning rate {learning_rate:.3g} "
        f"({rule} in the global batch); tuning took {tuned.seconds:.1f} s"
    )
    return tuned_config, tuned


def _profiler(config: TrainConfig, examples: int, report_dir: Path, strategy: tf.distribute.Strategy,
              log: Callable[[str], None]) -> keras.callbacks.Callback:
    """A StepProfiler whose window fits the run: after a warm-up of at most one epoch and 10
    executions of the step function, up to 20 executions."""
    from tfpar import profiling

    per_epoch = max(1, -(-examples // (config.batch_size * config.steps_per_execution)))
    total = per_epoch * config.epochs
    warmup = min(per_epoch, 10, max(1, total // 3))
    steps = max(1, min(20, total - warmup)) * config.steps_per_execution
    chief = cluster.is_chief(getattr(strategy, "cluster_resolver", None))
    logdir = report_dir / "profile" if chief else None
    return profiling.StepProfiler(warmup_steps=warmup * config.steps_per_execution, steps=steps, logdir=logdir,
                                  verbose=chief, log=log)


def _report_directory(config: TrainConfig) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(config.output_dir or Path("tfpar_runs") / f"train-{stamp}")


def write_report(config: TrainConfig, result: TrainResult, elapsed: float, directory: Path | None = None) -> Path:
    """Writes ``metrics.json`` and ``training.png`` and returns their directory."""
    directory = directory or _report_directory(config)
    directory.mkdir(parents=True, exist_ok=True)
    metrics = {
        "config": dataclasses.asdict(config),
        "strategy": result.strategy,
        "replicas": result.replicas,
        "test_accuracy": result.test_accuracy,
        "test_loss": result.test_loss,
        "samples_per_second": result.samples_per_second,
        "train_seconds": elapsed,
        "history": result.history,
        **({"step_breakdown": result.step_breakdown} if result.step_breakdown is not None else {}),
        **({"tuning": result.tuning} if result.tuning is not None else {}),
        "versions": {
            "tfpar": __version__,
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "python": platform.python_version(),
        },
    }
    (directory / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _plot(result.history, directory / "training.png")
    return directory


def _plot(history: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(9, 3.5))
    epochs = range(1, len(history.get("loss", [])) + 1)
    for key, axis in (("loss", loss_axis), ("accuracy", accuracy_axis)):
        for prefix, style in (("", "-o"), ("val_", "--s")):
            values = history.get(prefix + key)
            if values:
                axis.plot(epochs, values, style, label=("validation " if prefix else "train ") + key)
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_title(key)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
