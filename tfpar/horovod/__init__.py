"""Horovod's TensorFlow API on TensorFlow's own collectives: ``import tfpar.horovod as hvd``.

A Horovod TF2 script runs with its import line changed from ``import horovod.tensorflow as hvd``::

    import tfpar.horovod as hvd
    hvd.init()                                   # first: ranks from tfpar launch / TF_CONFIG / Slurm

    @tf.function
    def train_step(images, labels, first_batch):
        with tf.GradientTape() as tape:
            loss = loss_fn(labels, model(images, training=True))
        tape = hvd.DistributedGradientTape(tape)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        if first_batch:
            hvd.broadcast_variables(model.variables, root_rank=0)
        return loss

and is started with ``tfpar launch --workers 2 -- python train.py``. Without a launcher the script
runs as size 1, rank 0, as under Horovod.

``init()`` creates the cluster's ``tf.distribute.MultiWorkerMirroredStrategy`` (through
``tfpar.get_strategy("multi_worker")``, one device per process); every collective runs in its
replica context (``ReplicaContext.all_reduce`` / ``all_gather``), from eager code or inside the
user's ``tf.function``, with plain variables (no strategy scope). Modules: ``_state`` (init and
ranks), ``_topology`` (local / cross ranks), ``_engine`` (the one exchange primitive),
``_dtypes``, ``ops``, ``compression``, ``process_sets``, ``collectives``, ``functions``
(broadcast_variables, objects), ``tape`` (DistributedGradientTape), ``unsupported``, ``elastic``.

Differences from Horovod: collectives are matched by order, not by name; ``Adasum``, ``join``,
process sets, elastic training, the timeline and MPI/Gloo-specific calls raise
NotImplementedError naming the nearest alternative; ``alltoall`` and ``reducescatter`` are built
on all-gather / all-reduce; the results are not differentiable.
"""

from __future__ import annotations

from tfpar.horovod import elastic
from tfpar.horovod._run import run as run  # horovod.run (explicit re-export; one line, outside __all__)
from tfpar.horovod._state import (
    cross_rank,
    cross_size,
    init,
    is_homogeneous,
    is_initialized,
    local_rank,
    local_size,
    rank,
    shutdown,
    size,
)
from tfpar.horovod.collectives import (
    allgather,
    allreduce,
    alltoall,
    broadcast,
    grouped_allgather,
    grouped_allreduce,
    reducescatter,
)
from tfpar.horovod.compression import Compression
from tfpar.horovod.functions import allgather_object, broadcast_object, broadcast_variables
from tfpar.horovod.ops import Adasum, Average, Max, Min, Product, ReduceOp, Sum
from tfpar.horovod.process_sets import ProcessSet, add_process_set, global_process_set, remove_process_set
from tfpar.horovod.tape import DistributedGradientTape
from tfpar.horovod.unsupported import (
    SyncBatchNormalization,
    ccl_built,
    cuda_built,
    ddl_built,
    gloo_built,
    gloo_enabled,
    join,
    mpi_built,
    mpi_enabled,
    mpi_threads_supported,
    nccl_built,
    rocm_built,
    start_timeline,
    stop_timeline,
)

__all__ = [
    "Adasum", "Average", "Compression", "DistributedGradientTape", "Max", "Min", "ProcessSet", "Product",
    "ReduceOp", "Sum", "SyncBatchNormalization", "add_process_set", "allgather", "allgather_object",
    "allreduce", "alltoall", "broadcast", "broadcast_object", "broadcast_variables", "ccl_built",
    "cross_rank", "cross_size", "cuda_built", "ddl_built", "elastic", "gloo_built", "gloo_enabled",
    "global_process_set", "grouped_allgather", "grouped_allreduce", "init", "is_homogeneous",
    "is_initialized", "join", "local_rank", "local_size", "mpi_built", "mpi_enabled", "mpi_threads_supported",
    "nccl_built", "rank", "reducescatter", "remove_process_set", "rocm_built", "shutdown", "size",
    "start_timeline", "stop_timeline",
]
