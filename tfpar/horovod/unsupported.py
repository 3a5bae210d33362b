"""Horovod features tfpar.horovod does not have: each raises an error naming the nearest alternative.

``join`` cannot be honest here: TensorFlow's collectives are matched by order, so a process that
ran out of data cannot stand in for collectives it does not know the others will issue. The
build queries (``mpi_built`` ...) answer truthfully: there is no MPI, Gloo, DDL or oneCCL.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

__all__ = [
    "SyncBatchNormalization", "ccl_built", "cuda_built", "ddl_built", "gloo_built", "gloo_enabled", "join",
    "mpi_built", "mpi_enabled", "mpi_threads_supported", "nccl_built", "rocm_built", "start_timeline",
    "stop_timeline",
]


def join(device: str = "") -> int:
    """Not supported: raises NotImplementedError naming the alternative.

    Horovod's ``join`` lets a rank that ran out of data take part in the other ranks' remaining
    all-reduces with zeros. TensorFlow's collectives are matched by their order, not negotiated,
    so a finished process cannot know which collectives the others still issue.

    Args:
        device: Horovod's device argument.

    Raises:
        NotImplementedError: Always.

    Example:
    >>> hvd.join()
    Traceback (most recent call last):
    NotImplementedError: ...
    """
    raise NotImplementedError(
        "hvd.join() is not supported by tfpar.horovod: TensorFlow's collectives are matched by order, so a "
        "process that ran out of data cannot stand in for the others' remaining all-reduces. Give every rank "
        "the same number of steps instead: e.g. dataset.repeat() with a fixed steps count, or equal shards "
        "(dataset.shard(hvd.size(), hvd.rank()) of a dataset whose size divides evenly, with drop_remainder=True)."
    )


def _no(what: str, alternative: str) -> NotImplementedError:
    return NotImplementedError(f"{what} is not supported by tfpar.horovod. {alternative}")


def mpi_threads_supported() -> bool:
    """Not supported (there is no MPI): raises NotImplementedError.

    Example:
    >>> hvd.mpi_threads_supported()
    Traceback (most recent call last):
    NotImplementedError: ...
    """
    raise _no("hvd.mpi_threads_supported() (an MPI query)", "There is no MPI: processes talk through TensorFlow's "
              "gRPC collectives; query hvd.size() / hvd.rank() instead.")


def start_timeline(file_path: str, mark_cycles: bool = False) -> None:
    """Not supported: raises NotImplementedError naming ``tf.profiler``.

    Example:
    >>> hvd.start_timeline("/tmp/timeline.json")
    Traceback (most recent call last):
    NotImplementedError: ...
    """
    raise _no("The Horovod timeline", "Use tf.profiler.experimental.start(logdir) / stop(); the "
              "collectives appear as CollectiveReduceV2 / CollectiveGatherV2 ops.")


def stop_timeline() -> None:
    """Not supported: raises NotImplementedError naming ``tf.profiler``.

    Example:
    >>> hvd.stop_timeline()
    Traceback (most recent call last):
    NotImplementedError: ...
    """
    start_timeline("")


class SyncBatchNormalization:
    """Not supported: raises NotImplementedError naming the alternative.

    Example:
    >>> hvd.SyncBatchNormalization()
    Traceback (most recent call last):
    NotImplementedError: ...
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise _no("hvd.SyncBatchNormalization", "Train under tfpar.scope('multi_worker', sync_batchnorm=True) "
                  "(keras.layers.BatchNormalization(synchronized=True) under a tf.distribute strategy).")


def mpi_built() -> bool:
    """False: tfpar.horovod has no MPI. Example: ``hvd.mpi_built()`` is False."""
    return False


def mpi_enabled() -> bool:
    """False: tfpar.horovod has no MPI. Example: ``hvd.mpi_enabled()`` is False."""
    return False


def gloo_built() -> bool:
    """False: tfpar.horovod has no Gloo. Example: ``hvd.gloo_built()`` is False."""
    return False


def gloo_enabled() -> bool:
    """False: tfpar.horovod has no Gloo. Example: ``hvd.gloo_enabled()`` is False."""
    return False


def ddl_built() -> bool:
    """False: no IBM DDL. Example: ``hvd.ddl_built()`` is False."""
    return False


def ccl_built() -> bool:
    """False: no oneCCL. Example: ``hvd.ccl_built()`` is False."""
    return False


def nccl_built() -> bool:
    """Whether TensorFlow was built with CUDA (its collectives then use NCCL on GPUs).

    Example:
    >>> hvd.nccl_built()
    False
    """
    return bool(tf.test.is_built_with_cuda())


def cuda_built() -> bool:
    """Whether TensorFlow was built with CUDA. Example: ``hvd.cuda_built()``."""
    return bool(tf.test.is_built_with_cuda())


def rocm_built() -> bool:
    """Whether TensorFlow was built with ROCm. Example: ``hvd.rocm_built()``."""
    return bool(tf.test.is_built_with_rocm())
