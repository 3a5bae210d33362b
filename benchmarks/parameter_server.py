"""Parameter-server throughput: tfpar's Keras fit vs a hand-written ClusterCoordinator loop vs
synchronous multi_worker training on the same two workers.

Variants (interleaved: every repetition runs each variant once, starting with a different one):

* ``tfpar ps``: ``tfpar launch --workers 2 --ps 1``; the chief runs plain Keras ``model.fit``
  under tfpar's parameter_server strategy (``tfpar.coordinator.parameter_server_strategy``);
  asynchronous, no staleness bound.
* ``hand ps``: the same cluster; the chief runs the TF parameter-server tutorial's custom loop:
  a per-worker dataset, a ``tf.function`` step (``strategy.run``: forward, loss, gradients,
  ``optimizer.apply_gradients``, a loss ``Mean`` metric) scheduled with
  ``ClusterCoordinator.schedule``, ``join`` at the end of each epoch.
* ``hand ps keras step``: the same loop, but the scheduled step is the compiled Keras model's own
  ``model.train_step`` (what ``fit`` runs: besides the update it updates the loss tracker and
  returns the metrics, one more read from the ps per step); metrics are reset before and read
  after each epoch. The difference to ``tfpar ps`` is only tfpar's loop.
* ``tfpar multi_worker``: ``tfpar launch --workers 2``; each worker runs Keras ``model.fit``
  under ``tfpar.scope("multi_worker")`` (synchronous all-reduce; no ps, no chief).

Same model (a small CNN on 32x32x3 inputs), optimizer (SGD), per-worker batch, input pipeline
(``tf.data`` from in-memory arrays, repeated) and number of steps. Timing excludes process start-up
and tracing: a warm-up epoch runs first, then ``--epochs`` timed epochs; the clock starts at the
beginning of the first timed epoch and stops when the last one's steps have all finished (for the
PS variants on the coordinator, after ``join``; for multi_worker the slower worker's clock).
Throughput = examples trained per second over all workers. Median over ``--repeats``.

On this 2-core machine the two workers, the ps and the coordinator share the cores, so the table
compares ways of running the same work, not scaling.

Usage: python benchmarks/parameter_server.py [--repeats 3] [--epochs 3] [--steps 30] [--quick]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("tfpar ps", "hand ps", "hand ps keras step", "tfpar multi_worker")
CHILD = {"tfpar ps": "ps-fit", "hand ps": "ps-hand", "hand ps keras step": "ps-hand-keras", "tfpar multi_worker": "mw-fit"}


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per variant (default 3; 1 with --quick)")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per run (default 3)")
    parser.add_argument("--steps", type=int, default=30, help="steps per epoch, over all workers (default 30)")
    parser.add_argument("--batch", type=int, default=64, help="examples per step on a worker (default 64)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per cluster run (default 300)")
    parser.add_argument("--quick", action="store_true", help="one short repetition (smoke run)")
    parser.add_argument("--json", metavar="PATH", help="also write the raw results as JSON")
    parser.add_argument("--child", choices=sorted(CHILD.values()), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.epochs, args.steps = 1, 2, 12
    return args


# ---------------------------------------------------------------------------------------------
# Child processes (run by tfpar launch)
# ---------------------------------------------------------------------------------------------


def _child(args: argparse.Namespace) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np
    import tensorflow as tf

    import tfpar
    from tfpar import coordinator

    workers = 2
    examples = args.batch * args.steps
    rng = np.random.default_rng(0)
    x = rng.normal(size=(examples, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, examples)

    def build() -> keras.Model:
        keras.utils.set_random_seed(1)
        return keras.Sequential([
            keras.Input((32, 32, 3)),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(64, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10),
        ])

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    epochs = 1 + args.epochs  # one warm-up epoch (tracing, first connections), then timed ones
    marks: list[float] = []

    class Clock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                marks.append(time.perf_counter())

        def on_epoch_end(self, epoch, logs=None):
            if epoch == epochs - 1:
                marks.append(time.perf_counter())

    if args.child == "mw-fit":
        with tfpar.scope("multi_worker") as strategy:
            model = build()
            model.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss)
        # The global batch is split over the workers: per-worker batch x workers per step, and
        # steps / workers steps per epoch, so that an epoch trains the same examples as the PS runs.
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(args.batch * workers)
        model.fit(dataset, epochs=epochs, steps_per_epoch=args.steps // workers, verbose=0, callbacks=[Clock()])
        trained = args.epochs * (args.steps // workers) * args.batch * workers
        role = f"{tfpar.cluster.task_type()}{tfpar.cluster.task_index()}"
    else:
        strategy = coordinator.parameter_server_strategy("tf_config")
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(args.batch)
        if args.child == "ps-fit":
            with tfpar.scope(strategy):
                model = build()
                model.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss)
            model.fit(dataset, epochs=epochs, steps_per_epoch=args.steps, verbose=0, callbacks=[Clock()])
        elif args.child == "ps-hand-keras":
            _ps_hand_keras(args, strategy, dataset, build, loss, epochs, marks)
        else:
            _ps_hand_loop(args, strategy, dataset, build, loss, epochs, marks)
        trained = args.epochs * args.steps * args.batch
        role = "chief0"
    with open(f"{args.out}.{role}", "w") as handle:
        json.dump({"seconds": marks[-1] - marks[0], "examples": trained}, handle)
    sys.stdout.flush()
    sys.stderr.flush()


def _ps_hand_keras(args: argparse.Namespace, strategy, dataset, build, loss, epochs: int, marks: list[float]) -> None:
    """Child "ps-hand-keras": a ClusterCoordinator loop scheduling Keras' own train_step."""
    import keras
    import tensorflow as tf

    import tfpar

    cluster_coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)
    with tfpar.scope(strategy):
        model = build()
        model.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss)
    model.build((None, 32, 32, 3))
    model.optimizer.build(model.trainable_variables)
    model.compute_loss(y=tf.zeros([1], tf.int64), y_pred=tf.zeros([1, 10]))  # builds the compiled loss
    iterator = iter(cluster_coordinator.create_per_worker_dataset(
        strategy.experimental_distribute_dataset(dataset)
    ))

    @tf.function
    def keras_step(iterator):
        return strategy.run(model.train_step, args=(next(iterator),))

    for epoch in range(epochs):
        if epoch == 1:
            marks.append(time.perf_counter())
        model.reset_metrics()
        for _ in range(args.steps):
            cluster_coordinator.schedule(keras_step, args=(iterator,))
        cluster_coordinator.join()
        model.get_metrics_result()
    marks.append(time.perf_counter())


def _ps_hand_loop(args: argparse.Namespace, strategy, dataset, build, loss, epochs: int, marks: list[float]) -> None:
    """Child "ps-hand": a ClusterCoordinator loop with a hand-written GradientTape step."""
    import keras
    import tensorflow as tf

    cluster_coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)
    with strategy.scope():
        model = build()
        optimizer = keras.optimizers.SGD(0.01)
        mean_loss = keras.metrics.Mean()
    per_worker = cluster_coordinator.create_per_worker_dataset(
        strategy.experimental_distribute_dataset(dataset)
    )
    iterator = iter(per_worker)

    @tf.function
    def step(iterator):
        def replica_step(batch):
            features, labels = batch
            with tf.GradientTape() as tape:
                value = loss(labels, model(features, training=True))
            gradients = tape.gradient(value, model.trainable_variables)
            optimizer.apply_gradients(zip(gradients, model.trainable_variables))
            mean_loss.update_state(value)
            return value

        return strategy.run(replica_step, args=(next(iterator),))

    for epoch in range(epochs):
        if epoch == 1:
            marks.append(time.perf_counter())
        mean_loss.reset_state()
        for _ in range(args.steps):
            cluster_coordinator.schedule(step, args=(iterator,))
        cluster_coordinator.join()
        float(mean_loss.result().numpy())
    marks.append(time.perf_counter())


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def _run(variant: str, args: argparse.Namespace, directory: Path, repeat: int) -> float:
    from tfpar import launch

    out = directory / f"{CHILD[variant]}-{repeat}"
    command = [
        sys.executable, os.path.abspath(__file__), "--child", CHILD[variant], "--out", str(out),
        "--epochs", str(args.epochs), "--steps", str(args.steps), "--batch", str(args.batch),
    ]
    log = io.StringIO()
    ps = 0 if variant == "tfpar multi_worker" else 1
    code = launch.launch(command, workers=2, ps=ps, output=log, timeout=args.timeout)
    if code != 0:
        raise RuntimeError(f"{variant} failed with exit code {code}:\n{log.getvalue()[-4000:]}")
    results = [json.loads(path.read_text()) for path in directory.glob(f"{out.name}.*")]
    if not results:
        raise RuntimeError(f"{variant} wrote no timing:\n{log.getvalue()[-4000:]}")
    seconds = max(r["seconds"] for r in results)  # the slowest worker (one file for the PS runs)
    return results[0]["examples"] / seconds


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.child:
        _child(args)
        return 0
    if args.steps % 2:
        raise SystemExit("--steps must be even (multi_worker splits each epoch over 2 workers)")
    samples: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as directory:
        for repeat in range(args.repeats):
            order = VARIANTS[repeat % len(VARIANTS):] + VARIANTS[: repeat % len(VARIANTS)]
            for variant in order:
                rate = _run(variant, args, Path(directory), repeat)
                samples[variant].append(rate)
                print(f"# repeat {repeat + 1}/{args.repeats} {variant}: {rate:,.0f} examples/s", file=sys.stderr)
    median = {variant: statistics.median(values) for variant, values in samples.items()}
    hand = median["hand ps"]
    print(
        f"\nParameter-server fit throughput, 2 workers (+1 ps, +coordinator for the PS variants), "
        f"per-worker batch {args.batch}, {args.steps} steps x {args.epochs} timed epochs, "
        f"median of {args.repeats} ({os.cpu_count()} CPUs, {time.monotonic() - started:.0f} s)\n"
    )
    keras_hand = median["hand ps keras step"]
    print("| variant | examples/s | vs hand loop (tutorial step) | vs hand loop (Keras train_step) | runs |")
    print("|---|---:|---:|---:|---|")
    labels = {
        "tfpar ps": "tfpar parameter_server: Keras `model.fit`",
        "hand ps": "hand-written ClusterCoordinator loop, TF tutorial step",
        "hand ps keras step": "hand-written ClusterCoordinator loop, Keras `train_step`",
        "tfpar multi_worker": 'tfpar.scope("multi_worker"): Keras `model.fit` (synchronous)',
    }
    for variant in VARIANTS:
        runs = ", ".join(f"{value:,.0f}" for value in samples[variant])
        print(f"| {labels[variant]} | {median[variant]:,.0f} | {median[variant] / hand:.2f} | "
              f"{median[variant] / keras_hand:.2f} | {runs} |")
    for name, base in (("tutorial step", hand), ("Keras train_step", keras_hand)):
        goal = median["tfpar ps"] / base
        print(f"\nGoal: tfpar parameter_server fit >= 0.95 of the hand-written loop ({name}): {goal:.2f} "
              f"({'met' if goal >= 0.95 else 'NOT met'})")
    if args.json:
        Path(args.json).write_text(json.dumps({"samples": samples, "median": median, "args": vars(args)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
