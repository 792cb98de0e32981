"""The paper-scale grid (specs/paper-scale.yaml, 14,400 fine-tunes) against the per-run path.

In one run: trains the spec's sources (timed), runs the whole grid through the CLI with the
sources in place (the batched engine; timed: sources excluded), runs a slice of the same
fine-tunes through the per-run reference path (timed, then scaled to the whole spec), checks
that the slice's rows agree with the grid's, and prints the ratio. Wall and CPU (user+sys of
every process) are both printed: on a shared machine CPU time is the steadier figure.
Finally, one batch of 50 seeds per unfrozen-blocks setting, profiled in this process, says
where the fine-tuning time goes.

    .venv/bin/python benchmarks/bench_grid.py [--workers 2] [--slice-seeds 0] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd
import torch

from robust_transfer.models import load_checkpoint
from robust_transfer.transfer import batched
from robust_transfer.transfer.grid import plan, train_source_job
from robust_transfer.transfer.results import read_results
from robust_transfer.transfer.run import finetune_from_checkpoint
from robust_transfer.transfer.spec import load_spec

SPEC = Path(__file__).resolve().parent.parent / "src/robust_transfer/specs/paper-scale.yaml"


def _cpu() -> float:
    """User+sys seconds of this process and of its waited-for children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _init() -> None:
    torch.set_num_threads(1)


def _pool(workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init)


def _per_run(job) -> list[dict]:
    rows = finetune_from_checkpoint(job.source_dir, job.config, engine="per-run")
    return [{"run_id": job.run_id, **row} for row in rows]


def timed(fn):
    wall, cpu = time.perf_counter(), _cpu()
    result = fn()
    return result, time.perf_counter() - wall, _cpu() - cpu


def where_time_goes(out: Path, spec) -> list[tuple]:
    """CPU seconds per run of one batch of all seeds per unfrozen-blocks setting (8 images
    per class, or the spec's nearest)."""
    shots = min((k for k in spec.images_per_class if k != "all"), key=lambda k: abs(k - 8))
    runs = [r for r in plan(spec, out).runs if r.finetune.images_per_class == shots
            and r.source.eps == spec.sources[1].eps and r.finetune.target_task == spec.targets[0]]
    model, _ = load_checkpoint(out / "sources" / runs[0].source_id)
    batched.finetune_batch(copy.deepcopy(model), [runs[0].finetune])  # load data, warm up
    rows = []
    for blocks in spec.unfrozen_blocks:
        cfgs = [r.finetune for r in runs if r.finetune.unfrozen_blocks == blocks]
        start = time.process_time()
        batched.finetune_batch(copy.deepcopy(model), cfgs)
        rows.append(("all" if blocks is None else blocks, len(cfgs),
                     (time.process_time() - start) / len(cfgs)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--slice-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--spec", type=Path, default=SPEC)
    parser.add_argument("--out", type=Path, default=None, help="keep the grid here")
    args = parser.parse_args()
    spec = load_spec(args.spec)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_grid_"))
    if out.exists() and any(out.iterdir()):
        sys.exit(f"--out {out} must be new or empty")
    todo = plan(spec, out)
    n = len(todo.pending)
    print(f"spec {args.spec.name}: {n} fine-tunes, {len(todo.sources_to_train)} sources, "
          f"{args.workers} workers, torch {torch.__version__}", flush=True)

    def train_sources():
        with _pool(args.workers) as pool:  # leaving the block joins the workers: CPU counted
            return list(pool.map(train_source_job, todo.sources_to_train))

    _, src_wall, src_cpu = timed(train_sources)
    print(f"sources: {src_wall:.1f} s wall, {src_cpu:.1f} s CPU", flush=True)

    cmd = [sys.executable, "-m", "robust_transfer.cli", "grid", str(args.spec), "--out", str(out),
           "--workers", str(args.workers), "--device", "cpu"]
    result, grid_wall, grid_cpu = timed(lambda: subprocess.run(cmd, capture_output=True,
                                                               text=True))
    if result.returncode:
        sys.exit(result.stderr)
    print(result.stderr.strip().splitlines()[-1])
    print(f"grid (batched, sources excluded): {grid_wall:.1f} s wall, {grid_cpu:.1f} s CPU; "
          f"with sources: {grid_wall + src_wall:.1f} s wall, {grid_cpu + src_cpu:.1f} s CPU",
          flush=True)

    seeds = set(args.slice_seeds)
    jobs = [j for j in plan(spec, out / "none").pending if j.config.seed in seeds]
    jobs = [type(j)(j.run_id, out / "sources" / j.source_dir.name, j.config) for j in jobs]
    def per_run_slice():
        with _pool(args.workers) as pool:
            return [r for rs in pool.map(_per_run, jobs, chunksize=4) for r in rs]

    rows, slice_wall, slice_cpu = timed(per_run_slice)
    per_run = pd.DataFrame(rows)
    scale = n / len(jobs)
    print(f"per-run path, slice of {len(jobs)} runs (seeds {sorted(seeds)}): {slice_wall:.1f} s "
          f"wall, {slice_cpu:.1f} s CPU -> whole spec ~{slice_wall * scale:.0f} s wall, "
          f"~{slice_cpu * scale:.0f} s CPU")
    print(f"ratio per-run / batched (sources excluded): {slice_wall * scale / grid_wall:.1f}x "
          f"wall, {slice_cpu * scale / grid_cpu:.1f}x CPU")

    fast = read_results(out)
    both = per_run.merge(fast, on=["run_id", "epoch"], suffixes=("_ref", ""))
    same = (both.test_accuracy_ref == both.test_accuracy)
    runs_same = same.groupby(both.run_id).all()
    print(f"agreement on the slice: {same.mean():.4%} of {len(both)} (run, epoch) test "
          f"accuracies equal, {runs_same.mean():.2%} of runs equal at every epoch; max |Δ acc| "
          f"{(both.test_accuracy_ref - both.test_accuracy).abs().max():.4f}, max |Δ train loss| "
          f"{(both.train_loss_ref - both.train_loss).abs().max():.2e}")
    for k, equal in same.groupby(both.unfrozen_blocks):
        print(f"  unfrozen blocks {k}: {equal.mean():.4%} equal")

    print("where fine-tuning time goes (CPU per run, one batch of every seed, ~8 images/class):")
    for blocks, count, seconds in where_time_goes(out, spec):
        print(f"  unfrozen blocks {blocks}: {seconds * 1e3:.1f} ms per run ({count} runs)")
    if args.out is None:
        shutil.rmtree(out)


if __name__ == "__main__":
    main()
