"""chief-only-files: under MultiWorkerMirroredStrategy only the chief writes files.

Keras 3's ModelCheckpoint, BackupAndRestore and TensorBoard have no chief/worker logic (tf-keras
had it), so every worker writes the same files. Every worker must still take part in a save
(reading some variables all-reduces), so on non-chief workers ``Model.save`` / ``save_weights``
write to a temporary sibling that is removed (``tfpar.cluster.write_path``, the multi-worker
tutorial's pattern), TensorBoard logs to one, and ModelCheckpoint creates its directory
idempotently (upstream checks, then creates: "FileExistsError" when two workers race). A save
returns on a non-chief worker only once the chief's file is complete (``_sync``), so the
tutorial's "save, then load on every worker" never finds the file missing.
BackupAndRestore's chief-only metadata and cleanup are part of exact-resume.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import tensorflow as tf

from tfpar import cluster as cluster_lib
from tfpar._compat import _context, _patching, _sync

SAVE = "keras:Model.save"
SAVE_WEIGHTS = "keras:Model.save_weights"
CHECKPOINT_SAVE = "keras:callbacks.ModelCheckpoint._save_model"
TENSORBOARD_SET_MODEL = "keras:callbacks.TensorBoard.set_model"
TENSORBOARD_TRAIN_END = "keras:callbacks.TensorBoard.on_train_end"


def _chief_only_save(target: str) -> Callable[..., Any]:
    def save(self: Any, filepath: Any, *args: Any, **kwargs: Any) -> Any:
        upstream = INTERCEPTION.original(target)
        if _context.multi_worker_chief(self):
            result = upstream(self, filepath, *args, **kwargs)
            _sync.announce("save")  # the file is complete: the other workers may return
            return result
        if not _context.non_chief_worker(self):
            return upstream(self, filepath, *args, **kwargs)
        resolver = self._distribute_strategy.cluster_resolver
        written = cluster_lib.write_path(str(filepath), cluster=resolver)
        try:
            result = upstream(self, written, *args, **kwargs)
        finally:
            cluster_lib.cleanup_write_path(str(filepath), cluster=resolver)
        # Return only once the chief's file is complete, so a load right after it finds it.
        _sync.await_announcement("save", f"saving {filepath}")
        return result

    return save


def _checkpoint_save_model(self: Any, epoch: int, batch: Any, logs: Any) -> None:
    if _context.managed_model(self):
        directory = os.path.dirname(self._get_file_path(epoch, batch, logs))
        if directory:
            tf.io.gfile.makedirs(directory)
    INTERCEPTION.original(CHECKPOINT_SAVE)(self, epoch, batch, logs)


def _tensorboard_set_model(self: Any, model: Any) -> None:
    INTERCEPTION.original(TENSORBOARD_SET_MODEL)(self, model)
    self._tfpar_temp_log_dir = None
    if _context.non_chief_worker(model):
        resolver = model._distribute_strategy.cluster_resolver
        self._tfpar_temp_log_dir = self.log_dir
        self._log_write_dir = cluster_lib.write_path(self.log_dir, cluster=resolver)
        self._train_dir = os.path.join(self._log_write_dir, "train")
        self._val_dir = os.path.join(self._log_write_dir, "validation")


def _tensorboard_on_train_end(self: Any, logs: Any = None) -> None:
    INTERCEPTION.original(TENSORBOARD_TRAIN_END)(self, logs)
    if getattr(self, "_tfpar_temp_log_dir", None):
        cluster_lib.cleanup_write_path(
            self._tfpar_temp_log_dir, cluster=self.model._distribute_strategy.cluster_resolver
        )


INTERCEPTION = _patching.declare(_patching.Interception(
    slug="chief-only-files",
    summary="under multi-worker only the chief writes checkpoints, saved models and TensorBoard logs; "
    "the other workers write to temporary places that are removed",
    targets=(SAVE, SAVE_WEIGHTS, CHECKPOINT_SAVE, TENSORBOARD_SET_MODEL, TENSORBOARD_TRAIN_END),
    upstream_issue="none: Keras 3 callbacks have no chief/worker logic; tf-keras had it",
    test="tests/test_fault_tolerance.py::test_only_the_chief_writes_checkpoints_logs_and_saved_models",
    patches={
        SAVE: _chief_only_save(SAVE),
        SAVE_WEIGHTS: _chief_only_save(SAVE_WEIGHTS),
        CHECKPOINT_SAVE: _checkpoint_save_model,
        TENSORBOARD_SET_MODEL: _tensorboard_set_model,
        TENSORBOARD_TRAIN_END: _tensorboard_on_train_end,
    },
))
