"""A model's training state, saved before a search and put back after; settings applied in between.

A setting is applied without recompiling: ``steps_per_execution`` is read when Keras builds (and
traces) the train function, so setting it and dropping the cached ``train_function`` is a
recompile without new optimizer, loss or metric objects. The same holds for a split model's
micro-batch count (read when the forward pass is traced) and for the optimizer's
``gradient_accumulation_steps`` where the optimizer is not built yet (tfpar's accumulation reads
it when the train function is made). A built optimizer has no accumulators (Keras makes them at
build), so accumulation then trains with a fresh copy of it; :class:`ModelState` puts the
original back.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

__all__ = ["ModelState", "apply_settings", "default_settings", "needs_trace", "supports_microbatches"]


def supports_microbatches(model: Any) -> bool:
    """Whether `model` is a split model whose micro-batch count can be changed (a retrace)."""
    from tfpar.parallel import SplitModel

    return isinstance(model, SplitModel) and hasattr(model, "_microbatches") and hasattr(model, "_plan")


def default_settings(model: Any, batch_size: int, steps_per_execution: int, *, multi_worker: bool) -> dict[str, Any]:
    """The settings the model trains with now (the search's default)."""
    settings: dict[str, Any] = {"batch_size": batch_size, "steps_per_execution": steps_per_execution}
    if multi_worker:
        settings["gradient_accumulation_steps"] = int(getattr(model.optimizer, "gradient_accumulation_steps", None) or 1)
    if supports_microbatches(model):
        settings["microbatches"] = int(model.microbatches)
    return settings


def needs_trace(model: Any, settings: dict[str, Any]) -> bool:
    """Whether applying `settings` changes what the train function was traced with (not the batch)."""
    if model.train_function is None:
        return True
    if int(settings.get("steps_per_execution", model.steps_per_execution)) != int(model.steps_per_execution):
        return True
    current = int(getattr(model.optimizer, "gradient_accumulation_steps", None) or 1)
    if int(settings.get("gradient_accumulation_steps", current)) != current:
        return True
    return "microbatches" in settings and int(settings["microbatches"]) != int(getattr(model, "microbatches", 1))


def apply_settings(model: Any, settings: dict[str, Any]) -> None:
    """Applies a setting's ``steps_per_execution``, accumulation and micro-batches to a compiled model.

    The batch size is an argument of ``fit``, not a model attribute: the caller passes it. When
    another setting changes, the train function is made again at the next ``fit`` (the first step
    traces); when only the batch size does, the function is kept (TensorFlow traces it once more,
    with the batch dimension relaxed, and then reuses that trace for any batch size).

    Args:
        model: A compiled ``keras.Model``.
        settings: A candidate's settings (keys it does not have are left as they are).

    Accumulation on an optimizer that is already built replaces ``model.optimizer`` with a
    fresh copy (same class and config; its state starts over): Keras creates the accumulators
    only when an optimizer is built.

    Raises:
        ValueError: If the setting asks for micro-batches of a model that is not split.
    """
    if not needs_trace(model, settings):
        return  # same function: a batch size of another shape is one more trace, with a relaxed shape
    if "steps_per_execution" in settings:
        model.steps_per_execution = int(settings["steps_per_execution"])
    if "gradient_accumulation_steps" in settings:
        steps = int(settings["gradient_accumulation_steps"])
        current = int(getattr(model.optimizer, "gradient_accumulation_steps", None) or 1)
        if steps > 1 and current == 1 and getattr(model.optimizer, "built", False):
            model.optimizer = _accumulating_copy(model, steps)
        else:
            model.optimizer.gradient_accumulation_steps = steps if steps > 1 else None
    if "microbatches" in settings:
        if not supports_microbatches(model):
            raise ValueError(
                "Expected a split model (tfpar.parallel.split) for a micro-batch setting. Received: "
                f"model of type {type(model).__name__}, settings={settings!r}"
            )
        m = int(settings["microbatches"])
        model._microbatches = m  # what tfpar.parallel.split(..., microbatches="auto") sets too
        model._plan = dataclasses.replace(model._plan, microbatches=m)
    model.train_function = None


def _accumulating_copy(model: Any, steps: int) -> Any:
    """A copy of the model's built optimizer that accumulates `steps` gradients.

    Keras creates an optimizer's accumulators when it is built, only if
    ``gradient_accumulation_steps`` was set by then; setting it later fails at the first step
    ("no attribute '_accumulated_gradients'"). So a setting with accumulation trains with a
    copy (same class and config, fresh state), built under the model's strategy; the state
    restores the original optimizer.
    """
    optimizer = model.optimizer
    config = dict(optimizer.get_config(), gradient_accumulation_steps=steps)
    copy = type(optimizer).from_config(config)
    with model.distribute_strategy.scope():
        copy.build(model.trainable_variables)
    return copy


def _values(variables: list[Any]) -> list[np.ndarray]:
    return [np.array(v.numpy(), copy=True) for v in variables]


@dataclasses.dataclass
class ModelState:
    """What a search changes in a model, to put back afterwards.

    The variables (weights, non-trainable state such as BatchNormalization statistics and the
    dropout seed, the optimizer's slots and step counter, the metrics' accumulators) are saved
    once the model and its optimizer are built, which ``fit`` does before its first step (a model
    built before the search is saved as it is; one built by the search's first ``fit`` is saved as
    built, untrained).
    """

    model: Any
    optimizer: Any
    steps_per_execution: int
    gradient_accumulation_steps: int | None
    microbatches: int | None
    plan: Any
    train_function: Any
    history: Any
    stop_training: bool
    variables: list[Any] = dataclasses.field(default_factory=list)
    values: list[np.ndarray] | None = None

    @classmethod
    def capture_settings(cls, model: Any) -> ModelState:
        """Saves the settings now; the variables with :meth:`capture_variables`."""
        split = supports_microbatches(model)
        return cls(
            model=model,
            optimizer=model.optimizer,
            steps_per_execution=model.steps_per_execution,
            gradient_accumulation_steps=getattr(model.optimizer, "gradient_accumulation_steps", None),
            microbatches=model._microbatches if split else None,
            plan=model._plan if split else None,
            train_function=model.train_function,
            history=getattr(model, "history", None),
            stop_training=bool(getattr(model, "stop_training", False)),
        )

    @property
    def captured(self) -> bool:
        return self.values is not None

    def capture_variables(self) -> None:
        """Saves every variable of the model, its optimizer and its metrics (once)."""
        if self.captured:
            return
        model = self.model
        seen: set[int] = set()
        variables = []
        for variable in [*model.variables, *model.optimizer.variables, *model.metrics_variables]:
            if id(variable) not in seen:
                seen.add(id(variable))
                variables.append(variable)
        self.variables = variables
        self.values = _values(variables)

    def restore_variables(self) -> None:
        """Puts the saved variable values back (nothing if none were saved yet)."""
        if self.values is not None:
            for variable, value in zip(self.variables, self.values):
                variable.assign(value)

    def restore(self) -> None:
        """Puts the variables and the settings back as they were."""
        model = self.model
        self.restore_variables()
        model.optimizer = self.optimizer
        model.steps_per_execution = self.steps_per_execution
        model.optimizer.gradient_accumulation_steps = self.gradient_accumulation_steps
        if self.plan is not None:
            model._microbatches = self.microbatches
            model._plan = self.plan
        # The function traced before the search (or None: made again at the next fit).
        model.train_function = self.train_function
        model.history = self.history
        model.stop_training = self.stop_training
