"""``TrainConfig``: what ``tfpar train`` (``tfpar.job.train``) trains, every option checked.

Importing this module loads no TensorFlow, so the command line can take its defaults while it
builds its parser; making a config imports the registries it checks names against.
Public as ``tfpar.job.TrainConfig``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import Any

__all__ = ["OPTIMIZERS", "TrainConfig"]

OPTIMIZERS = ("adam", "sgd")
_MAX_SEED = 2**32 - 1  # numpy's seed range (keras.utils.set_random_seed seeds numpy)
_VERBOSITY = (0, 1, 2)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What to train, and how; every option is checked when the config is made.

    The checks are cheap and have no TensorFlow side effect (they list folders and read a few
    bytes of the data), so a bad option fails before devices are configured, data is read or a
    model is built: numbers must be finite (no NaN or infinity), ``image_size`` at least the
    model's minimum (``tfpar.models.min_input_size``), ``data`` a readable layout.

    Raises:
        TypeError: If an option has the wrong type (e.g. ``learning_rate="1e-3"``).
        ValueError: If an option has a wrong value; the message names it and what is valid.

    Attributes:
        model: A name from ``tfpar.models.available()``.
        strategy: A name from ``tfpar.available_strategies()``.
        strategy_options: Options for that strategy, e.g. ``{"devices": ["cpu:0", "cpu:1"]}``.
        epochs: Passes over the training split.
        batch_size: Global batch size (over all replicas).
        learning_rate: Base learning rate for one replica, a finite number > 0; scaled for the
            replica count (linear for SGD, square root for Adam) and warmed up over the first
            epoch when scaled.
        optimizer: ``"adam"`` or ``"sgd"`` (with momentum 0.9).
        data: ``"digits"`` (bundled), or a path: an image folder in the
            ``keras.utils.image_dataset_from_directory`` layout, TFRecords (``x``/``y`` features,
            as ``tfpar.data.write_tfrecords`` writes) or a ``.npz`` with ``x`` and ``y``; read with
            ``tfpar.data.read`` into memory.
        image_size: Side of the square images fed to the model, at least the model's minimum
            (AlexNet 55, VGG and ResNet 32); default depends on the model.
        width: Channel multiplier for tfpar's AlexNet/VGG builders (small models train fast on
            CPU), a finite number > 0.
        test_fraction: Held-out fraction for the test accuracy, in (0, 1).
        mixed_precision: ``"mixed_float16"``, ``"mixed_bfloat16"`` or None.
        model_parallel: Split the model's layers over this many devices (``tfpar.parallel``;
            optimal FLOPs balance), instead of data parallelism. None: no split.
        microbatches: Micro-batches per step of the split model (an int or ``"auto"``).
        seed: Seed for the split, initialization and shuffling, from 0 to 2**32 - 1.
        output_dir: Where the report goes; default ``tfpar_runs/<timestamp>``.
        verbose: Keras verbosity (1 progress bar, 2 one line per epoch, 0 silent).
        on_error: For an image folder in `data`: ``"raise"`` (default) stops at a file that is
            not a readable image and names it; ``"skip"`` leaves such files out and warns with
            their count (``tfpar.data.read_images(on_error=...)``). Other data ignores it.
        steps_per_execution: Training steps per call of the compiled step function (Keras's
            ``compile(steps_per_execution=...)``); more steps per call cost less Python per step.
        profile: Profile a window of steps after warm-up (``tfpar.training.StepProfiler``): the
            report gains ``step_breakdown`` in ``metrics.json``, ``trace.json`` and
            ``step_breakdown.png``, and TensorFlow's trace under ``profile/`` (TensorBoard).
        tune: Before training, measure a few settings (batch size, steps per execution, gradient
            accumulation under multi_worker, micro-batches of a split model) for a short while
            each and train with the fastest (``tfpar.tuning.tune``); the learning rate follows
            the batch size by the rule of `learning_rate`. The report gains ``tuning``.
        tune_budget: Seconds the tuning may take (default: ``tfpar.tuning``'s default).

    Example:
    >>> config = tfpar.job.TrainConfig(model="vgg11", epochs=2, width=0.125)
    >>> config.batch_size
    64
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
    on_error: str = "raise"
    steps_per_execution: int = 1
    profile: bool = False
    tune: bool = False
    tune_budget: float | None = None

    def __post_init__(self) -> None:
        """Checks every option before anything is built: cheap, and free of TensorFlow side
        effects (it lists folders and reads a few bytes of the data), so it can run before
        TensorFlow's devices are configured. The checks run in the order of the fields."""
        min_side = self._check_names()
        self._check_numbers()
        self._check_inputs(min_side)
        self._check_modes()

    def _check_names(self) -> int | None:
        """model, strategy, strategy_options, optimizer; returns the model's smallest input side."""
        from tfpar import models, strategies

        min_side = models.min_input_size(self.model)  # also refuses an unknown model name
        if self.strategy not in strategies.available_strategies():
            raise ValueError(
                f"Expected strategy to be one of {strategies.available_strategies()}. "
                f"Received: strategy={self.strategy!r}"
            )
        if not isinstance(self.strategy_options, Mapping):
            raise TypeError(
                "Expected strategy_options to be a dict of options for the strategy. "
                f"Received: strategy_options={self.strategy_options!r}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"Expected optimizer to be one of {list(OPTIMIZERS)}. Received: optimizer={self.optimizer!r}")
        return min_side

    def _check_numbers(self) -> None:
        """epochs and batch_size positive ints; learning_rate, width, test_fraction finite > 0."""
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Expected {name} to be a positive int. Received: {name}={value!r}")
        for name in ("learning_rate", "width", "test_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(
                    f"Expected {name} to be a number. Received: {name}={value!r} (of type {type(value).__name__})"
                )
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"Expected {name} to be a finite number > 0. Received: {name}={value!r}")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"Expected 0 < test_fraction < 1. Received: test_fraction={self.test_fraction!r}")

    def _check_inputs(self, min_side: int | None) -> None:
        """mixed_precision, data (its layout, read from disk) and image_size."""
        from tfpar import strategies
        from tfpar.data import readers

        if self.mixed_precision is not None and self.mixed_precision not in strategies.MIXED_PRECISION_POLICIES:
            raise ValueError(
                f"Expected mixed_precision to be None or one of {list(strategies.MIXED_PRECISION_POLICIES)}. "
                f"Received: mixed_precision={self.mixed_precision!r}"
            )
        if not isinstance(self.data, str):
            raise TypeError(f"Expected data to be 'digits' or a path string. Received: data={self.data!r}")
        if self.data != "digits":
            readers.source_kind(self.data)  # names the path and what was expected
        if self.image_size is not None:
            if isinstance(self.image_size, bool) or not isinstance(self.image_size, int):
                raise TypeError(
                    f"Expected image_size to be an int (pixels) or None. Received: image_size={self.image_size!r}"
                )
            if min_side is not None and self.image_size < min_side:
                raise ValueError(
                    f"Expected image_size >= {min_side}: the smallest input {self.model} accepts. "
                    f"Received: image_size={self.image_size}. Fix: use {min_side} or more, or "
                    "leave it unset for the model's default."
                )
            if self.image_size < 1:
                raise ValueError(f"Expected image_size >= 1. Received: image_size={self.image_size}")

    def _check_modes(self) -> None:
        """seed, model_parallel, microbatches, on_error, verbose, and model_parallel's strategy."""
        from tfpar.parallel import pipeline as pipeline_lib

        for name, value, low, high in (("seed", self.seed, 0, _MAX_SEED),
                                       ("model_parallel", self.model_parallel, 1, None)):
            if value is None and name == "model_parallel":
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"Expected {name} to be an int. Received: {name}={value!r} (of type {type(value).__name__})")
            if value < low or (high is not None and value > high):
                valid = f"{low} <= {name} <= {high}" if high is not None else f"{name} >= {low}"
                raise ValueError(f"Expected {valid}. Received: {name}={value}")
        pipeline_lib.check_microbatches(self.microbatches)
        if isinstance(self.steps_per_execution, bool) or not isinstance(self.steps_per_execution, int) \
                or self.steps_per_execution < 1:
            raise ValueError(
                f"Expected steps_per_execution to be a positive int. Received: steps_per_execution={self.steps_per_execution!r}"
            )
        for name in ("profile", "tune"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"Expected {name} to be True or False. Received: {name}={getattr(self, name)!r}")
        if self.tune_budget is not None and (
            isinstance(self.tune_budget, bool) or not isinstance(self.tune_budget, numbers.Real)
            or not math.isfinite(self.tune_budget) or self.tune_budget <= 0
        ):
            raise ValueError(
                f"Expected tune_budget to be None or a finite number of seconds > 0. Received: tune_budget={self.tune_budget!r}"
            )
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"Expected on_error to be 'raise' or 'skip'. Received: on_error={self.on_error!r}")
        if self.verbose not in _VERBOSITY or isinstance(self.verbose, bool):
            raise ValueError(f"Expected verbose to be one of {list(_VERBOSITY)}. Received: verbose={self.verbose!r}")
        if self.model_parallel is not None and self.strategy not in ("auto", "default"):
            raise ValueError(
                "model_parallel splits one model replica over several devices and runs under "
                f"the 'default' strategy. Received: strategy={self.strategy!r}. Drop the "
                "strategy, or drop model_parallel for data parallelism."
            )
