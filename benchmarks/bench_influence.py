"""Benchmark: exact head influence for every (training image, test image) pair of the
digits target task (digits-5to9, all training images per class).

    .venv/bin/python benchmarks/bench_influence.py [--finetune DIR] [--threads 2]

Setup (not timed): a natural source on digits-0to4 and its head-only fine-tune on all of
digits-5to9, unless --finetune names an existing fine-tune directory. Timed: building
`ExactInfluence` (frozen features, per-example gradients by vmap(grad), the 645 x 645
Hessian, its Cholesky factor) and the full test x train influence matrix; then the
train x train matrix (Fig. 6b). "cold" includes torch.func's one-time start-up in this
process; "warm" repeats the same work on a fresh module. Target: <= 10 s on 2 cores.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from robust_transfer.explain import ExactInfluence, load_finetune
from robust_transfer.models import save_checkpoint
from robust_transfer.train import SourceConfig, TrainConfig, train_source
from robust_transfer.transfer import FinetuneConfig
from robust_transfer.transfer.run import finetune_from_checkpoint


def make_finetune(root: Path) -> Path:
    model, card = train_source(SourceConfig(task="digits-0to4", train=TrainConfig(epochs=5)))
    save_checkpoint(model, root / "source", card)
    cfg = FinetuneConfig(target_task="digits-5to9", images_per_class=None, unfrozen_blocks=0,
                         epochs=30, lr=0.1, seed=0)
    finetune_from_checkpoint(root / "source", cfg, root / "finetune")
    return root / "finetune"


def timed_influence(ft) -> tuple[float, float, tuple[int, int], tuple[int, int]]:
    start = time.perf_counter()
    module = ExactInfluence(ft.model, ft.train)
    test_scores = module.influences(ft.task.test.x, ft.task.test.y)
    test_time = time.perf_counter() - start
    start = time.perf_counter()
    train_scores = module.influences(ft.train.x, ft.train.y)
    train_time = time.perf_counter() - start
    return test_time, train_time, tuple(test_scores.shape), tuple(train_scores.shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--finetune", type=Path, help="existing fine-tune directory")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.finetune or make_finetune(Path(tmp))
        ft = load_finetune(path)
        cold = timed_influence(ft)
        warm = timed_influence(ft)
    test_pairs, train_pairs = cold[2], cold[3]
    params = sum(p.numel() for p in ft.model.head.parameters())
    print(f"digits-5to9 head influence (exact, float64, {torch.get_num_threads()} threads): "
          f"{len(ft.train)} training x {len(ft.task.test)} test images, {params} parameters")
    print(f"  test x train  {test_pairs[0]} x {test_pairs[1]}: cold {cold[0]:.2f} s, "
          f"warm {warm[0]:.2f} s   (target <= 10 s)")
    print(f"  train x train {train_pairs[0]} x {train_pairs[1]}: cold {cold[1]:.2f} s, "
          f"warm {warm[1]:.2f} s   (reuses the factorised Hessian)")


if __name__ == "__main__":
    main()
