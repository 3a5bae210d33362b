"""Tuned vs default ``tfpar train``: samples/s of the fit and wall time, the tuning included.

Each repetition runs, interleaved, for every setup (``mirrored``: one process on ``--devices``
virtual CPUs; ``multi_worker``: ``tfpar launch --workers 2 -- tfpar train --strategy
multi_worker``) the two variants:

* ``default``: ``tfpar train`` as a user runs it (global batch ``--batch-size``, 1 step per execution);
* ``tuned``: the same with ``--tune --tune-budget B``: the search, then training with its choice.

Reported per setup and variant (median over ``--repeats``): the fit's samples/s from the chief's
``metrics.json`` (the median of the epochs' ``"samples_per_second"`` after the first), the command's wall time (process
start to exit, the search included), and for ``tuned`` the search time (``metrics.json``'s
``"tuning"["seconds"]``) and its choice. Ratios: tuned / default samples/s (median of the pairs
too), wall time, and the search time as a share of a 10-epoch default run (10 x the default's
seconds per epoch, from its ``"train_seconds"``). The issue's goals: >= 1.2x samples/s where the
default is not already the best, never below 0.97x, search <= 10% of a 10-epoch run.

Usage: python benchmarks/tuning.py [--setups mirrored,multi_worker] [--epochs 10] [--repeats 3]
       [--tune-budget 20] [--quick] [-- extra tfpar train arguments]
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

SETUPS = ("mirrored", "multi_worker")
VARIANTS = ("default", "tuned")


def _tfpar() -> list[str]:
    return [sys.executable, "-m", "tfpar"]


def _has_flags(flags: tuple[str, ...]) -> list[str]:
    """The flags of ``tfpar train --help`` missing among `flags`."""
    text = subprocess.run([*_tfpar(), "train", "--help"], capture_output=True, text=True, timeout=120).stdout
    return [flag for flag in flags if flag not in text]


def _command(setup: str, variant: str, args: argparse.Namespace, out: Path) -> list[str]:
    train = ["train", "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--quiet",
             "--output", str(out), *args.extra]
    if variant == "tuned":
        train += ["--tune", "--tune-budget", str(args.tune_budget)]
    if setup == "mirrored":
        return [*_tfpar(), *train, "--strategy", "mirrored", "--devices", str(args.devices)]
    return [*_tfpar(), "launch", "--workers", str(args.workers), "--timeout", str(args.timeout), "--",
            *_tfpar(), *train, "--strategy", "multi_worker"]


def _run(setup: str, variant: str, args: argparse.Namespace, workdir: Path, repeat: int) -> dict:
    out = workdir / f"{setup}-{variant}-{repeat}"
    command = _command(setup, variant, args, out)
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout + 60)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {result.returncode}:\n{(result.stdout + result.stderr)[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    tuning = metrics.get("tuning") or {}
    per_epoch = metrics.get("history", {}).get("samples_per_second") or [metrics["samples_per_second"]]
    return {
        # the median epoch after the first (which traces): one slow epoch on a shared VM moves it little
        "rate": float(statistics.median(per_epoch[1:] or per_epoch)),
        "accuracy": float(metrics["test_accuracy"]),
        "wall": wall,
        "train_seconds": float(metrics.get("train_seconds", wall)),
        "tuning_seconds": float(tuning.get("seconds", 0.0)),
        "chosen": tuning.get("chosen"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated, of {', '.join(SETUPS)}")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64, help="the default global batch size")
    parser.add_argument("--devices", type=int, default=2, help="virtual CPUs of the mirrored setup")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tune-budget", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--quick", action="store_true", help="1 repeat of 2 epochs (smoke run)")
    parser.add_argument("extra", nargs="*", help="more tfpar train arguments, after --")
    args = parser.parse_args()
    setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    if not setups or set(setups) - set(SETUPS) or len(set(setups)) != len(setups):
        parser.error(f"--setups: each of {', '.join(SETUPS)} at most once; received {args.setups!r}")
    if args.quick:
        args.repeats, args.epochs = 1, 2
    missing = _has_flags(("--tune", "--tune-budget"))
    if missing:
        raise SystemExit(f"tfpar train has no {', '.join(missing)} yet: this benchmark needs them (issue 16)")
    runs: dict[tuple[str, str], list[dict]] = {(s, v): [] for s in setups for v in VARIANTS}
    load_before = os.getloadavg()
    started_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for setup in setups:
                for variant in VARIANTS:
                    run = _run(setup, variant, args, Path(tmp), repeat)
                    runs[setup, variant].append(run)
                    chosen = f", chose {run['chosen']}" if run["chosen"] else ""
                    print(f"repeat {repeat + 1}/{args.repeats} {setup:12s} {variant:7s} {run['rate']:8.1f} samples/s, "
                          f"wall {run['wall']:5.1f} s, tuning {run['tuning_seconds']:4.1f} s{chosen}", file=sys.stderr)
    load_after = os.getloadavg()
    print(
        f"\ntfpar train {' '.join(args.extra)} --epochs {args.epochs} --batch-size {args.batch_size}, tuned with "
        f"--tune-budget {args.tune_budget:g}; mirrored on {args.devices} virtual CPUs, multi_worker as "
        f"{args.workers} tfpar launch workers; median of {args.repeats}, {time.perf_counter() - started_all:.0f} s; "
        f"load average (1/5/15 min) before {'/'.join(f'{x:.2f}' for x in load_before)}, after "
        f"{'/'.join(f'{x:.2f}' for x in load_after)}\n"
    )
    print("| setup | variant | samples/s (median) | min | max | tuned/default | paired | wall s | default/tuned wall "
          "| tuning s | tuning / 10-epoch run | test accuracy | chosen |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for setup in setups:
        default, tuned = runs[setup, "default"], runs[setup, "tuned"]
        base = statistics.median(r["rate"] for r in default)
        ten_epochs = 10 * statistics.median(r["train_seconds"] for r in default) / args.epochs
        for variant, values in (("default", default), ("tuned", tuned)):
            rates = [r["rate"] for r in values]
            median = statistics.median(rates)
            tuning = statistics.median(r["tuning_seconds"] for r in values)
            is_tuned = variant == "tuned"
            paired = statistics.median(t["rate"] / d["rate"] for t, d in zip(tuned, default)) if is_tuned else 1.0
            chosen = "; ".join(sorted({json.dumps(r["chosen"], sort_keys=True) for r in values if r["chosen"]}))
            wall = statistics.median(r["wall"] for r in values)
            default_wall = statistics.median(r["wall"] for r in default)
            accuracy = statistics.median(r["accuracy"] for r in values)
            print(f"| {setup} | {variant} | {median:.1f} | {min(rates):.1f} | {max(rates):.1f} | {median / base:.3f} "
                  f"| {paired:.3f} | {wall:.1f} | {default_wall / wall:.3f} | "
                  f"{tuning:.1f} | {100 * tuning / ten_epochs:.0f}% | {accuracy:.3f} | {chosen or '-'} |")


if __name__ == "__main__":
    main()
