"""Ray vs local executor: wall seconds per fine-tune on the digits grid (a benchmark, not a
test; needs `pip install robust_transfer[ray]`).

Sources are trained once beforehand (not timed); each executor then runs the same fine-tunes
into a fresh store. Ray's time includes starting a local Ray and shutting it down, as
`grid --executor ray` does; "per fine-tune" divides the whole wall time by the runs. The
tables of the two executors are checked to be equal.

    .venv/bin/python benchmarks/bench_executors.py [--workers 2]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd

from robust_transfer.transfer.executors import make_executor
from robust_transfer.transfer.grid import SOURCES, plan, run_grid
from robust_transfer.transfer.results import read_results
from robust_transfer.transfer.spec import parse_spec

GRID = {
    "sources": [{"eps": 0.0}, {"eps": 0.5}],
    "targets": ["digits-5to9"], "images_per_class": [1, 5, 25],
    "unfrozen_blocks": [0, "all"], "epochs": 30, "seeds": [0, 1, 2, 3],
}


def _table(out: Path) -> pd.DataFrame:
    df = read_results(out)
    return df.sort_values(["run_id", "epoch"]).reset_index(drop=True)[sorted(df.columns)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    spec = parse_spec(GRID)
    with tempfile.TemporaryDirectory() as tmp:
        warm = Path(tmp) / "warm"
        run_grid(parse_spec({**GRID, "images_per_class": [1], "unfrozen_blocks": [0],
                             "seeds": [99]}), warm, args.workers)  # trains the sources
        tables, rates = {}, {}
        for name in ("local", "ray"):
            out = Path(tmp) / name
            shutil.copytree(warm / SOURCES, out / SOURCES)
            n = len(plan(spec, out).pending)
            start = time.perf_counter()
            run_grid(spec, out, executor=make_executor(name, args.workers))
            seconds = time.perf_counter() - start
            rates[name] = (seconds, n)
            tables[name] = _table(out)
    pd.testing.assert_frame_equal(tables["local"], tables["ray"])
    print(f"digits grid, {args.workers} workers (tables equal):")
    for name, (seconds, n) in rates.items():
        print(f"  {name:5s}: {n} fine-tunes in {seconds:6.1f} s = {seconds / n:.3f} s each")
    (local_s, n), (ray_s, _) = rates["local"], rates["ray"]
    print(f"  ray overhead: {(ray_s - local_s) / n:+.3f} s per fine-tune "
          f"({ray_s / local_s:.2f}x the local wall time)")


if __name__ == "__main__":
    main()
