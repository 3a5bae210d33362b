"""``hvd.elastic`` is not supported: any use raises NotImplementedError naming the alternative.

Horovod Elastic adds and removes workers during training. tfpar's fault tolerance restarts the
cluster instead: ``tfpar launch --max-restarts K`` with ``keras.callbacks.BackupAndRestore``
resumes exactly from the last backup (README, "Fault tolerance").
"""

from __future__ import annotations

from typing import Any

MESSAGE = (
    "hvd.elastic (Horovod Elastic: workers joining and leaving during training) is not supported by "
    "tfpar.horovod. Use a fixed-size cluster with restarts instead: `tfpar launch --max-restarts K` and "
    "keras.callbacks.BackupAndRestore, which resumes exactly from the last backup."
)


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    raise NotImplementedError(f"{MESSAGE} Received: hvd.elastic.{name}")
