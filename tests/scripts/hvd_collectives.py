"""Every tfpar.horovod collective on one process of a cluster, against numpy (run by tests/test_horovod.py).

Usage: ``python hvd_collectives.py OUT_DIR`` under ``tfpar.launch`` (each rank writes
``OUT_DIR/rank<r>.json``), or without a launcher (size 1: writes ``OUT_DIR/single.json``, after
checking that a collective before ``hvd.init()`` raises Horovod's ValueError).

Each rank's inputs are a function of its rank, so every rank computes the expected result of each
collective with numpy from all ranks' inputs; the JSON holds ``{check: [got, expected]}`` and the
test compares them, and compares the ranks' results with each other.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402

import tfpar.horovod as hvd  # noqa: E402

OUT = sys.argv[1]
results = {}
errors = {}

if "TF_CONFIG" not in os.environ:
    try:
        hvd.size()
    except ValueError as error:
        errors["size_before_init"] = str(error)
    try:
        hvd.allreduce([1.0])
    except ValueError as error:
        errors["allreduce_before_init"] = str(error)

hvd.init()
hvd.init()  # a second call is a no-op

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

SIZE, RANK = hvd.size(), hvd.rank()
RANKS = range(SIZE)


def check(name, got, expected):
    got = tf.convert_to_tensor(got) if isinstance(got, tf.IndexedSlices) else got
    results[name] = [np.asarray(got).tolist(), np.asarray(expected).tolist()]


def dense(r, dtype="float32"):
    return (np.arange(12).reshape(3, 4) * (r + 1) - 5 * r + 0.25).astype(dtype)


def slices(r):
    """Rank r: r + 1 slices of a [6, 2] variable (indices may repeat across ranks)."""
    indices = np.array([(r + k) % 6 for k in range(r + 1)], "int64")
    values = np.array([[r + 1.0 + k, -2.0 * r + k] for k in range(r + 1)], "float32")
    return indices, values


def slices_dense(r):
    indices, values = slices(r)
    out = np.zeros((6, 2), "float32")
    np.add.at(out, indices, values)
    return out


def uneven(r):
    return (np.arange((r + 1) * 3).reshape(r + 1, 3) + 100 * r).astype("float32")


ALL = np.stack([dense(r) for r in RANKS])
NUMPY_OPS = {"Average": ALL.mean(0), "Sum": ALL.sum(0), "Min": ALL.min(0), "Max": ALL.max(0), "Product": ALL.prod(0)}
HVD_OPS = {"Average": hvd.Average, "Sum": hvd.Sum, "Min": hvd.Min, "Max": hvd.Max, "Product": hvd.Product}

results["task"] = json.loads(os.environ["TF_CONFIG"])["task"] if "TF_CONFIG" in os.environ else None
results["topology"] = [hvd.size(), hvd.rank(), hvd.local_size(), hvd.local_rank(), hvd.cross_size(),
                       hvd.cross_rank(), hvd.is_initialized(), hvd.is_homogeneous()]


# --- allreduce: eager and in a tf.function -------------------------------------------------------
def allreduce_all(x, xi, sl_indices, sl_values):
    out = {name: hvd.allreduce(x, op=op) for name, op in HVD_OPS.items()}
    out["int_sum"] = hvd.allreduce(xi, op=hvd.Sum)
    out["int_average"] = hvd.allreduce(xi, op=hvd.Average)
    out["average_flag"] = hvd.allreduce(x, average=False)
    out["scaled"] = hvd.allreduce(x, op=hvd.Sum, prescale_factor=2.0, postscale_factor=0.5 / 3)
    out["fp16"] = hvd.allreduce(x, compression=hvd.Compression.fp16)
    out["half"] = hvd.allreduce(tf.cast(x, tf.float16), op=hvd.Sum)
    sl = tf.IndexedSlices(sl_values, sl_indices, tf.constant([6, 2], tf.int64))
    out["slices_average"] = hvd.allreduce(sl)
    out["slices_sum"] = hvd.allreduce(sl, op=hvd.Sum)
    out["slices_rows"] = tf.shape(out["slices_sum"].values)[0]
    out["slices_average"] = tf.convert_to_tensor(out["slices_average"])
    out["slices_sum"] = tf.convert_to_tensor(out["slices_sum"])
    grouped = hvd.grouped_allreduce([x, tf.cast(x, tf.float64), xi, sl], op=hvd.Sum)
    out["grouped"] = [grouped[0], grouped[1], grouped[2], tf.convert_to_tensor(grouped[3])]
    out["grouped_max"] = hvd.grouped_allreduce([x, xi], op=hvd.Max)
    return out


indices, values = slices(RANK)
ints = (np.arange(6) * (RANK + 1) + RANK).astype("int32")
ALL_INTS = np.stack([(np.arange(6) * (r + 1) + r).astype("int32") for r in RANKS])
args = (tf.constant(dense(RANK)), tf.constant(ints), tf.constant(indices), tf.constant(values))
for mode, fn in (("eager", allreduce_all), ("function", tf.function(allreduce_all))):
    out = fn(*args)
    for name in HVD_OPS:
        check(f"{mode}/allreduce_{name}", out[name], NUMPY_OPS[name])
    check(f"{mode}/allreduce_int_sum", out["int_sum"], ALL_INTS.sum(0))
    check(f"{mode}/allreduce_int_average", out["int_average"], np.trunc(ALL_INTS.sum(0) / SIZE))
    results[f"{mode}/int_average_dtype"] = out["int_average"].dtype.name
    check(f"{mode}/allreduce_average_false_is_sum", out["average_flag"], NUMPY_OPS["Sum"])
    check(f"{mode}/allreduce_scaled", out["scaled"], (2.0 * ALL).sum(0) * 0.5 / 3)
    check(f"{mode}/allreduce_fp16", out["fp16"], NUMPY_OPS["Average"])
    results[f"{mode}/fp16_dtype"] = out["fp16"].dtype.name
    check(f"{mode}/allreduce_half", tf.cast(out["half"], tf.float32), ALL.astype("float16").sum(0).astype("float32"))
    slice_sum = np.sum([slices_dense(r) for r in RANKS], axis=0)
    check(f"{mode}/indexed_slices_average", out["slices_average"], slice_sum / SIZE)
    check(f"{mode}/indexed_slices_sum", out["slices_sum"], slice_sum)
    check(f"{mode}/indexed_slices_rows", out["slices_rows"], sum(r + 1 for r in RANKS))
    for i, expected in enumerate([ALL.sum(0), ALL.sum(0), ALL_INTS.sum(0), slice_sum]):
        check(f"{mode}/grouped_sum_{i}", out["grouped"][i], expected)
    check(f"{mode}/grouped_max_0", out["grouped_max"][0], ALL.max(0))
    check(f"{mode}/grouped_max_1", out["grouped_max"][1], ALL_INTS.max(0))


# --- allgather (uneven), broadcast, alltoall, reducescatter ---------------------------------------
def gather_all(x, flags):
    return {
        "uneven": hvd.allgather(x),
        "bool": hvd.allgather(flags),
        "grouped": hvd.grouped_allgather([x, tf.cast(x, tf.int64)]),
        "broadcast_0": hvd.broadcast(x[:1], root_rank=0),
        "broadcast_last": hvd.broadcast(tf.constant(dense(RANK)), root_rank=SIZE - 1),
        "alltoall": hvd.alltoall(tf.range(2 * SIZE) + 10 * RANK),
        "alltoall_splits": hvd.alltoall(tf.range(SIZE * (SIZE + 1) // 2) + 10 * RANK,
                                        splits=tf.range(1, SIZE + 1)),
        "reducescatter": hvd.reducescatter(tf.constant(dense(RANK)), op=hvd.Sum),
    }


flags = tf.constant([RANK % 2 == 0] * (RANK + 1))
ALL_UNEVEN = np.concatenate([uneven(r) for r in RANKS])
for mode, fn in (("eager", gather_all), ("function", tf.function(gather_all))):
    out = fn(tf.constant(uneven(RANK)), flags)
    check(f"{mode}/allgather_uneven", out["uneven"], ALL_UNEVEN)
    check(f"{mode}/allgather_bool", out["bool"], np.concatenate([[r % 2 == 0] * (r + 1) for r in RANKS]))
    check(f"{mode}/grouped_allgather_0", out["grouped"][0], ALL_UNEVEN)
    check(f"{mode}/grouped_allgather_1", out["grouped"][1], ALL_UNEVEN.astype("int64"))
    check(f"{mode}/broadcast_root0", out["broadcast_0"], uneven(0)[:1])
    check(f"{mode}/broadcast_root_last", out["broadcast_last"], dense(SIZE - 1))
    received, counts = out["alltoall"]
    check(f"{mode}/alltoall", received, np.concatenate([np.arange(2 * RANK, 2 * RANK + 2) + 10 * r for r in RANKS]))
    check(f"{mode}/alltoall_counts", counts, [2] * SIZE)
    received, counts = out["alltoall_splits"]
    start = RANK * (RANK + 1) // 2
    check(f"{mode}/alltoall_splits", received,
          np.concatenate([np.arange(start, start + RANK + 1) + 10 * r for r in RANKS]))
    check(f"{mode}/alltoall_splits_counts", counts, [RANK + 1] * SIZE)
    rows = np.array_split(np.arange(3), SIZE)[RANK]
    check(f"{mode}/reducescatter", out["reducescatter"], ALL.sum(0)[rows])

check("broadcast_object", hvd.broadcast_object({"epoch": 7 + RANK, "name": "r" * (RANK + 1)}, root_rank=SIZE - 1)["epoch"],
      7 + SIZE - 1)
check("allgather_object", [o["rank"] for o in hvd.allgather_object({"rank": RANK, "pad": "x" * RANK})], list(RANKS))

# --- broadcast_variables: plain variables, eagerly and in a tf.function --------------------------
variable = tf.Variable(dense(RANK))
counter = tf.Variable(RANK + 5, dtype=tf.int64)
hvd.broadcast_variables([variable, counter], root_rank=SIZE - 1)
check("broadcast_variables_eager", variable, dense(SIZE - 1))
check("broadcast_variables_eager_int", counter, SIZE - 1 + 5)
variable.assign(dense(RANK) * 3)


@tf.function
def broadcast_in_function():
    hvd.broadcast_variables([variable], root_rank=0)


broadcast_in_function()
check("broadcast_variables_function", variable, dense(0) * 3)

# --- DistributedGradientTape: the mean of every rank's gradients ---------------------------------
keras.utils.set_random_seed(1234 + RANK)  # different initial weights on every rank
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="tanh"), keras.layers.Dense(1)])
embedding = keras.layers.Embedding(6, 2)
embedding.build((None,))
hvd.broadcast_variables(model.variables + embedding.variables, root_rank=0)
initial = [v.numpy() for v in model.trainable_variables + embedding.trainable_variables]


def batch(r):
    rng = np.random.default_rng(r)
    return (rng.normal(size=(5, 4)).astype("float32"), rng.normal(size=(5, 1)).astype("float32"),
            np.array([r % 6, (r + 2) % 6], "int64"))


def loss_fn(x, y, ids):
    return tf.reduce_mean(tf.square(model(x) - y)) + tf.reduce_sum(embedding(ids) ** 2)


def local_gradients(x, y, ids):
    with tf.GradientTape() as tape:
        loss = loss_fn(x, y, ids)
    return tape.gradient(loss, model.trainable_variables + embedding.trainable_variables)


def distributed_gradients(x, y, ids, op=hvd.Average, sparse_as_dense=False):
    with tf.GradientTape() as tape:
        loss = loss_fn(x, y, ids)
    tape = hvd.DistributedGradientTape(tape, op=op, sparse_as_dense=sparse_as_dense)
    return tape.gradient(loss, model.trainable_variables + embedding.trainable_variables)


expected = [np.mean([tf.convert_to_tensor(g).numpy() for g in grads], axis=0)
            for grads in zip(*[local_gradients(*map(tf.constant, batch(r))) for r in RANKS])]
mine = tuple(map(tf.constant, batch(RANK)))
for mode, fn in (("eager", distributed_gradients), ("function", tf.function(distributed_gradients))):
    grads = fn(*mine)
    results[f"{mode}/tape_sparse_embedding_gradient"] = isinstance(grads[-1], tf.IndexedSlices)
    for i, (g, e) in enumerate(zip(grads, expected)):
        check(f"{mode}/tape_gradient_{i}", g, e)
dense_grads = tf.function(lambda *a: distributed_gradients(*a, op=hvd.Sum, sparse_as_dense=True))(*mine)
results["tape_sparse_as_dense_is_dense"] = not isinstance(dense_grads[-1], tf.IndexedSlices)
for i, (g, e) in enumerate(zip(dense_grads, expected)):
    check(f"tape_sum_gradient_{i}", g, np.asarray(e) * SIZE)

# --- A Horovod TF2 training step (tensorflow2_keras_mnist style, lowered to a custom loop) --------
keras.utils.set_random_seed(99 + RANK)
net = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)])
opt = keras.optimizers.SGD(0.05 * SIZE)


@tf.function
def training_step(x, y, first_batch):
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(net(x, training=True) - y))
    tape = hvd.DistributedGradientTape(tape)
    grads = tape.gradient(loss, net.trainable_variables)
    opt.apply_gradients(zip(grads, net.trainable_variables))
    if first_batch:
        hvd.broadcast_variables(net.variables, root_rank=0)
        hvd.broadcast_variables(opt.variables, root_rank=0)
    return loss


rng = np.random.default_rng(RANK)
losses = []
for step in range(6):
    x = rng.normal(size=(8, 4)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    losses.append(float(hvd.allreduce(training_step(x, y, step == 0), op=hvd.Average)))
results["training_losses"] = losses
results["training_weights"] = [float(np.sum(v.numpy().astype("float64"))) for v in net.trainable_variables]

# --- Unsupported features raise, naming the alternative ------------------------------------------
attempts = {
    "adasum": lambda: hvd.allreduce(tf.ones([2]), op=hvd.Adasum),
    "join": hvd.join,
    "elastic": lambda: hvd.elastic.run,
    "process_set": lambda: hvd.add_process_set([0]),
    "slices_max": lambda: hvd.allreduce(tf.IndexedSlices(tf.ones([1, 2]), tf.constant([0]), tf.constant([3, 2])),
                                        op=hvd.Max),
    "mpi": hvd.mpi_threads_supported,
    "init_comm": lambda: hvd.init(comm=[0, 1]),
    "timeline": lambda: hvd.start_timeline("/tmp/t.json"),
    "sync_bn": hvd.SyncBatchNormalization,
    "scalar_allgather": lambda: hvd.allgather(tf.constant(1.0)),
    "root_rank": lambda: hvd.broadcast(tf.ones([1]), root_rank=SIZE),
}
for name, attempt in attempts.items():
    try:
        attempt()
    except (NotImplementedError, ValueError) as error:
        errors[name] = f"{type(error).__name__}: {error}"
    else:
        errors[name] = "no error"
results["built"] = [hvd.mpi_built(), hvd.gloo_built(), hvd.mpi_enabled(), hvd.gloo_enabled()]

hvd.shutdown()
results["after_shutdown"] = hvd.is_initialized()
hvd.init()
check("allreduce_after_reinit", hvd.allreduce(tf.constant([float(RANK)]), op=hvd.Sum), [sum(RANKS)])

name = f"rank{RANK}" if "TF_CONFIG" in os.environ else "single"
with open(os.path.join(OUT, f"{name}.json"), "w") as handle:
    json.dump({"results": results, "errors": errors}, handle)
print(f"rank {RANK} of {SIZE}: {len(results)} results written", flush=True)
