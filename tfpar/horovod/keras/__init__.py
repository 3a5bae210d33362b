"""Horovod's Keras API on TensorFlow's collectives: ``import tfpar.horovod.keras as hvd``.

Replaces ``import horovod.tensorflow.keras as hvd`` and ``import horovod.keras as hvd``; the rest
of a Horovod Keras script stays as written (no strategy scope)::

    import tfpar.horovod.keras as hvd
    hvd.init()
    model = build_model()
    opt = hvd.DistributedOptimizer(keras.optimizers.Adam(0.001 * hvd.size()))
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    model.fit(dataset, callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0),
                                  hvd.callbacks.MetricAverageCallback()])

started with ``tfpar launch --workers 2 -- python train.py``. Everything of :mod:`tfpar.horovod`
is here too, except that ``allreduce``, ``allgather``, ``broadcast`` and ``reducescatter`` take
``horovod.tensorflow.keras``'s arguments (``allreduce(value, name=None, average=None, ...)``).
Modules: ``optimizer`` (``DistributedOptimizer``, gradient accumulation), ``callbacks``,
``saving`` (``load_model``), ``collectives`` (the Keras signatures).
"""

from __future__ import annotations

from tfpar.horovod import (
    Adasum,
    Average,
    Compression,
    DistributedGradientTape,
    Max,
    Min,
    ProcessSet,
    Product,
    ReduceOp,
    Sum,
    SyncBatchNormalization,
    add_process_set,
    allgather_object,
    alltoall,
    broadcast_object,
    broadcast_variables,
    ccl_built,
    cross_rank,
    cross_size,
    cuda_built,
    ddl_built,
    elastic,
    global_process_set,
    gloo_built,
    gloo_enabled,
    grouped_allgather,
    grouped_allreduce,
    init,
    is_homogeneous,
    is_initialized,
    join,
    local_rank,
    local_size,
    mpi_built,
    mpi_enabled,
    mpi_threads_supported,
    nccl_built,
    rank,
    remove_process_set,
    rocm_built,
    shutdown,
    size,
    start_timeline,
    stop_timeline,
)
from tfpar.horovod.keras import callbacks
from tfpar.horovod.keras.collectives import (
    allgather,
    allreduce,
    broadcast,
    broadcast_global_variables,
    reducescatter,
)
from tfpar.horovod.keras.optimizer import DistributedOptimizer
from tfpar.horovod.keras.saving import load_model

__all__ = [
    "Adasum", "Average", "Compression", "DistributedGradientTape", "DistributedOptimizer", "Max", "Min",
    "ProcessSet", "Product", "ReduceOp", "Sum", "SyncBatchNormalization", "add_process_set", "allgather",
    "allgather_object", "allreduce", "alltoall", "broadcast", "broadcast_global_variables", "broadcast_object",
    "broadcast_variables", "callbacks", "ccl_built", "cross_rank", "cross_size", "cuda_built", "ddl_built",
    "elastic", "gloo_built", "gloo_enabled", "global_process_set", "grouped_allgather", "grouped_allreduce",
    "init", "is_homogeneous", "is_initialized", "join", "load_model", "local_rank", "local_size", "mpi_built",
    "mpi_enabled", "mpi_threads_supported", "nccl_built", "rank", "reducescatter", "remove_process_set",
    "rocm_built", "shutdown", "size", "start_timeline", "stop_timeline",
]
