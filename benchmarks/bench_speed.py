"""Speed of the study's hot paths on this machine (a benchmark, not a test).

Prints: natural and PGD-AT training throughput (images/s), the ratio
PGD-k time / (k x one forward+backward w.r.t. the input) for the attack (floor 1.0), and
fine-tunes per second through the grid executor.

    .venv/bin/python benchmarks/bench_speed.py [--workers 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from bench_attacks import pgd_step_ratio, timed

from robust_transfer.data import load_task
from robust_transfer.models import ModelSpec, build_model
from robust_transfer.train import ExampleLoss, PGDExamples, TrainConfig, fit, natural_loss
from robust_transfer.transfer.grid import plan, run_grid
from robust_transfer.transfer.spec import parse_spec


def training_throughput(steps: int) -> dict:
    data = load_task("digits-0to4").train
    cfg = TrainConfig(epochs=2, batch_size=128)
    rates = {}
    for label, maker in [("natural", natural_loss),
                         (f"PGD-AT ({steps} steps)", ExampleLoss(PGDExamples(0.5, "l2", steps)))]:
        model = build_model(ModelSpec(num_classes=5), seed=0)
        seconds = timed(lambda m=model, mk=maker: fit(m, data, cfg, mk), repeats=3)
        rates[label] = 2 * len(data) / seconds
    return rates


def finetunes_per_second(workers: int) -> tuple[float, int]:
    """Fine-tunes/s through `run_grid`, sources trained beforehand (not timed)."""
    grid = {
        "sources": [{"eps": 0.0}, {"eps": 0.5}],
        "targets": ["digits-5to9"], "images_per_class": [1, 5, 25],
        "unfrozen_blocks": [0, "all"], "epochs": 30, "seeds": [0, 1, 2, 3],
    }
    warm_up = {**grid, "images_per_class": [1], "unfrozen_blocks": [0], "seeds": [99]}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        run_grid(parse_spec(warm_up), out, workers)  # trains the two sources
        spec = parse_spec(grid)
        n = len(plan(spec, out).pending)
        start = time.perf_counter()
        run_grid(spec, out, workers)
        return n / (time.perf_counter() - start), n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for label, rate in training_throughput(args.steps).items():
        print(f"training throughput, digits cnn-small, {label}: {rate:,.0f} img/s")
    task = load_task("digits-0to4")
    model = build_model(ModelSpec(num_classes=5), seed=0).eval()
    for norm, eps in (("linf", 0.1), ("l2", 0.5)):
        ratio, per_step = pgd_step_ratio(model, task.train.x[:256], task.train.y[:256], norm, eps,
                                         args.steps)
        print(f"PGD-{args.steps} {norm}, 256 images: {per_step * 1e3:.2f} ms/step = {ratio:.3f} x "
              "one forward+backward (floor 1.0)")
    rate, n = finetunes_per_second(args.workers)
    print(f"grid: {n} fine-tunes (30 epochs, 1-25 img/class) at {rate:.2f} fine-tunes/s "
          f"with {args.workers} workers")


if __name__ == "__main__":
    main()
