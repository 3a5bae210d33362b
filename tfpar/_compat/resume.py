"""exact-resume: BackupAndRestore resumes mid-epoch exactly; SIGTERM preemption at an agreed step.

Keras 3's BackupAndRestore restores at epoch granularity: after a mid-epoch save it replays the
whole interrupted epoch on top of weights that already contain part of it, and a save in the first
epoch of a resumed run records epoch 0 (``_current_epoch`` only moves at epoch end). Under tfpar
the backup records how many steps of the epoch it holds and the shuffle seed (shared-shuffle); a
resumed fit consumes those steps' data without training on them (:func:`skipping`), so the result
equals an uninterrupted run bit for bit. Under multi_worker only the chief writes the metadata and
deletes the backup, and a SIGTERM on any worker makes all workers save at an agreed step
(``tf.distribute.experimental.PreemptionCheckpointHandler``) and exit with
:data:`PREEMPTED_EXIT_CODE`, for ``tfpar launch --max-restarts`` to restart.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

import tensorflow as tf

from tfpar._compat import _context, _patching, _sync, internals

PREEMPTED_EXIT_CODE = 42  # what a preempted worker exits with after the agreed save

_BACKUP = "keras:callbacks.BackupAndRestore"
TRAIN_BEGIN = f"{_BACKUP}.on_train_begin"
EPOCH_BEGIN = f"{_BACKUP}.on_epoch_begin"
TRAIN_BATCH_END = f"{_BACKUP}.on_train_batch_end"
SAVE_MODEL = f"{_BACKUP}._save_model"
TRAIN_END = f"{_BACKUP}.on_train_end"


def resume(model: Any, epoch: int, steps_done: int, seed: int | None) -> None:
    """Makes the running fit continue at `epoch`, skipping its first `steps_done` steps."""
    model._initial_epoch = epoch
    state = _context.fit_state(model)
    if state is None:
        return
    state.skip_steps = steps_done
    if seed is not None:
        state.seed.assign(seed)


def skipping(model: Any, function: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Consumes, without training, the steps a resumed epoch already trained before its backup."""

    def train_function(iterator: Any) -> Any:
        state = _context.fit_state(model)
        if state is None or state.skip_steps <= 0:
            return function(iterator)
        for _ in range(min(state.skip_steps, int(model.steps_per_execution))):
            next(iterator)
            state.skip_steps -= 1
        return model.get_metrics_result()

    return train_function


def _backup_on_train_begin(self: Any, logs: Any = None) -> None:
    INTERCEPTION.original(TRAIN_BEGIN)(self, logs)
    if not _context.managed_model(self):
        return
    self._tfpar_in_batch = False
    metadata = {}
    if tf.io.gfile.exists(self._training_metadata_path):
        with tf.io.gfile.GFile(self._training_metadata_path) as handle:
            metadata = json.loads(handle.read())
    if "tfpar_steps_done" in metadata:
        resume(self.model, int(metadata["epoch"]), int(metadata["tfpar_steps_done"]), metadata.get("tfpar_seed"))
        self._current_epoch = int(metadata["epoch"])
        self._last_batch_seen = int(metadata["batch"])
    self._tfpar_previous_sigterm = signal.getsignal(signal.SIGTERM)
    self._tfpar_preemption = _preemption_handler(self)


def _backup_on_epoch_begin(self: Any, epoch: int, logs: Any = None) -> None:
    # Upstream only updates _current_epoch at epoch end, so a mid-epoch save in the first epoch of
    # a resumed run records epoch 0 and a second restart starts over.
    if _context.managed_model(self):
        self._current_epoch = epoch


def _backup_on_train_batch_end(self: Any, batch: int, logs: Any = None) -> None:
    self._tfpar_in_batch, self._tfpar_batch = True, batch
    try:
        INTERCEPTION.original(TRAIN_BATCH_END)(self, batch, logs)
        handler = getattr(self, "_tfpar_preemption", None)
        if handler is not None:
            handler.save_checkpoint_if_preempted()
    finally:
        self._tfpar_in_batch = False


def _backup_save_model(self: Any) -> None:
    if not _context.managed_model(self):
        return INTERCEPTION.original(SAVE_MODEL)(self)
    chief = not _context.non_chief_worker(self.model)
    if chief:
        tf.io.gfile.makedirs(self.backup_dir)
        if self.double_checkpoint:
            for path in (self._weights_path, self._training_metadata_path):
                if tf.io.gfile.exists(path):
                    tf.io.gfile.copy(path, f"{path}.bkp", overwrite=True)
    self.model.save_weights(filepath=self._weights_path, overwrite=True)  # chief-only inside
    if not chief:
        return None
    in_batch = getattr(self, "_tfpar_in_batch", False)
    batch = getattr(self, "_tfpar_batch", self._last_batch_seen) if in_batch else 0
    state = _context.fit_state(self.model)
    metadata = {
        "epoch": self._current_epoch,
        "batch": batch,
        # Steps of `epoch` the saved weights contain (0 at an epoch boundary): a resumed run
        # skips them instead of training them twice (upstream replays the whole epoch).
        "tfpar_steps_done": batch + 1 if in_batch else 0,
        "tfpar_seed": int(state.seed.numpy()) if state is not None else None,
    }
    with tf.io.gfile.GFile(self._training_metadata_path, "w") as handle:
        handle.write(json.dumps(metadata))
    return None


def _backup_on_train_end(self: Any, logs: Any = None) -> None:
    handler = getattr(self, "_tfpar_preemption", None)
    if handler is not None:
        # The handler took over SIGTERM for this fit: give it back, and end its peer-watcher
        # thread now (left alone it stays blocked on the coordination service and prints
        # "Exception in thread PeerTerminationWatcher ... Socket closed" when the chief exits).
        signal.signal(signal.SIGTERM, self._tfpar_previous_sigterm)
        self._tfpar_preemption = None
        internals.stop_preemption_watcher(handler)
    if not _context.managed_model(self):
        return INTERCEPTION.original(TRAIN_END)(self, logs)
    multi_worker = internals.in_multi_worker_mode(self.model._distribute_strategy)
    if multi_worker:
        # No worker may still be writing or removing its temporary files inside the backup
        # directory when the chief removes it ("FileNotFoundError: 'workertemp_1'").
        _sync.barrier("BackupAndRestore end of fit")
    if not _context.non_chief_worker(self.model):
        if handler is not None:
            for key in internals.preemption_keys():  # a later fit's handler starts afresh
                try:
                    internals.delete_key(key)
                except tf.errors.OpError:
                    pass
        INTERCEPTION.original(TRAIN_END)(self, logs)  # only the chief removes the backup
    if multi_worker:
        _sync.barrier("BackupAndRestore backup removed")
    return None


def _preemption_handler(callback: Any) -> Any:
    """A PreemptionCheckpointHandler that saves through the callback at an agreed step."""
    strategy = callback.model._distribute_strategy
    if not internals.in_multi_worker_mode(strategy) or threading.current_thread() is not threading.main_thread():
        return None

    def save() -> None:
        callback._tfpar_in_batch = True
        callback._save_model()
        # TF removes a non-chief's checkpoint directory after the save; tfpar saved through the
        # callback instead of TF's manager (and cleaned up after itself), so recreate it.
        tf.io.gfile.makedirs(handler._write_checkpoint_manager.directory)

    config = tf.distribute.experimental.TerminationConfig(
        exit_fn=lambda: sys.exit(PREEMPTED_EXIT_CODE), save_fn=save
    )
    # The handler restores its step counter from (and, non-chief, writes to a temporary sibling
    # of) this directory; tfpar's own save goes through `save` above.
    counter = tf.train.Checkpoint(step=tf.Variable(0, dtype=tf.int64))
    handler = tf.distribute.experimental.PreemptionCheckpointHandler(
        strategy.cluster_resolver,
        counter,
        checkpoint_dir=os.path.join(callback.backup_dir, "preemption"),
        termination_config=config,
    )
    return handler


INTERCEPTION = _patching.declare(_patching.Interception(
    slug="exact-resume",
    summary="BackupAndRestore resumes mid-epoch exactly (bit for bit), writes its metadata and deletes "
    "the backup on the chief only; SIGTERM preemption saves at a step all workers agree on",
    targets=(TRAIN_BEGIN, EPOCH_BEGIN, TRAIN_BATCH_END, SAVE_MODEL, TRAIN_END),
    upstream_issue="none: Keras 3 BackupAndRestore restores at epoch granularity by design",
    test="tests/test_resume.py::test_resume_after_a_crash_equals_an_uninterrupted_run",
    patches={
        TRAIN_BEGIN: _backup_on_train_begin,
        EPOCH_BEGIN: _backup_on_epoch_begin,
        TRAIN_BATCH_END: _backup_on_train_batch_end,
        SAVE_MODEL: _backup_save_model,
        TRAIN_END: _backup_on_train_end,
    },
))
