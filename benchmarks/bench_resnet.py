"""CPU training throughput of ResNet-18 (and PreActResNet-18) on 32x32 images: natural and
PGD adversarial training, through the package's one training loop (a benchmark, not a test).

Synthetic 3x32x32 images (the speed does not depend on the pixels); one warm-up epoch, then
the fastest of `--repeats` timed epochs (`bench_attacks.timed`). Prints images/s for each
(arch, objective).

    PYTHONPATH=src .venv/bin/python benchmarks/bench_resnet.py [--images 256] [--steps 7]
"""

from __future__ import annotations

import argparse

import torch
from bench_attacks import timed

from robust_transfer.data import synthetic
from robust_transfer.models import ModelSpec, build_model
from robust_transfer.train import ExampleLoss, PGDExamples, TrainConfig, fit, natural_loss


def throughput(arch: str, images: int, steps: int, batch_size: int, repeats: int) -> dict:
    data = synthetic(num_classes=10, per_class=images // 10, size=32, channels=3)
    cfg = TrainConfig(epochs=1, batch_size=batch_size)
    rates = {}
    for label, objective in [
        ("natural", natural_loss),
        (f"PGD-AT Linf {steps} steps", ExampleLoss(PGDExamples(8 / 255, "linf", steps))),
    ]:
        model = build_model(ModelSpec(arch, 10, 3, (0.5,) * 3, (0.25,) * 3), seed=0)
        seconds = timed(lambda m=model, o=objective: fit(m, data, cfg, o), repeats=repeats)
        rates[label] = len(data) / seconds
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--archs", nargs="+", default=["resnet18", "preact-resnet18"])
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.images} images 3x32x32, batch {args.batch_size}")
    for arch in args.archs:
        for label, rate in throughput(arch, args.images, args.steps, args.batch_size,
                                      args.repeats).items():
            print(f"{arch}, {label}: {rate:,.1f} img/s")


if __name__ == "__main__":
    main()
