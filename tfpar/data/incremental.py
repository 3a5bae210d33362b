"""Incremental training: keep training as new data files arrive, never re-reading the old ones.

Data that grows over time usually grows by whole files (a new TFRecord shard per day, new images
in class folders). :class:`IncrementalFiles` remembers which files the model has already been
trained on; it is a ``tf.train.experimental.PythonState``, so it is saved *inside* the same
``tf.train.Checkpoint`` as the weights and the optimizer, and the two can never disagree: after a
crash the latest checkpoint says both what the model learned and from which files.
:class:`IncrementalTrainer` runs the rounds: restore the latest checkpoint, list the files that
arrived since, build a dataset from those files only, ``model.fit`` it, record them, checkpoint.

Files are treated as immutable: a file that changes size after it was trained on is reported, not
silently re-read or skipped. ``replay=True`` asks for the old files too (all files, old and new).
A crash during a round loses that round only: the next run restarts it from the previous
checkpoint, so every file is trained on exactly once per round that completes.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import keras
import tensorflow as tf

logger = logging.getLogger(__name__)

_STATE_VERSION = 1


class IncrementalFiles(tf.train.experimental.PythonState):
    """The files of a growing data source, and which of them were already trained on.

    Put it in a ``tf.train.Checkpoint`` next to the model so both are saved and restored together.

    Args:
        patterns: A glob (``"/data/incoming/*.tfrecord"``), a path, or a list of them. Matching is
            redone by :meth:`new_files` every time, so files that appear later are found.

    Example:
    >>> files = tfpar.data.IncrementalFiles("/data/incoming/*.tfrecord")
    >>> checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer, data=files)
    >>> new = files.new_files()            # not trained on yet, sorted
    >>> model.fit(tfpar.data.read_tfrecords(new, features="infer").batch(32))
    >>> files.mark_consumed(new)
    >>> checkpoint.write("/ckpt/round")
    """

    def __init__(self, patterns: str | Sequence[str]):
        if isinstance(patterns, (str, os.PathLike)):
            patterns = [os.fspath(patterns)]
        if not isinstance(patterns, Sequence) or not patterns or not all(
            isinstance(p, (str, os.PathLike)) for p in patterns
        ):
            raise TypeError(
                "Expected a glob, a path, or a non-empty list of them. "
                f"Received: patterns={patterns!r}"
            )
        self.patterns = [os.fspath(p) for p in patterns]
        self._consumed: dict[str, int] = {}

    def all_files(self) -> list[str]:
        """Every file matching the patterns now (absolute paths, sorted); may be empty.

        Example:
        >>> tfpar.data.IncrementalFiles("/data/incoming/*.tfrecord").all_files()
        ['/data/incoming/day-1.tfrecord', '/data/incoming/day-2.tfrecord']
        """
        found: set[str] = set()
        for pattern in self.patterns:
            found.update(
                os.path.abspath(p) for p in tf.io.gfile.glob(pattern) if not tf.io.gfile.isdir(p)
            )
        return sorted(found)

    def consumed_files(self) -> list[str]:
        """The files already trained on, sorted.

        Example:
        >>> files.consumed_files()
        ['/data/incoming/day-1.tfrecord']
        """
        return sorted(self._consumed)

    def new_files(self) -> list[str]:
        """The matching files not trained on yet, sorted. Lists names only; reads no data.

        Raises:
            ValueError: If a file that was trained on has changed size since (files are treated
                as immutable: write new data to new files).

        Example:
        >>> files.new_files()
        ['/data/incoming/day-2.tfrecord']
        """
        current = self.all_files()
        changed = []
        for path in current:
            if path in self._consumed:
                size = tf.io.gfile.stat(path).length
                if size != self._consumed[path]:
                    changed.append(f"{path} ({self._consumed[path]} -> {size} bytes)")
        if changed:
            raise ValueError(
                "These files changed after the model was trained on them: "
                f"{', '.join(changed)}. tfpar treats data files as immutable, so it neither re-reads "
                "nor skips them silently. Fix: write new data to new files (and restore the old "
                "content), or start a fresh IncrementalFiles if the model must see everything again."
            )
        return [p for p in current if p not in self._consumed]

    def mark_consumed(self, files: Sequence[str]) -> None:
        """Records `files` as trained on (with their sizes). Call after training, before saving.

        Raises:
            TypeError: If `files` is not a list of paths.
            ValueError: If a file does not exist.

        Example:
        >>> files.mark_consumed(["/data/incoming/day-2.tfrecord"])
        """
        if isinstance(files, (str, os.PathLike)) or not all(
            isinstance(f, (str, os.PathLike)) for f in files
        ):
            raise TypeError(f"Expected a list of file paths. Received: files={files!r}")
        for file in files:
            path = os.path.abspath(os.fspath(file))
            if not tf.io.gfile.exists(path):
                raise ValueError(f"Cannot mark a missing file as trained on. Received: {path!r}")
            self._consumed[path] = tf.io.gfile.stat(path).length

    def serialize(self) -> str:
        """The checkpointed state (JSON); called by ``tf.train.Checkpoint`` when saving."""
        return json.dumps(
            {"version": _STATE_VERSION, "patterns": self.patterns, "consumed": self._consumed},
            sort_keys=True,
        )

    def deserialize(self, string_value: Any) -> None:
        """Restores the state saved by :meth:`serialize`; called by ``tf.train.Checkpoint``."""
        raw = string_value.numpy() if hasattr(string_value, "numpy") else string_value
        state = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        if state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"Expected IncrementalFiles state version {_STATE_VERSION}. "
                f"Received: version={state.get('version')!r}"
            )
        if sorted(state["patterns"]) != sorted(self.patterns):
            warnings.warn(
                f"The checkpoint tracked patterns {state['patterns']}; this IncrementalFiles uses "
                f"{self.patterns}. tfpar keeps the consumed-file record and matches the new "
                "patterns.",
                stacklevel=2,
            )
        self._consumed = {str(k): int(v) for k, v in state["consumed"].items()}


class IncrementalTrainer:
    """Trains a compiled Keras model round by round on the data files that arrived since.

    On construction it restores the latest checkpoint in `checkpoint_dir` (weights, optimizer
    state, and which files were consumed), if there is one, in the model's strategy scope. Each
    :meth:`fit_new_data` call then trains on the new files only and saves a checkpoint.

    Under a ``tf.distribute`` strategy, Keras 3 reads a first batch of the dataset an extra time for
    its symbolic build the first time a model is fit (with prefetching, a small dataset may be read
    whole); the examples are still trained on once.

    Args:
        model: A compiled, built ``keras.Model`` (create it in the strategy scope, if any).
        patterns: Glob(s) or path(s) of the growing data, as in :class:`IncrementalFiles`.
        make_dataset: Builds the training dataset from a list of files, e.g.
            ``lambda files: tfpar.data.pipeline(tfpar.data.read_tfrecords(files, ...),
            batch_size=32)``.
        checkpoint_dir: Where checkpoints go. One writer at a time: under a multi-worker strategy
            give non-chief workers their own directory.
        max_to_keep: Checkpoints kept.

    Raises:
        TypeError: If `model` is not a Keras model or `make_dataset` is not callable.
        RuntimeError: If the model is not compiled or not built yet.

    Example:
    >>> trainer = tfpar.data.IncrementalTrainer(
    ...     model, "/data/incoming/*.tfrecord",
    ...     lambda files: tfpar.data.read_tfrecords(files, features="infer").map(to_xy).batch(32),
    ...     "/ckpt")
    >>> trainer.fit_new_data(epochs=1)     # trains on the files that arrived since the last run
    ['/data/incoming/day-3.tfrecord']
    """

    def __init__(
        self,
        model: keras.Model,
        patterns: str | Sequence[str],
        make_dataset: Callable[[list[str]], tf.data.Dataset],
        checkpoint_dir: str,
        *,
        max_to_keep: int = 3,
    ):
        if not isinstance(model, keras.Model):
            raise TypeError(f"Expected a keras.Model. Received: model={type(model).__name__}")
        if not callable(make_dataset):
            raise TypeError(
                "Expected `make_dataset` to be a function from a list of files to a dataset. "
                f"Received: make_dataset={make_dataset!r}"
            )
        if not isinstance(checkpoint_dir, (str, os.PathLike)):
            raise TypeError(f"Expected a directory path. Received: checkpoint_dir={checkpoint_dir!r}")
        if getattr(model, "optimizer", None) is None:
            raise RuntimeError(
                "The model must be compiled (model.compile(optimizer, loss)) before incremental "
                "training, so its optimizer state can be checkpointed and restored."
            )
        if not model.built:
            raise RuntimeError(
                "The model must be built before incremental training (give it a keras.Input, or "
                "call model.build(input_shape)), so its weights can be restored."
            )
        self.model = model
        self.files = IncrementalFiles(patterns)
        self.make_dataset = make_dataset
        # The model's strategy (the default one outside any scope): optimizer variables must be
        # created in the scope the model was built in.
        self.strategy = getattr(model, "distribute_strategy", None) or tf.distribute.get_strategy()
        with self.strategy.scope():
            # Create the optimizer's slot variables now, so a restore fills them too.
            model.optimizer.build(model.trainable_variables)
        self.checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer, data=self.files)
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, os.fspath(checkpoint_dir), max_to_keep=max_to_keep
        )
        self.restored_from = self.manager.latest_checkpoint
        if self.restored_from:
            with self.strategy.scope():
                self.checkpoint.restore(self.restored_from).assert_existing_objects_matched()
            logger.info(
                "tfpar.data.incremental: restored %s (%d files already trained on)",
                self.restored_from, len(self.files.consumed_files()),
            )

    def fit_new_data(self, *, replay: bool = False, **fit_kwargs: Any) -> list[str]:
        """Trains on the files that arrived since the last round, then checkpoints.

        Args:
            replay: Also train on the files already consumed (all files, old and new, in one
                dataset). Default False: old files are neither read nor repeated.
            **fit_kwargs: Passed to ``model.fit`` (e.g. ``epochs=1``).

        Returns:
            The new files trained on (empty if none arrived; then nothing is trained or saved
            unless `replay` is set).

        Raises:
            ValueError: If a consumed file changed (see :meth:`IncrementalFiles.new_files`).
            TypeError: If `make_dataset` does not return a ``tf.data.Dataset``.

        Example:
        >>> trainer.fit_new_data(epochs=2)
        ['/data/incoming/day-4.tfrecord']
        """
        if not isinstance(replay, bool):
            raise TypeError(f"Expected `replay` to be a bool. Received: replay={replay!r}")
        new = self.files.new_files()
        old = [p for p in self.files.consumed_files() if tf.io.gfile.exists(p)] if replay else []
        if not new and not old:
            logger.info("tfpar.data.incremental: no new files; nothing to train")
            return []
        dataset = self.make_dataset(old + new)
        if not isinstance(dataset, tf.data.Dataset):
            raise TypeError(
                "Expected make_dataset to return a tf.data.Dataset. "
                f"Received: {type(dataset).__name__}"
            )
        logger.info("tfpar.data.incremental: training on %s%s", _summary(new),
                    f" plus {len(old)} replayed" if old else "")
        self.model.fit(dataset, **fit_kwargs)
        self.files.mark_consumed(new)
        self.manager.save()
        return new


def _summary(paths: Sequence[str]) -> str:
    shown = ", ".join(os.path.basename(p) for p in list(paths)[:3])
    return f"{len(paths)} new file(s): {shown}{', ...' if len(paths) > 3 else ''}"
