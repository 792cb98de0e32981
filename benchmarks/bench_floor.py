"""The paper protocol's compute floor on this machine, and how far the real grid is from it.

The paper protocol (Utrera et al., arXiv 2007.05869, on digits): specs/paper-scale.yaml with
30 epochs and up to all images per class (1, 2, 4, 8, 16, all), 4 source eps x 3 targets x 6
shot counts x 4 unfrozen settings x 50 seeds = 14,400 fine-tunes.

1. FLOPs of the work, counted with `torch.utils.flop_counter.FlopCounterMode` on the real
   cnn-small at 8x8 (one image, multiplied): per run, forward + backward of the trainable
   suffix on every training image every epoch and the suffix's forward on the test set every
   epoch; per (source, target, k), the frozen prefix's forward on the train and test images
   once (as the engine caches it). The SGD update and the loss are left out (tiny).
2. The machine's rate for the same convolutions: the whole network's forward + backward on a
   large batch (input not requiring grad, like the engine's first trainable layer), FLOPs
   from the counter / time, at 2 threads and at 1. Floor = FLOPs / the best rate (2 threads,
   or twice the 1-thread rate: the grid runs 2 single-thread workers).
3. The measured time: a slice of the protocol (one source, one target, every shot count and
   k, a few seeds) through `run_grid` with a `LocalExecutor` (engine auto), its source
   trained first and not timed; scaled to 14,400 runs by FLOPs and by run count.

    .venv/bin/python benchmarks/bench_floor.py [--seeds 20] [--workers 2] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from robust_transfer.data import load_task, shots_per_class
from robust_transfer.models import ModelSpec, build_model
from robust_transfer.transfer.executors import LocalExecutor
from robust_transfer.transfer.grid import run_grid
from robust_transfer.transfer.spec import GridSpec, expand, load_spec

SPEC = Path(__file__).resolve().parent.parent / "src/robust_transfer/specs/paper-scale.yaml"
EPOCHS, SHOTS, SEEDS = 30, (1, 2, 4, 8, 16, "all"), 50
PARTS = ("prefix", "train", "eval")


def paper_protocol() -> GridSpec:
    """specs/paper-scale.yaml at the paper's 30 epochs and up to all images per class."""
    spec = load_spec(SPEC)
    return dataclasses.replace(spec, epochs=(EPOCHS,), images_per_class=SHOTS,
                               seeds=tuple(range(SEEDS)))


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _model() -> torch.nn.Module:
    return build_model(ModelSpec("cnn-small", 5, 1, (0.5,), (0.5,), 8))


def _steps(model, blocks, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The three kinds of work of one unfrozen-blocks setting on images `x`: the frozen
    prefix's forward, the suffix's training forward + backward (gradients for its parameters
    only: the engine's input needs none), the suffix's evaluation forward."""
    prefix, suffix = model.split(blocks)
    params = list(suffix.parameters())
    with torch.no_grad():
        h = prefix(x)
    y = torch.zeros(len(x), dtype=torch.long)

    def pre():
        with torch.no_grad():
            prefix.eval()(x)

    def train():
        torch.autograd.grad(F.cross_entropy(suffix.train()(h), y), params)

    def evaluate():
        with torch.no_grad():
            suffix.eval()(h)

    return {"prefix": pre, "train": train, "eval": evaluate}


def per_image_flops(model, blocks) -> dict[str, int]:
    """FLOPs of each kind of work (`_steps`) for one 8x8 image."""
    return {part: _flops(fn) for part, fn in _steps(model, blocks, torch.rand(1, 1, 8, 8)).items()}


def work_flops(spec: GridSpec) -> dict[tuple, float]:
    """FLOPs of the minimum work of `spec` per (unfrozen blocks, kind): the prefix once per
    (source, target, k) on the target's train and test images; per run and epoch, training
    on its images and evaluation on the test set."""
    model = _model()
    costs = {k: per_image_flops(model, k) for k in spec.unfrozen_blocks}
    total = {(k, part): 0.0 for k in spec.unfrozen_blocks for part in PARTS}
    n_src = len(spec.sources)
    for target in spec.targets:
        task = load_task(target)
        n_train, n_test = len(task.train.y), len(task.test.y)
        for k in spec.unfrozen_blocks:
            total[k, "prefix"] += n_src * costs[k]["prefix"] * (n_train + n_test)
            for shots in spec.images_per_class:
                n = len(shots_per_class(task.train.y, shots, 0))
                runs = n_src * len(spec.seeds) * len(spec.lr)
                for epochs in spec.epochs:
                    total[k, "train"] += runs * epochs * n * costs[k]["train"]
                    total[k, "eval"] += runs * epochs * n_test * costs[k]["eval"]
    return total


def machine_rates(blocks_list, threads: int, batch: int, repeats: int) -> dict[tuple, float]:
    """FLOP/s per (unfrozen blocks, kind) of cnn-small's same layers on `batch` 8x8 images
    at `threads` intra-op threads: counted FLOPs / the best of `repeats` timed calls."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    model, x = _model(), torch.rand(batch, 1, 8, 8)
    rates = {}
    for k in blocks_list:
        for part, fn in _steps(model, k, x).items():
            flops = _flops(fn)
            fn()
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - start)
            rates[k, part] = flops / best if flops else float("inf")  # k = all: no prefix
    torch.set_num_threads(before)
    return rates


def slice_spec(spec: GridSpec, seeds: int) -> GridSpec:
    """One source (the natural one), one target, every shot count and k, `seeds` seeds."""
    return dataclasses.replace(spec, sources=spec.sources[:1], targets=spec.targets[:1],
                               seeds=tuple(range(seeds)))


def run_slice(spec: GridSpec, workers: int, warm_target: str) -> tuple[float, dict, dict]:
    """Wall seconds of the slice's fine-tunes (its source trained first, with one run on
    `warm_target`, untimed); per engine [runs, worker-seconds]; worker-seconds per unfrozen
    blocks setting (a work unit holds one shape: its time goes to its runs' setting)."""
    out = Path(tempfile.mkdtemp(prefix="bench_floor_"))
    blocks_of = {r.run_id: r.finetune.unfrozen_blocks for r in expand(spec)}
    engines: dict[str, list[float]] = {}
    by_blocks: dict[int | None, float] = {}
    unit: list[str] = []  # run ids of the unit being reported (on_run_done comes first)

    def tally(engine: str, runs: int, seconds: float) -> None:
        entry = engines.setdefault(engine, [0, 0.0])
        entry[0] += runs
        entry[1] += seconds
        k = blocks_of[unit[0]]
        by_blocks[k] = by_blocks.get(k, 0.0) + seconds
        unit.clear()

    try:
        with LocalExecutor(workers) as pool:
            warm = dataclasses.replace(spec, targets=(warm_target,), seeds=(0,),
                                       images_per_class=(1,), unfrozen_blocks=(0,))
            run_grid(warm, out, executor=pool)
            start = time.perf_counter()
            run_grid(spec, out, executor=pool, on_run_done=unit.append, on_engine_time=tally)
            return time.perf_counter() - start, engines, by_blocks
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20, help="seeds per shape in the slice")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true",
                        help="~30 s: 4 seeds, images per class up to 16 in the slice")
    args = parser.parse_args()
    spec = paper_protocol()
    n_runs = len(spec.sources) * len(spec.targets) * len(spec.images_per_class) * len(
        spec.unfrozen_blocks) * len(spec.seeds)
    print(f"paper protocol: {n_runs} fine-tunes, {EPOCHS} epochs, images per class {SHOTS}; "
          f"torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}", flush=True)

    flops = work_flops(spec)
    total = sum(flops.values())
    share = {part: sum(v for (_, p), v in flops.items() if p == part) / total for part in PARTS}
    print(f"FLOPs of the work: {total:.3e} (prefix {share['prefix']:.2%}, training "
          f"{share['train']:.1%}, per-epoch test evaluation {share['eval']:.1%})", flush=True)

    blocks = spec.unfrozen_blocks
    rates: dict[int, dict[tuple, float]] = {1: {}, 2: {}}
    for _ in range(1 if args.quick else 2):  # alternate: the machine's load changes
        for t in (1, 2):
            for key, rate in machine_rates(blocks, t, 4096, 2 if args.quick else 3).items():
                rates[t][key] = max(rates[t].get(key, 0.0), rate)
    best = {key: max(rates[2][key], 2 * rates[1][key]) for key in flops}
    floor = sum(flops[key] / best[key] for key in flops)
    print("same layers, 4096 images, GFLOP/s at 1 thread / 2 threads; floor per setting:")
    print("| unfrozen blocks | train FLOPs | eval FLOPs | train rate | eval rate | floor (s) |")
    print("|---|---|---|---|---|---|")
    for k in blocks:
        f = {part: flops[k, part] for part in PARTS}
        print(f"| {'all' if k is None else k} | {f['train']:.2e} | {f['eval']:.2e} | "
              f"{rates[1][k, 'train'] / 1e9:.1f} / {rates[2][k, 'train'] / 1e9:.1f} | "
              f"{rates[1][k, 'eval'] / 1e9:.1f} / {rates[2][k, 'eval'] / 1e9:.1f} | "
              f"{sum(f[p] / best[k, p] for p in PARTS):.0f} |")
    print(f"compute floor (each part at max(2-thread rate, 2 x 1-thread rate)): {floor:.0f} s",
          flush=True)

    part = slice_spec(spec, 4 if args.quick else args.seeds)
    if args.quick:
        part = dataclasses.replace(part, images_per_class=SHOTS[:5])
    part_runs = len(part.images_per_class) * len(part.unfrozen_blocks) * len(part.seeds)
    part_work = work_flops(part)
    part_flops = sum(part_work.values())
    part_floor = sum(part_work[key] / best[key] for key in part_work)
    print(f"slice: {part_runs} fine-tunes ({part.targets[0]}, eps {part.sources[0].eps}, "
          f"{len(part.seeds)} seeds), {part_flops:.3e} FLOPs; {args.workers} workers, "
          "engine auto ...", flush=True)
    wall, engines, by_blocks = run_slice(part, args.workers, spec.targets[1])
    by_flops = wall / part_flops * total
    by_runs = wall / part_runs * n_runs
    print(f"slice: {wall:.1f} s wall, {part_runs / wall:.2f} fine-tunes/s, "
          f"{part_flops / wall / 1e9:.2f} GFLOP/s achieved, {wall / part_floor:.1f}x its own "
          f"floor ({part_floor:.1f} s); load average {os.getloadavg()[0]:.2f}")
    for name, (runs, seconds) in sorted(engines.items()):
        print(f"  engine {name}: {runs:.0f} runs, {seconds:.1f} worker-s "
              f"({seconds / runs * 1e3:.0f} ms per run)")
    print("  per unfrozen blocks setting: worker-s / workers against that setting's floor:")
    for k in part.unfrozen_blocks:
        k_floor = sum(part_work[k, p] / best[k, p] for p in PARTS)
        k_time = by_blocks.get(k, 0.0) / args.workers
        print(f"    {'all' if k is None else k}: {k_time:.1f} s vs floor {k_floor:.2f} s "
              f"({k_time / k_floor:.1f}x)")
    busy = sum(by_blocks.values()) / args.workers
    print(f"    workers busy {busy:.1f} s of {wall:.1f} s wall; the rest is waiting for the "
          "last unit and dispatch")
    print()
    print("| scaled to the protocol by | time (s) | fine-tunes/s | ratio to floor |")
    print("|---|---|---|---|")
    print(f"| compute floor | {floor:.0f} | {n_runs / floor:.1f} | 1 |")
    for name, seconds in (("FLOPs", by_flops), ("run count", by_runs)):
        print(f"| {name} | {seconds:.0f} | {n_runs / seconds:.2f} | {seconds / floor:.1f}x |")


if __name__ == "__main__":
    main()
