"""Seconds for the backdoor-transfer grid of the demo size (a benchmark, not a test).

Runs the shipped `specs/backdoor.yaml` (clean, BadNets and NeuBA natural sources on digits
0-4, fine-tuned on digits 5-9 at 1, 10 and all images per class, head only and all blocks,
5 seeds, ASR of every trigger after every epoch) into a fresh directory, and prints the
seconds for the sources, for the fine-tunes, and for the report.

    .venv/bin/python benchmarks/bench_backdoor_transfer.py [--workers 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from robust_transfer.report.backdoor_transfer import make_backdoor_report
from robust_transfer.transfer.grid import backdoor_spec_path, plan, run_grid
from robust_transfer.transfer.spec import load_spec


def backdoor_transfer_grid(workers: int = 2) -> dict:
    """{stage: seconds} for the shipped backdoor-transfer spec, from nothing on disk."""
    spec = load_spec(backdoor_spec_path())
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        todo = plan(spec, out)
        times: dict = {"sources": len(todo.sources_to_train), "fine-tunes": len(todo.pending)}
        start = time.perf_counter()
        sources_done: list[float] = []
        table = run_grid(spec, out, workers,
                         on_source_done=lambda _d: sources_done.append(time.perf_counter()))
        end = time.perf_counter()
        times["grid seconds"] = end - start
        times["of which sources"] = max(sources_done) - start
        make_backdoor_report(table, out / "report")
        times["report seconds"] = time.perf_counter() - end
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    for key, value in backdoor_transfer_grid(args.workers).items():
        print(f"{key:>18}: {value:.1f}" if isinstance(value, float) else f"{key:>18}: {value}")


if __name__ == "__main__":
    main()
