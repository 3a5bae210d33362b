"""Multi-worker throughput: tfpar.scope("multi_worker") Keras fit vs the no-communication limit vs
a hand-written MultiWorkerMirroredStrategy custom training loop vs a Horovod-style script on
``tfpar.horovod``, each with and without gradient accumulation.

Each repetition starts, for every variant in turn (interleaved), N processes at the same time:

* ``limit``: N independent single-process Keras fits (no strategy, no communication), one per
  process: the throughput N workers could reach if all-reduce were free.
* ``tfpar``: N workers of a ``tfpar.launch`` cluster running plain Keras ``model.fit`` under
  ``tfpar.scope("multi_worker")``.
* ``hand``: N workers running the TF tutorial's custom loop (``strategy.run`` in a
  ``tf.function`` over a distributed dataset, Keras layers and optimizer).
* ``hvd``: N ``tfpar.launch`` workers running a Horovod-style script (``import tfpar.horovod.keras
  as hvd``, ``hvd.init()``): a plain Keras model (no strategy scope) compiled with
  ``hvd.DistributedOptimizer(opt)``, ``BroadcastGlobalVariablesCallback(0)``, ``model.fit`` on the
  rank's shard (``dataset.shard(hvd.size(), hvd.rank())``) batched by the per-worker batch.
* ``hvd-kK``: the same with ``backward_passes_per_step=K, average_aggregated_gradients=True``
  (K = 2, 4, 8): one all-reduce per K steps.
* ``tfpar-kK``: ``tfpar`` with the optimizer's ``gradient_accumulation_steps=K`` (tfpar then
  all-reduces once per K steps).

A step of an accumulating variant is one micro-batch of the per-worker batch, so its examples/s
count the same examples as the others'. Its warm-up and timed steps are rounded up to multiples
of K, so that the timed window holds exactly timed steps / K all-reduces and updates.

Every process times its own steady-state steps (after warm-up), so process start-up is excluded;
the variant's throughput is N x per-worker batch x timed steps / the slowest worker's time. Each
process gets ``--threads`` intra- and inter-op threads. Median over ``--repeats``. All variants
read the same in-memory ``tf.data`` pipeline, batched with ``drop_remainder=True`` as the TF
multi-worker tutorial does.

Usage: python benchmarks/multi_worker.py [--workers 2] [--threads 1] [--repeats 5] [--quick]
       [--variants limit,tfpar,hand,hvd,hvd-k2,hvd-k4,hvd-k8,tfpar-k2,tfpar-k4,tfpar-k8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("limit", "tfpar", "hand", "hvd", "hvd-k2", "hvd-k4", "hvd-k8", "tfpar-k2", "tfpar-k4", "tfpar-k8")
MODELS = {
    "cnn": "small CNN (32x32x3, 2 conv + 2 dense, 545k params: 2.2 MB of gradients per step)",
    "cnn-gap": "small CNN (32x32x3, 3 conv + global average pooling + 1 dense, 57k params: 0.23 MB of "
               "gradients per step)",
}


def _split(variant: str) -> tuple[str, int]:
    """("hvd-k4" -> ("hvd", 4)): the variant's family and its accumulation steps (1 without)."""
    family, _, steps = variant.partition("-k")
    return family, int(steps or 1)


def _worker(args: argparse.Namespace) -> None:
    """One process of one variant: trains and writes its timing to args.out."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    import keras
    import numpy as np

    import tfpar

    family, accumulation = _split(args.variant)
    if family == "hvd":
        import tfpar.horovod.keras as hvd

        hvd.init()  # before any TensorFlow operation, as in Horovod's examples
        strategy = tf.distribute.get_strategy()  # no strategy scope: the optimizer all-reduces
        workers = hvd.size()
    else:
        if family == "tfpar":
            strategy = tfpar.get_strategy("multi_worker")
        elif family == "hand":
            strategy = tf.distribute.MultiWorkerMirroredStrategy()
        else:
            strategy = tf.distribute.get_strategy()
        workers = strategy.num_replicas_in_sync
    per_worker = args.batch
    steps = args.warmup + args.steps
    rng = np.random.default_rng(0)
    x = rng.normal(size=(per_worker * workers * steps, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, len(x))

    def build() -> keras.Model:
        keras.utils.set_random_seed(1)
        if args.model == "cnn":  # 545k parameters, most in the first dense layer
            head = [keras.layers.Flatten(), keras.layers.Dense(128, activation="relu")]
        else:  # "cnn-gap": one more convolution, no wide dense layer: 57k parameters
            head = [keras.layers.Conv2D(64, 3, activation="relu"), keras.layers.GlobalAveragePooling2D()]
        return keras.Sequential(
            [
                keras.Input((32, 32, 3)),
                keras.layers.Conv2D(32, 3, activation="relu"),
                keras.layers.MaxPooling2D(),
                keras.layers.Conv2D(64, 3, activation="relu"),
                keras.layers.MaxPooling2D(),
                *head,
                keras.layers.Dense(10),
            ]
        )

    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    marks: list[float] = []
    cpu_marks: list[float] = []

    class Clock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch + 1 in (args.warmup, steps):
                marks.append(time.perf_counter())
                cpu_marks.append(time.process_time())

    if family in ("tfpar", "limit"):
        scope = tfpar.scope(strategy) if family == "tfpar" else strategy.scope()
        with scope:
            model = build()
            options = {"gradient_accumulation_steps": accumulation} if accumulation > 1 else {}
            model.compile(optimizer=keras.optimizers.SGD(0.01, **options), loss=loss_fn)

        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(per_worker * workers, drop_remainder=True)
        model.fit(dataset, epochs=1, verbose=0, callbacks=[Clock()])
    elif family == "hvd":
        model = build()
        options = (
            {"backward_passes_per_step": accumulation, "average_aggregated_gradients": True}
            if accumulation > 1 else {}
        )
        model.compile(optimizer=hvd.DistributedOptimizer(keras.optimizers.SGD(0.01), **options), loss=loss_fn)
        dataset = (
            tf.data.Dataset.from_tensor_slices((x, y))
            .shard(hvd.size(), hvd.rank())
            .batch(per_worker, drop_remainder=True)
        )
        model.fit(
            dataset, epochs=1, verbose=0, callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0), Clock()]
        )
    else:
        with strategy.scope():
            model = build()
            optimizer = keras.optimizers.SGD(0.01)
        global_batch = per_worker * workers
        dataset = strategy.experimental_distribute_dataset(
            tf.data.Dataset.from_tensor_slices((x, y)).batch(global_batch, drop_remainder=True)
        )

        @tf.function
        def train_step(batch):
            def step(inputs):
                features, labels = inputs
                with tf.GradientTape() as tape:
                    per_example = keras.losses.sparse_categorical_crossentropy(
                        labels, model(features, training=True), from_logits=True
                    )
                    loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
                grads = tape.gradient(loss, model.trainable_variables)
                optimizer.apply_gradients(zip(grads, model.trainable_variables))
                return loss

            return strategy.run(step, args=(batch,))

        for index, batch in enumerate(dataset):
            train_step(batch)
            if index + 1 in (args.warmup, steps):
                _ = float(model.trainable_variables[0][0, 0, 0, 0].numpy())  # wait for the step
                marks.append(time.perf_counter())
                cpu_marks.append(time.process_time())
    index = json.loads(os.environ["TF_CONFIG"])["task"]["index"] if "TF_CONFIG" in os.environ else args.index
    out = Path(args.out) / f"{args.variant}_{index}.json"
    out.write_text(json.dumps(
        {"seconds": marks[1] - marks[0], "cpu_seconds": cpu_marks[1] - cpu_marks[0], "steps": args.steps}
    ))


def _run_variant(variant: str, args: argparse.Namespace, workdir: Path) -> tuple[float, float]:
    """Runs one variant once; returns examples/s over all workers and CPU ms per step per worker."""
    outputs = [workdir / f"{variant}_{i}.json" for i in range(args.workers)]
    for path in outputs:
        path.unlink(missing_ok=True)

    accumulation = _split(variant)[1]
    warmup, steps = (-(-n // accumulation) * accumulation for n in (args.warmup, args.steps))

    def child(index: int = 0) -> list[str]:
        return [
            sys.executable, __file__, "--child", "--variant", variant, "--out", str(workdir),
            "--index", str(index), "--threads", str(args.threads), "--batch", str(args.batch),
            "--steps", str(steps), "--warmup", str(warmup), "--model", args.model,
        ]

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    if variant == "limit":
        processes = [
            subprocess.Popen(child(i), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            for i in range(args.workers)
        ]
        try:
            for process in processes:
                _, err = process.communicate(timeout=args.timeout)
                if process.returncode:
                    raise RuntimeError(f"limit worker failed:\n{err.decode()[-3000:]}")
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait(timeout=30)
    else:
        from tfpar import launch

        log = workdir / f"{variant}.log"
        with open(log, "w") as handle:
            code = launch.launch(child(), workers=args.workers, timeout=args.timeout, env=env, output=handle)
        if code:
            raise RuntimeError(f"{variant} cluster failed ({code}):\n{log.read_text()[-3000:]}")
    results = [json.loads(path.read_text()) for path in outputs]
    slowest = max(r["seconds"] for r in results)
    cpu_ms = 1000 * statistics.mean(r["cpu_seconds"] for r in results) / steps
    return args.workers * args.batch * steps / slowest, cpu_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64, help="per-worker batch size")
    parser.add_argument("--model", choices=("cnn", "cnn-gap"), default="cnn",
                        help="cnn: 2 conv + 2 dense, 545k parameters (default); cnn-gap: 3 conv + "
                             "global average pooling + 1 dense, 57k parameters (10%% of the bytes to "
                             "all-reduce, more compute)")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--quick", action="store_true", help="2 repeats of 15 steps (smoke run)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated variants to run, in this order (default: all: {','.join(VARIANTS)})")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _worker(args)
        return
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants or len(set(variants)) != len(variants):
        parser.error(f"--variants: each of {', '.join(VARIANTS)} at most once; received {args.variants!r}")
    if args.quick:
        args.repeats, args.steps, args.warmup = 2, 15, 5
    rates: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    load_before = os.getloadavg()
    started_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for variant in variants:
                started = time.perf_counter()
                rate, cpu_ms = _run_variant(variant, args, Path(tmp))
                rates[variant].append(rate)
                cpu[variant].append(cpu_ms)
                print(
                    f"repeat {repeat + 1}/{args.repeats} {variant:8s} {rate:8.1f} examples/s, "
                    f"{1000 * args.workers * args.batch / rate:5.1f} ms/step, {cpu_ms:5.1f} CPU ms/step/worker "
                    f"({time.perf_counter() - started:.0f} s)",
                    file=sys.stderr,
                )
    load_after = os.getloadavg()
    median = {v: statistics.median(r) for v, r in rates.items()}

    def ratio(variant: str, base: str) -> str:
        return f"{median[variant] / median[base]:.3f}" if base in median else "-"

    def paired(variant: str, base: str) -> str:
        if base not in rates:
            return "-"
        return f"{statistics.median(a / b for a, b in zip(rates[variant], rates[base])):.3f}"

    print(
        f"\n{args.workers} workers x {args.threads} thread(s), per-worker batch {args.batch}, {MODELS[args.model]}, "
        f"{args.steps} timed steps after {args.warmup} (rounded up to multiples of k for -kK), median of "
        f"{args.repeats}, {time.perf_counter() - started_all:.0f} s; load average (1/5/15 min) before "
        f"{'/'.join(f'{x:.2f}' for x in load_before)}, after {'/'.join(f'{x:.2f}' for x in load_after)}\n"
    )
    print("| variant | examples/s (median) | min | max | vs limit | vs limit (paired) | vs tfpar | vs tfpar (paired) "
          "| tfpar / variant | ms/step | CPU ms/step/worker |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for variant in variants:
        values = rates[variant]
        inverse = f"{median['tfpar'] / median[variant]:.3f}" if "tfpar" in median else "-"
        print(
            f"| {variant} | {median[variant]:.1f} | {min(values):.1f} | {max(values):.1f} | "
            f"{ratio(variant, 'limit')} | {paired(variant, 'limit')} | {ratio(variant, 'tfpar')} | "
            f"{paired(variant, 'tfpar')} | {inverse} | "
            f"{1000 * args.workers * args.batch / median[variant]:.1f} | {statistics.median(cpu[variant]):.1f} |"
        )
    goals = [("hvd", "tfpar", 0.97, "")]
    note = "" if args.batch == 64 else f" (the issue's goal is at per-worker batch 64; this run: {args.batch})"
    goals += [(v, "limit", 0.85, note) for v in ("hvd-k4", "tfpar-k4")]
    lines = []
    for variant, base, goal, note in goals:
        if variant in median and base in median:
            value = median[variant] / median[base]
            lines.append(f"{variant} / {base}: {value:.3f} (paired {paired(variant, base)}), goal >= {goal}: "
                         f"{'met' if value >= goal else 'NOT met'}{note}")
    if lines:
        print("\nGoals (issue 15), ratio of medians:\n" + "\n".join(lines))

if __name__ == "__main__":
    main()
