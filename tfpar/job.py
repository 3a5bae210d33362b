"""The main job: train an image classifier in parallel and report accuracy and throughput.

``tfpar train`` is a thin command-line layer over :func:`train`; notebooks can call it directly.
With no arguments it trains AlexNet (width 0.25, 64x64 inputs) on the bundled UCI digits (1,797
real handwritten digits, no download) under ``tfpar.scope("auto")``, evaluates on a held-out split
and writes a report (``metrics.json`` and a loss/accuracy plot).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tfpar import cluster, datasets, models, strategies, training
from tfpar.version import __version__

OPTIMIZERS = ("adam", "sgd")
# Image side used for each model family when the data is smaller (the digits are 8x8).
_MIN_SIDE = {"alexnet": 64, "vgg": 32, "resnet": 32}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What to train, and how.

    Attributes:
        model: A name from ``tfpar.models.available()``.
        strategy: A name from ``tfpar.available_strategies()``.
        strategy_options: Options for that strategy, e.g. ``{"devices": ["cpu:0", "cpu:1"]}``.
        epochs: Passes over the training split.
        batch_size: Global batch size (over all replicas).
        learning_rate: Base learning rate for one replica; scaled for the replica count (linear
            for SGD, square root for Adam) and warmed up over the first epoch when scaled.
        optimizer: ``"adam"`` or ``"sgd"`` (with momentum 0.9).
        data: ``"digits"`` (bundled), or a path: an image folder in the
            ``keras.utils.image_dataset_from_directory`` layout, TFRecords (``x``/``y`` features,
            as ``tfpar.data.write_tfrecords`` writes) or a ``.npz`` with ``x`` and ``y``; read with
            ``tfpar.data.read`` into memory.
        image_size: Side of the square images fed to the model; default depends on the model.
        width: Channel multiplier for tfpar's AlexNet/VGG builders (small models train fast on CPU).
        test_fraction: Held-out fraction for the test accuracy.
        mixed_precision: ``"mixed_float16"``, ``"mixed_bfloat16"`` or None.
        model_parallel: Split the model's layers over this many devices (``tfpar.parallel``;
            optimal FLOPs balance), instead of data parallelism. None: no split.
        microbatches: Micro-batches per step of the split model (an int or ``"auto"``).
        seed: Seed for the split, initialization and shuffling.
        output_dir: Where the report goes; default ``tfpar_runs/<timestamp>``.
        verbose: Keras verbosity (1 progress bar, 2 one line per epoch, 0 silent).
    """

    model: str = "alexnet"
    strategy: str = "auto"
    strategy_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    epochs: int = 8
    batch_size: int = 64
    learning_rate: float = 1e-3
    optimizer: str = "adam"
    data: str = "digits"
    image_size: int | None = None
    width: float = 0.25
    test_fraction: float = 0.2
    mixed_precision: str | None = None
    model_parallel: int | None = None
    microbatches: int | str = 1
    seed: int = 0
    output_dir: str | None = None
    verbose: int = 1

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"Expected optimizer to be one of {list(OPTIMIZERS)}. Received: optimizer={self.optimizer!r}")
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Expected {name} to be a positive int. Received: {name}={value!r}")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"Expected 0 < test_fraction < 1. Received: test_fraction={self.test_fraction!r}")
        if self.learning_rate <= 0:
            raise ValueError(f"Expected learning_rate > 0. Received: learning_rate={self.learning_rate!r}")
        if self.data != "digits" and not tf.io.gfile.glob(self.data):
            raise ValueError(
                "Expected data to be 'digits' or an existing image folder (class sub-folders), "
                f"TFRecord file/glob/folder or .npz file. Received: data={self.data!r} (not found)"
            )
        if self.image_size is not None and self.image_size < 8:
            raise ValueError(f"Expected image_size >= 8. Received: image_size={self.image_size!r}")
        if self.model_parallel is not None:
            if self.model_parallel < 1:
                raise ValueError(f"Expected model_parallel >= 1. Received: model_parallel={self.model_parallel!r}")
            if self.strategy not in ("auto", "default"):
                raise ValueError(
                    "model_parallel splits one model replica over several devices and runs under "
                    f"the 'default' strategy. Received: strategy={self.strategy!r}. Drop the "
                    "strategy, or drop model_parallel for data parallelism."
                )


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
    """

    strategy: str
    replicas: int
    test_accuracy: float
    test_loss: float
    samples_per_second: float
    history: dict[str, list[float]]
    report_dir: Path | None


def _read_path(path: str, side: int) -> tuple[np.ndarray, np.ndarray]:
    from tfpar import data

    options = {"image_size": (side, side)} if tf.io.gfile.isdir(path) and _has_subfolders(path) else {}
    dataset = data.read(path, **options)
    if isinstance(dataset.element_spec, dict):
        dataset = dataset.map(lambda example: (example["x"], example["y"]))
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
    """Returns ``(x_train, y_train, x_test, y_test)`` as float32 images in [0, 1] and int labels."""
    side = config.image_size or _MIN_SIDE[_family(config.model)]
    if config.data == "digits":
        images, labels = datasets.load_digits()
        images = images / 16.0
    else:
        images, labels = _read_path(config.data, side)
    order = np.random.default_rng(config.seed).permutation(len(labels))
    images, labels = images[order], labels[order]
    images = tf.image.resize(images, (side, side)).numpy().astype("float32")
    n_test = max(1, int(round(len(labels) * config.test_fraction)))
    return images[n_test:], labels[n_test:], images[:n_test], labels[:n_test]


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
        model = build_model(config, x_train.shape[1:], num_classes)
        placement = ""
        if config.model_parallel:
            from tfpar import parallel

            model = parallel.split(
                model, config.model_parallel, config.microbatches, batch_size=config.batch_size
            )
            placement = (
                f", split over {config.model_parallel} devices in {model.microbatches} "
                f"micro-batch(es):\n{model.plan.summary()}"
            )
        rule = "linear" if config.optimizer == "sgd" else "sqrt"
        learning_rate = training.scale_learning_rate(config.learning_rate, factor=replicas, rule=rule)
        optimizer = (
            keras.optimizers.SGD(learning_rate, momentum=0.9)
            if config.optimizer == "sgd"
            else keras.optimizers.Adam(learning_rate)
        )
        model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    log(
        f"tfpar {__version__}: training {config.model} ({model.count_params():,} parameters) on "
        f"{len(y_train)} {'digits' if config.data == 'digits' else config.data} images "
        f"{x_train.shape[1]}x{x_train.shape[2]}x{x_train.shape[3]}, strategy "
        f"{strategies.strategy_name(strategy)} with {replicas} replica(s), global batch {config.batch_size}, "
        f"learning rate {learning_rate:.3g}{placement}"
    )
    callbacks: list[keras.callbacks.Callback] = [training.Throughput(config.batch_size)]
    if replicas > 1:
        steps_per_epoch = -(-len(y_train) // config.batch_size)
        callbacks.append(training.LearningRateWarmup(warmup_steps=steps_per_epoch))
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
    )
    if not cluster.is_chief(getattr(strategy, "cluster_resolver", None)):
        return result  # under multi_worker only the chief writes the report
    report_dir = write_report(config, result, elapsed)
    return dataclasses.replace(result, report_dir=report_dir)


def write_report(config: TrainConfig, result: TrainResult, elapsed: float) -> Path:
    """Writes ``metrics.json`` and ``training.png`` and returns their directory."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    directory = Path(config.output_dir or Path("tfpar_runs") / f"train-{stamp}")
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
