"""Overhead of tfpar's data parallelism: `tfpar.scope("mirrored")` vs hand-built alternatives.

Compares, on the same model, optimizer, data, global batch and devices:

* ``tfpar``        Keras ``model.fit`` with the model built under ``tfpar.scope("mirrored")``
                   (tfpar's exact-gradient interceptions active);
* ``hand-built``   the same ``model.fit`` with the model built under a plain
                   ``tf.distribute.MirroredStrategy(devices)`` (upstream Keras behaviour);
* ``custom loop``  a hand-written ``strategy.run`` training step in a ``tf.function`` over
                   ``strategy.experimental_distribute_dataset`` (the pattern of TensorFlow's
                   "Custom training with tf.distribute.Strategy" tutorial:
                   ``tf.nn.compute_average_loss(..., global_batch_size=GLOBAL_BATCH)``);
* ``single device`` the same ``model.fit`` with no strategy: the reference for the weights.

The dataset size is NOT a multiple of the global batch (the last batch has 3 examples, which
splits 2/1 over 2 replicas and 1/1/1/0 over 4), so tfpar's exactness fix is exercised on the last
step of every epoch. The correctness column is the largest absolute weight difference from the
single-device model after the warm-up epoch, which every variant trains from the same initial weights
on the same data in the same order. (The difference after all epochs is printed below the table:
training amplifies float rounding, so after several epochs even evenly split data drifts to ~1e-5.)

The number of virtual CPU devices is fixed per process, so the script runs one child process per
device count (``--devices 2 4`` -> ``overhead.py --child --devices 2`` and ``--devices 4``), each
with a timeout. Inside a child all variants are built and warmed up first (one epoch each: tracing),
then timed runs are interleaved round-robin (the starting variant rotates every repetition) and the
median is reported. A timed run is one epoch: one ``model.fit(dataset, epochs=1)`` call (so it
includes fit's per-call work, e.g. Keras' symbolic build from a first batch) or one pass of the custom
loop over a fresh iterator of the distributed dataset. Process CPU time is recorded next to wall
time: on a machine shared with other jobs, waiting for a core inflates wall time far more.

Virtual CPUs share this machine's cores: the table measures the *overhead* of each way of running
data parallelism on the same devices, not a speedup over one device.

Usage:
    python benchmarks/overhead.py            # full run (2 and 4 devices, 5 repetitions)
    python benchmarks/overhead.py --quick    # smoke run (smaller data, 2 repetitions)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

RESULT_PREFIX = "OVERHEAD_RESULT "
VARIANTS = ("single device", "tfpar", "hand-built", "custom loop")
VARIANT_LABELS = {
    "single device": "single device (no strategy)",
    "tfpar": 'tfpar.scope("mirrored") + fit',
    "hand-built": "hand-built MirroredStrategy + fit",
    "custom loop": "custom loop (strategy.run)",
}

# Model: MLP 256 -> 1024 -> 1024 -> 10 (ReLU), 1.3M parameters, SGD with momentum, softmax
# cross-entropy on logits. A global batch of 512 makes each step about 4 GFLOP of dense matmuls
# (compute-dominated on one device) while a full run still fits in about 4 minutes on 2 cores.
INPUT_DIM = 256
HIDDEN = 1024
CLASSES = 10
GLOBAL_BATCH = 512
LEARNING_RATE = 0.01
MOMENTUM = 0.9
LAST_BATCH = 3  # examples in the final partial batch (uneven over 2 and over 4 replicas)


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[2, 4], help="virtual CPU counts (default: 2 4)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per variant (default 5; 2 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="full batches per epoch (default 24; 6 with --quick)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per child process (default 900)")
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    parser.add_argument("--json", metavar="PATH", help="also write the raw results as JSON")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    if args.steps is None:
        args.steps = 6 if args.quick else 24
    if args.repeats < 1 or args.steps < 1 or any(n < 1 for n in args.devices):
        parser.error(f"--repeats, --steps and --devices must be >= 1. Received: {vars(args)}")
    if args.child and len(args.devices) != 1:
        parser.error(f"--child runs exactly one device count. Received: --devices {args.devices}")
    return args


# === Child: one device count per process ===


def _child(args: argparse.Namespace) -> dict:
    n_devices = args.devices[0]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    load_start = os.getloadavg()

    import tfpar

    # Must run before any other TensorFlow call in this process.
    devices = tfpar.configure_virtual_devices(n_devices)[:n_devices]

    import keras
    import numpy as np
    import tensorflow as tf

    from tfpar import _compat

    num_examples = args.steps * GLOBAL_BATCH + LAST_BATCH
    rng = np.random.default_rng(0)
    x = rng.normal(size=(num_examples, INPUT_DIM)).astype("float32")
    teacher = rng.normal(size=(INPUT_DIM, CLASSES)).astype("float32")
    y = np.argmax(x @ teacher + rng.normal(scale=4.0, size=(num_examples, CLASSES)), axis=1).astype("int64")
    # One dataset for every variant: in memory, fixed order, final partial batch kept.
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH).prefetch(tf.data.AUTOTUNE)

    def build_model() -> keras.Model:
        keras.utils.set_random_seed(1234)  # identical initial weights in every variant
        return keras.Sequential(
            [
                keras.Input((INPUT_DIM,)),
                keras.layers.Dense(HIDDEN, activation="relu", name="fc1"),
                keras.layers.Dense(HIDDEN, activation="relu", name="fc2"),
                keras.layers.Dense(CLASSES, name="logits"),
            ],
            name="mlp",
        )

    def make_optimizer() -> keras.optimizers.Optimizer:
        return keras.optimizers.SGD(LEARNING_RATE, momentum=MOMENTUM)

    def compiled_model() -> keras.Model:
        model = build_model()
        model.compile(
            optimizer=make_optimizer(),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        return model

    def fit_runner(model: keras.Model):
        def run(epochs: int) -> None:
            model.fit(dataset, epochs=epochs, shuffle=False, verbose=0)

        return run

    # --- the variants ---
    single = compiled_model()

    with tfpar.scope("mirrored") as tfpar_strategy:
        tfpar_model = compiled_model()
    assert tfpar_strategy.num_replicas_in_sync == n_devices, tfpar_strategy.extended.worker_devices

    # tfpar already created a MirroredStrategy in this process. A second one with a different
    # collective pattern would reuse its collective keys ("Shape mismatch in the collective
    # instance"), so move the key base first, as TensorFlow's own tests do. This does not make
    # the strategy tfpar-managed: models built under it keep upstream Keras behaviour.
    _compat.bump_collective_key_base()
    hand_strategy = tf.distribute.MirroredStrategy(devices)
    assert not _compat.is_managed(hand_strategy)
    with hand_strategy.scope():
        hand_model = compiled_model()

    # The custom training loop gets its own plain MirroredStrategy on the same devices (again
    # after a collective key bump, for the same reason).
    _compat.bump_collective_key_base()
    loop_strategy = tf.distribute.MirroredStrategy(devices)
    with loop_strategy.scope():
        loop_model = build_model()
        loop_optimizer = make_optimizer()
        loop_optimizer.build(loop_model.trainable_variables)
        epoch_loss = keras.metrics.Mean(name="loss")
    per_example_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    distributed = loop_strategy.experimental_distribute_dataset(dataset)

    def replica_step(features, labels):
        with tf.GradientTape() as tape:
            logits = loop_model(features, training=True)
            loss = tf.nn.compute_average_loss(per_example_loss(labels, logits), global_batch_size=GLOBAL_BATCH)
        gradients = tape.gradient(loss, loop_model.trainable_variables)
        loop_optimizer.apply_gradients(zip(gradients, loop_model.trainable_variables))
        return loss

    @tf.function(input_signature=[distributed.element_spec])
    def train_step(batch):
        per_replica_loss = loop_strategy.run(replica_step, args=batch)
        epoch_loss.update_state(loop_strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica_loss, axis=None))

    def loop_run(epochs: int) -> None:
        for _ in range(epochs):
            epoch_loss.reset_state()
            for batch in distributed:
                train_step(batch)
            float(epoch_loss.result())  # wait for the epoch's last step, as fit does

    runners = {
        "single device": fit_runner(single),
        "tfpar": fit_runner(tfpar_model),
        "hand-built": fit_runner(hand_model),
        "custom loop": loop_run,
    }
    models = {"single device": single, "tfpar": tfpar_model, "hand-built": hand_model, "custom loop": loop_model}

    def max_weight_diff() -> dict[str, float]:
        reference = single.get_weights()
        diffs = {}
        for name, model in models.items():
            weights = model.get_weights()
            assert len(weights) == len(reference)
            diffs[name] = max(float(np.max(np.abs(a - b))) for a, b in zip(weights, reference))
        return diffs

    # --- warm-up: trace/compile every variant with one epoch ---
    warmup = {}
    for name in VARIANTS:
        start = time.perf_counter()
        runners[name](1)
        warmup[name] = time.perf_counter() - start
        print(f"[{n_devices} devices] warm-up {name}: {warmup[name]:.2f} s", file=sys.stderr, flush=True)
    # Correctness after one epoch (all full steps + the partial one) from identical initial weights.
    # Measured here because training amplifies float rounding: after several more epochs even
    # evenly split data drifts to ~1e-5 from one device (summation order), which would hide the
    # difference between an exact and an inexact gradient on the partial batch.
    diff_one_epoch = max_weight_diff()

    # --- timed runs, interleaved round-robin; the starting variant rotates ---
    # Wall time is what the table reports. Process CPU time (all threads) is recorded as well: on a
    # machine shared with other jobs, waiting for a core inflates wall time far more than CPU time.
    times, cpu_times = _timed_runs(runners, args, n_devices)

    # After all runs every variant has trained 1 + repeats epochs on the same data, in the same order.
    diff_all_epochs = max_weight_diff()
    iterations = {
        name: int(model.optimizer.iterations.numpy()) for name, model in models.items() if name != "custom loop"
    }
    iterations["custom loop"] = int(loop_optimizer.iterations.numpy())

    return {
        "devices": n_devices,
        "device_names": list(devices),
        "examples": num_examples,
        "global_batch": GLOBAL_BATCH,
        "steps_per_epoch": args.steps + 1,
        "last_batch": LAST_BATCH,
        "parameters": int(single.count_params()),
        "epochs_trained": 1 + args.repeats,
        "optimizer_iterations": iterations,
        "warmup_seconds": warmup,
        "seconds_per_epoch": times,
        "cpu_seconds_per_epoch": cpu_times,
        "max_weight_diff": diff_one_epoch,
        "max_weight_diff_all_epochs": diff_all_epochs,
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__, "tfpar": tfpar.__version__},
    }


def _timed_runs(runners: dict, args: argparse.Namespace, n_devices: int) -> tuple[dict, dict]:
    """One epoch of every variant per repeat, round-robin; returns (wall, CPU) seconds per variant."""
    times = {name: [] for name in VARIANTS}
    cpu_times = {name: [] for name in VARIANTS}
    for repeat in range(args.repeats):
        order = VARIANTS[repeat % len(VARIANTS):] + VARIANTS[: repeat % len(VARIANTS)]
        for name in order:
            start, cpu_start = time.perf_counter(), time.process_time()
            runners[name](1)
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
        print(
            f"[{n_devices} devices] repeat {repeat + 1}/{args.repeats}: "
            + ", ".join(f"{name} {times[name][-1]:.2f} s" for name in VARIANTS),
            file=sys.stderr,
            flush=True,
        )
    return times, cpu_times


# === Parent: one child per device count, then the table ===


def _run_child(n_devices: int, args: argparse.Namespace) -> dict | None:
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        "--devices",
        str(n_devices),
        "--repeats",
        str(args.repeats),
        "--steps",
        str(args.steps),
    ]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    print(f"$ {' '.join(command)}", file=sys.stderr, flush=True)
    try:
        completed = subprocess.run(
            command, stdout=subprocess.PIPE, stderr=None, text=True, timeout=args.timeout, env=env
        )
    except subprocess.TimeoutExpired:
        print(f"[{n_devices} devices] child timed out after {args.timeout:.0f} s", file=sys.stderr)
        return None
    for line in completed.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    print(f"[{n_devices} devices] child exited with status {completed.returncode} and no result", file=sys.stderr)
    return None


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _table(results: list[dict]) -> str:
    header = (
        "| devices | variant | median s/epoch | examples/s | ratio tfpar/hand-built "
        "| ratio tfpar/custom loop | max \\|w - w_single\\| |"
    )
    lines = [header, "|---:|---|---:|---:|---:|---:|---:|"]
    for result in results:
        medians = {name: _median(result["seconds_per_epoch"][name]) for name in VARIANTS}
        for name in VARIANTS:
            throughput = result["examples"] / medians[name]
            if name == "tfpar":
                # Throughput ratios: > 1 means tfpar is faster.
                vs_hand = f"{medians['hand-built'] / medians['tfpar']:.3f}"
                vs_loop = f"{medians['custom loop'] / medians['tfpar']:.3f}"
            else:
                vs_hand = vs_loop = ""
            diff = "0 (reference)" if name == "single device" else f"{result['max_weight_diff'][name]:.1e}"
            lines.append(
                f"| {result['devices']} | {VARIANT_LABELS[name]} | {medians[name]:.3f} | {throughput:,.0f} "
                f"| {vs_hand} | {vs_loop} | {diff} |"
            )
    return "\n".join(lines)


def _details(results: list[dict]) -> str:
    lines = []
    for result in results:
        times = result["seconds_per_epoch"]
        devices = result["devices"]
        for other in ("hand-built", "custom loop"):
            # Ratios of runs in the same repetition (less sensitive to slow drifts in machine load)
            # and of the fastest runs (noise from other processes only ever adds time).
            ratios = [b / a for a, b in zip(times["tfpar"], times[other])]
            lines.append(
                f"- {devices} devices, throughput tfpar/{other} per repetition: "
                + ", ".join(f"{r:.2f}" for r in ratios)
                + f" (median {_median(ratios):.3f}); fastest runs: {min(times[other]) / min(times['tfpar']):.3f}"
            )
        cpu = result["cpu_seconds_per_epoch"]
        lines.append(
            f"- {devices} devices, median process CPU s/epoch: "
            + ", ".join(f"{name} {_median(cpu[name]):.3f}" for name in VARIANTS)
            + f"; CPU-time ratio tfpar/hand-built {_median(cpu['hand-built']) / _median(cpu['tfpar']):.3f}, "
            f"tfpar/custom loop {_median(cpu['custom loop']) / _median(cpu['tfpar']):.3f}"
        )
        spread = "; ".join(
            f"{name} {min(times[name]):.2f}-{max(times[name]):.2f}" for name in VARIANTS
        )
        lines.append(f"- {devices} devices, s/epoch range (min-max): {spread}")
        later = result["max_weight_diff_all_epochs"]
        lines.append(
            f"- {devices} devices, max |w - w_single| after all {result['epochs_trained']} epochs: "
            + ", ".join(f"{name} {later[name]:.1e}" for name in VARIANTS if name != "single device")
            + " (training amplifies float rounding over epochs)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.child:
        result = _child(args)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return 0

    start = time.perf_counter()
    load_start = os.getloadavg()
    results = []
    for n_devices in args.devices:
        result = _run_child(n_devices, args)
        if result is not None:
            results.append(result)
    elapsed = time.perf_counter() - start
    load_end = os.getloadavg()
    if not results:
        print("No child produced a result.", file=sys.stderr)
        return 1

    first = results[0]
    versions = first["versions"]
    print(
        f"\n## Data-parallel overhead ({'quick' if args.quick else 'full'} run)\n\n"
        f"MLP {INPUT_DIM}-{HIDDEN}-{HIDDEN}-{CLASSES} ({first['parameters']:,} parameters), "
        f"SGD(lr={LEARNING_RATE}, momentum={MOMENTUM}), global batch {GLOBAL_BATCH}, "
        f"{first['examples']:,} synthetic examples per epoch ({first['steps_per_epoch']} steps; "
        f"last batch {first['last_batch']}), tf.data input. Median of {args.repeats} interleaved runs "
        f"of one epoch after a one-epoch warm-up; max |w - w_single| after the warm-up epoch "
        f"(from identical initial weights).\nTensorFlow {versions['tensorflow']}, Keras {versions['keras']}, tfpar {versions['tfpar']}, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPU cores shared by the virtual devices "
        "(this measures overhead, not speedup).\n"
    )
    print(_table(results))
    print()
    print(_details(results))
    print()
    for result in results:
        times, cpu = result["seconds_per_epoch"], result["cpu_seconds_per_epoch"]
        measures = {
            "ratio of medians": _median(times["hand-built"]) / _median(times["tfpar"]),
            "median of paired ratios": _median([b / a for a, b in zip(times["tfpar"], times["hand-built"])]),
            "CPU time": _median(cpu["hand-built"]) / _median(cpu["tfpar"]),
        }
        verdicts = ", ".join(
            f"{name} {value:.3f} ({'met' if value >= 0.97 else 'NOT met'})" for name, value in measures.items()
        )
        print(f"- {result['devices']} devices, goal tfpar/hand-built >= 0.97: {verdicts}")
    print(
        f"\nLoad average (1/5/15 min) at start {', '.join(f'{v:.2f}' for v in load_start)}; "
        f"at end {', '.join(f'{v:.2f}' for v in load_end)}; wall time {elapsed:.0f} s."
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "results": results, "wall_seconds": elapsed}, handle, indent=2)
    return 0 if len(results) == len(args.devices) else 1


if __name__ == "__main__":
    sys.exit(main())
