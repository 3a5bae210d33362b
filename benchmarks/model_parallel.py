"""Model-parallel benchmark: plan balance, cost-model truth, pipeline throughput.

Prints three markdown tables:

1. **Balance.** Bottleneck stage cost (forward GFLOPs per example) of tfpar's FLOP-balanced plan
   against DeepSpeed's two default partitioners re-implemented in
   :mod:`tfpar.parallel.partition` (``uniform``: equal layer counts; ``parameters``: DeepSpeed's
   ``partition_balanced`` on parameter counts), for full-size AlexNet (227x227), VGG16 and ResNet50
   (224x224) at p = 2, 4, 8. The optimum is checked independently by a parametric search over all
   range sums; the lower bound is ``max(total / p, largest layer)``.
2. **Cost-model truth.** Small AlexNet (67x67), VGG16 (32x32, width 0.5) and ResNet50 (32x32) are
   cut into 8 stages of equal layer counts, so stage costs differ widely, and every stage is timed
   alone (forward + backward, batch 16) on the virtual CPU ``/device:CPU:0``. Per cost model:
   Spearman rank correlation of predicted stage cost vs measured time, and the largest relative
   error after one least-squares scale. Then each mode's own optimal 8-stage plan is timed the same
   way: its measured bottleneck, and that over the uniform split's measured bottleneck.
3. **Pipeline.** Training throughput (examples/s, ``train_on_batch``) of a 2-stage split at
   m = 1, 2, 4, 8, 16 micro-batches and with ``microbatches="auto"``, against data parallelism
   (``tfpar.scope("mirrored")``) on the same 2 virtual CPUs and a plain one-device model,
   interleaved round by round, median of ``--repeats`` rounds. "GPipe bound" is
   ``m / (m + p - 1)`` of the data-parallel throughput.

Virtual CPUs share the machine's cores, so table 3 measures scheduling, not hardware speedup.

Usage:
    python benchmarks/model_parallel.py [--repeats 5] [--tables 1,2,3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tfpar  # noqa: E402

tfpar.configure_virtual_devices(2)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tfpar.models  # noqa: E402
import tfpar.parallel as par  # noqa: E402
from tfpar.parallel import partition  # noqa: E402

tf.get_logger().setLevel("ERROR")

FULL_SIZE = {
    "AlexNet": lambda: tfpar.models.alexnet(),
    "VGG16": lambda: tfpar.models.vgg16(),
    "ResNet50": lambda: tfpar.models.resnet50(),
}
SMALL = {
    "AlexNet": lambda: tfpar.models.alexnet(input_shape=(67, 67, 3), num_classes=10),
    "VGG16": lambda: tfpar.models.vgg16(input_shape=(32, 32, 3), num_classes=10, width=0.5),
    "ResNet50": lambda: tfpar.models.resnet50(input_shape=(32, 32, 3), num_classes=10),
}


def exact_optimum(costs: list[float], p: int) -> float:
    """Smallest bottleneck over all contiguous p-splits: binary search over every range sum."""
    prefix = np.concatenate([[0.0], np.cumsum(costs)])
    candidates = np.unique((prefix[None, :] - prefix[:, None])[np.triu_indices(len(prefix), 1)])

    def stages_needed(bound: float) -> int:
        count, current = 1, 0.0
        for c in costs:
            if c > bound:
                return len(costs) + 1
            if current + c > bound:
                count, current = count + 1, c
            else:
                current += c
        return count

    lo, hi = 0, len(candidates) - 1
    while lo < hi:  # smallest candidate whose greedy packing needs at most p stages
        mid = (lo + hi) // 2
        if stages_needed(float(candidates[mid])) <= p:
            hi = mid
        else:
            lo = mid + 1
    return float(candidates[lo])


def table_balance() -> str:
    rows = [
        "| model | p | layers | tfpar (GFLOPs) | = optimum | uniform | uniform / tfpar | parameters "
        "| parameters / tfpar | lower bound |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, build in FULL_SIZE.items():
        keras.utils.clear_session()
        model = build()
        flops = par.layer_costs(model, "flops")
        params = list(par.layer_costs(model, "params").values())
        costs = list(flops.values())
        n = len(costs)
        for p in (2, 4, 8):
            plan = par.plan(model, p, balance="flops", check_devices=False)
            ours = plan.bottleneck
            uniform = max(partition.stage_loads(costs, partition.uniform_sizes(n, p)))
            by_params = max(partition.stage_loads(costs, partition.deepspeed_balanced_sizes(params, p)))
            optimum = exact_optimum(costs, p)
            bound = max(sum(costs) / p, max(costs))
            same = "yes" if abs(ours - optimum) <= 1e-9 * optimum else f"NO ({optimum / 1e9:.3f})"
            rows.append(
                f"| {name} | {p} | {n} | {ours / 1e9:.3f} | {same} | {uniform / 1e9:.3f} | "
                f"{uniform / ours:.2f}x | {by_params / 1e9:.3f} | {by_params / ours:.2f}x | {bound / 1e9:.3f} |"
            )
        del model
    return "\n".join(rows)


def _spearman(a: list[float], b: list[float]) -> float:
    def ranks(values: list[float]) -> np.ndarray:
        order = np.argsort(values, kind="stable")
        r = np.empty(len(values))
        r[order] = np.arange(len(values), dtype=float)
        for v in set(values):  # average ranks of ties
            idx = [i for i, x in enumerate(values) if x == v]
            r[idx] = r[idx].mean()
        return r

    ra, rb = ranks(list(a)), ranks(list(b))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def table_truth(repeats: int, batch_size: int = 16, p: int = 8) -> str:
    rows = [
        "| model | balance | rank correlation (uniform stages) | max error after scaling "
        "| measured bottleneck of its plan (ms) | vs uniform plan |",
        "|---|---|---|---|---|---|",
    ]
    for name, build in SMALL.items():
        keras.utils.clear_session()
        keras.utils.set_random_seed(0)
        model = build()

        names = list(par.layer_costs(model, "params"))
        bounds = np.concatenate([[0], np.cumsum(partition.uniform_sizes(len(names), p))])
        uniform = [tuple(names[bounds[j]:bounds[j + 1]]) for j in range(p)]
        modes = ("flops", "params", "memory", "time")
        costs = {mode: par.layer_costs(model, mode, batch_size=batch_size, device="/device:CPU:0",
                                       repeats=repeats) for mode in modes}
        # Each mode's optimal split, as tfpar.parallel.plan(balance=mode) computes it (same solver),
        # reusing the per-layer times measured above instead of measuring them again.
        splits = []
        for mode in modes:
            sizes = partition.optimal_sizes(list(costs[mode].values()), p)
            cut = np.concatenate([[0], np.cumsum(sizes)])
            splits.append([tuple(names[cut[j]:cut[j + 1]]) for j in range(p)])
        # Every stage of every split is timed in the same interleaved rounds.
        measured = par.cost.measure_partitions(
            model, [uniform, *splits], device="/device:CPU:0", batch_size=batch_size, repeats=repeats
        )
        truth = measured[0]
        for mode, own in zip(modes, measured[1:]):
            predicted = [sum(costs[mode][n] for n in stage) for stage in uniform]
            scale = float(np.dot(predicted, truth) / max(np.dot(predicted, predicted), 1e-30))
            error = max(abs(scale * q - t) / t for q, t in zip(predicted, truth) if t > 0)
            rows.append(
                f"| {name} | {mode} | {_spearman(predicted, truth):.2f} | {100 * error:.0f}% | "
                f"{1e3 * max(own):.1f} | {max(own) / max(truth):.2f}x |"
            )
    return "\n".join(rows)


def table_pipeline(repeats: int, batch_size: int = 64, steps: int = 4) -> str:
    devices = ["/device:CPU:0", "/device:CPU:1"]

    def build() -> keras.Model:
        keras.utils.set_random_seed(0)
        return tfpar.models.vgg11(input_shape=(32, 32, 3), num_classes=10, width=0.5, dropout=0)

    def compiled(model: keras.Model) -> keras.Model:
        model.compile(optimizer=keras.optimizers.SGD(0.01), loss="sparse_categorical_crossentropy")
        return model

    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch_size, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, size=(batch_size,))
    keras.utils.clear_session()
    template = build()
    plan = par.plan(template, devices, balance="flops", batch_size=batch_size)
    configs: dict[str, keras.Model] = {"one device": compiled(build())}
    with tfpar.scope("mirrored", devices=devices):
        configs["data-parallel"] = compiled(build())
    for m in (1, 2, 4, 8, 16):
        configs[f"split m={m}"] = compiled(par.split(template, plan, microbatches=m))
    auto = par.split(template, plan, microbatches="auto", batch_size=batch_size)
    configs[f"split auto (m={auto.microbatches})"] = compiled(auto)
    for model in configs.values():  # trace and warm up
        for _ in range(2):
            model.train_on_batch(x, y)
    samples: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(repeats):
        for key, model in configs.items():  # interleaved: machine-load drift hits all alike
            start = time.perf_counter()
            for _ in range(steps):
                model.train_on_batch(x, y)
            samples[key].append(steps * batch_size / (time.perf_counter() - start))
    dp = statistics.median(samples["data-parallel"])
    rows = [
        f"Plan: {[len(s.layers) for s in plan.stages]} layers per stage, imbalance {plan.imbalance:.3f}; "
        f"batch {batch_size}, {steps} steps per sample, median of {repeats}; auto timings (s/step): "
        + ", ".join(f"m={m}: {t:.3f}" for m, t in sorted(auto.microbatch_timings.items())),
        "",
        "| configuration | examples/s | vs data-parallel | GPipe bound m/(m+p-1) | bubble (p-1)/(m+p-1) |",
        "|---|---|---|---|---|",
    ]
    for key, values in samples.items():
        throughput = statistics.median(values)
        m = configs[key].microbatches if key.startswith("split") else None
        bound = f"{m / (m + 1):.2f}x" if m else "-"
        bubble = f"{100 * par.bubble_fraction(2, m):.0f}%" if m else "-"
        rows.append(f"| {key} | {throughput:.1f} | {throughput / dp:.2f}x | {bound} | {bubble} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median); default 5")
    parser.add_argument("--tables", default="1,2,3", help="which tables to print, e.g. 1,3")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    wanted = {t.strip() for t in args.tables.split(",")}
    unknown = wanted - {"1", "2", "3"}
    if unknown:
        parser.error(f"--tables takes 1, 2 and 3; got {sorted(unknown)}")
    print(f"tfpar {tfpar.__version__}, TensorFlow {tf.__version__}, Keras {keras.__version__}, "
          f"{os.cpu_count()} CPU cores (shared with other work), 2 virtual CPUs\n")
    if "1" in wanted:
        print("### 1. Balance: bottleneck stage cost (forward GFLOPs/example), lower is better\n")
        print(table_balance(), "\n", flush=True)
    if "2" in wanted:
        print("### 2. Cost-model truth: predicted vs measured stage time, 8 stages, one virtual CPU\n")
        print(table_truth(args.repeats), "\n", flush=True)
    if "3" in wanted:
        print("### 3. Pipeline throughput on 2 virtual CPUs (2 stages), training\n")
        print(table_pipeline(args.repeats), "\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
