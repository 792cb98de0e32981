"""Fine-tunes per second of the batched engine (`transfer.stacked`) vs the per-run path, for
ResNet-18 on CIFAR-shaped images (a benchmark, not a test).

The source is a ResNet-18 for 3x32x32 inputs (random weights: the speed does not depend on
them); the target is the embedded synthetic 5-9 task adapted to it (grey 8x8 -> 3x32x32,
`data.adapt_images`: 210 training and 90 test images). Per unfrozen setting (head only,
layer4 = the last 2 blocks, all blocks): `--seeds` seeds x `--shots` images per class, each
trained `--epochs` epochs through `run.finetune_many_from_checkpoint` (the grid's path): once
with the batched engine (all runs), and with the per-run path on `--per-run` runs per shot
count, whose rate is extrapolated. Each measurement runs in its own process after a one-run
warm-up (torch.func's lazy imports take seconds once per process), so its peak resident
memory (ru_maxrss) is its own.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_engine.py [--seeds 50] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from robust_transfer.models import ModelSpec, SourceCard, build_model, save_checkpoint
from robust_transfer.transfer.finetune import FinetuneConfig
from robust_transfer.transfer.run import finetune_many_from_checkpoint

SETTINGS = {"head only (k=0)": 0, "layer4 (k=2)": 2, "all blocks": None}


def measure(source: str, k: int | None, shots: list[int], seeds: int, epochs: int,
            engine: str) -> dict:
    """Time one engine on `seeds` seeds per shot count, after a one-run warm-up (lazy imports,
    allocator); runs per second and peak RSS."""
    finetune_many_from_checkpoint(source, [FinetuneConfig("synthetic-5to9", 1, k, 1, 0.01, 32)],
                                  engine=engine)
    cfgs = [FinetuneConfig("synthetic-5to9", n, k, epochs, 0.01, 32, s)
            for n in shots for s in range(seeds)]
    start = time.perf_counter()
    rows = finetune_many_from_checkpoint(source, cfgs, engine=engine)
    seconds = time.perf_counter() - start
    assert {r[0]["engine"] for r in rows} == {engine}
    return {"runs": len(cfgs), "seconds": seconds, "rate": len(cfgs) / seconds,
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=50)
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--per-run", type=int, default=1, help="per-run runs per shot count")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS),
                        choices=list(SETTINGS), help="which unfrozen settings")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child: "source|k|engine|seeds"
    args = parser.parse_args()
    if args.one:
        source, k, engine, seeds = args.one.split("|")
        k = None if k == "all" else int(k)
        print(json.dumps(measure(source, k, args.shots, int(seeds), args.epochs, engine)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(ModelSpec("resnet18", 10, 3, (0.5,) * 3, (0.25,) * 3,
                                      input_size=32), seed=0)
        source = str(save_checkpoint(model, Path(tmp) / "resnet18",
                                     SourceCard(role="source", task="", seed=0)))
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ResNet-18 3x32x32,"
              f" {args.seeds} seeds x shots {args.shots}, {args.epochs} epochs, batch 32")
        print("| setting | batched runs/s | per-run runs/s | ratio | peak MiB batched / "
              "per-run |\n|---|---|---|---|---|")
        for label in args.settings:
            k, got = SETTINGS[label], {}
            for engine, seeds in (("batched", args.seeds), ("per-run", args.per_run)):
                one = f"{source}|{'all' if k is None else k}|{engine}|{seeds}"
                out = subprocess.run(
                    [sys.executable, __file__, "--one", one, "--epochs", str(args.epochs),
                     "--shots", *map(str, args.shots)],
                    check=True, capture_output=True, text=True).stdout
                got[engine] = json.loads(out.strip().splitlines()[-1])
            b, p = got["batched"], got["per-run"]
            print(f"| {label} | {b['rate']:.2f} ({b['runs']} in {b['seconds']:.1f} s) | "
                  f"{p['rate']:.2f} ({p['runs']} in {p['seconds']:.1f} s) | "
                  f"{b['rate'] / p['rate']:.1f}x | {b['peak_mib']:.0f} / {p['peak_mib']:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
