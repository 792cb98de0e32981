"""Attack speed on the digits models (a benchmark script, not a test).

Prints (1) the time of one PGD step divided by the time of one forward + backward pass with
respect to the input on the same batch (floor 1.0; goal <= 1.10), for each norm, and (2)
images per second for each attack at a fixed budget on a natural and a PGD-trained model.

    .venv/bin/python benchmarks/bench_attacks.py [--batch 256] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from robust_transfer.attacks import (
    APGD,
    APGDT,
    BIM,
    CW,
    FABT,
    FGSM,
    LBFGS,
    PGD,
    DeepFool,
    Square,
    UniversalPerturbation,
    evaluate,
)
from robust_transfer.data import load_task
from robust_transfer.train import SourceConfig, TrainConfig, train_source


def timed(fn, repeats: int, warmup: bool = True) -> float:
    """Fastest wall time of `fn()` over `repeats` runs, after one warm-up run if `warmup`
    (the minimum is the least noisy estimate on a shared machine; see `timeit`)."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def forward_backward(model, x, y):
    xr = x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(xr), y, reduction="sum")
    return torch.autograd.grad(loss, xr)[0]


def pgd_step_ratio(model, x, y, norm: str, eps: float, steps: int = 20, repeats: int = 7):
    """(time of one PGD step / time of one forward+backward, seconds per step).

    The two are timed in alternating rounds (`steps` forward+backward calls, then one
    `steps`-step attack) and each takes its fastest round, so machine noise hits both alike.
    """
    atk = PGD(model, eps, steps=steps, norm=norm, random_start=False)

    def fb_round():
        for _ in range(steps):
            forward_backward(model, x, y)

    fb, pgd = [], []
    for _ in range(repeats):
        fb.append(timed(fb_round, 1, warmup=False))
        pgd.append(timed(lambda: atk(x, y), 1, warmup=False))
    return min(pgd) / min(fb), min(pgd) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {args.batch}")

    task = load_task("digits-0to4")
    x, y = task.test.x[: args.batch], task.test.y[: args.batch]
    models = {
        "natural": train_source(SourceConfig(task=task.name, train=TrainConfig(epochs=10)))[0],
        "pgd-at linf 0.1": train_source(SourceConfig(task=task.name, eps=0.1, norm="linf",
                                                     train=TrainConfig(epochs=10)))[0],
    }
    model = models["natural"].eval()

    steps = 20
    base = timed(lambda: forward_backward(model, x, y), args.repeats * 10)
    print(f"\nforward+backward (w.r.t. input), batch {len(x)}: {base * 1e3:.3f} ms")
    forward_backward(model, x, y)  # warm-up before the alternating rounds
    print(f"{'PGD step / (forward+backward)':<34}{'ratio':>8}{'ms/step':>10}")
    for norm, eps in (("linf", 0.1), ("l2", 1.0), ("l1", 3.0)):
        ratio, per_step = pgd_step_ratio(model, x, y, norm, eps, steps, args.repeats)
        print(f"  PGD-{norm:<28}{ratio:>8.3f}{per_step * 1e3:>10.3f}")

    budgets = {
        "FGSM": lambda m: FGSM(m, 0.1),
        "BIM (10 steps)": lambda m: BIM(m, 0.1, steps=10),
        "PGD-20 linf": lambda m: PGD(m, 0.1, steps=20, seed=0),
        "PGD-20 l2": lambda m: PGD(m, 1.0, steps=20, norm="l2", seed=0),
        "PGD-20 l1": lambda m: PGD(m, 3.0, steps=20, norm="l1", seed=0),
        "APGD-CE (100 it)": lambda m: APGD(m, 0.1, steps=100, seed=0),
        "APGD-CE L1 (100 it)": lambda m: APGD(m, 3.0, "l1", steps=100, seed=0),
        "APGD-T (9->4 targets x 100 it)": lambda m: APGDT(m, 0.1, steps=100, seed=0),
        "FAB-T linf (9->4 targets x 100 it)": lambda m: FABT(m, "linf", steps=100, seed=0),
        "FAB-T l2 (9->4 targets x 100 it)": lambda m: FABT(m, "l2", steps=100, seed=0),
        "Square linf (1000 queries)": lambda m: Square(m, 0.1, n_queries=1000, seed=0),
        "Square l2 (1000 queries)": lambda m: Square(m, 1.0, "l2", n_queries=1000, seed=0),
        "DeepFool L2 (<= 50 it)": lambda m: DeepFool(m),
        "CW L2 (9 x <= 200 it)": lambda m: CW(m, steps=200),
        "LBFGS (5 c x 50 it)": lambda m: LBFGS(m, search_steps=5, max_iter=50),
    }
    print(f"\n{'attack (fixed budget)':<34}" + "".join(f"{name:>18}" for name in models))
    print(f"{'':<34}" + "".join(f"{'images/s':>18}" for _ in models))
    for name, make in budgets.items():
        row = f"{name:<34}"
        for m in models.values():
            m.eval()
            t = timed(lambda m=m, make=make: make(m)(x, y), 1, warmup=False)
            row += f"{len(x) / t:>18.1f}"
        print(row, flush=True)
    for cascade in ("autoattack-fast", "autoattack"):
        row = f"{cascade + ' linf 0.1 (cascade)':<34}"
        for m in models.values():
            t = timed(lambda m=m, c=cascade: evaluate(m, x, y, [c], [0.1], "linf", check=False),
                      1, warmup=False)
            row += f"{len(x) / t:>18.1f}"
        print(row, flush=True)
    row = f"{'Universal (fit, 300 imgs, 1 pass)':<34}"
    for m in models.values():
        t = timed(lambda m=m: UniversalPerturbation(m, 2.0, max_passes=1).fit(
            task.train.x[:300]), 1, warmup=False)
        row += f"{300 / t:>18.1f}"
    print(row)


if __name__ == "__main__":
    main()
