"""Adversarial-training variants on digits 0-4: cost per epoch relative to natural training,
clean and PGD-20 robust test accuracy (a benchmark, not a test).

Goals (issue 8): free <= 1.2x natural cost and fast <= 2.2x, each within 2 points of PGD-AT's
robust accuracy. Cost: 8 passes over the training set (free: 8/m sweeps of m replays), timed with
`bench_attacks.timed` in `--repeats` rounds over all methods, fastest round / 8; the fast method's
held-out overfitting watch is not in its cost (its own time is printed separately).

    .venv/bin/python benchmarks/bench_methods.py [--eps 0.15] [--norm linf] [--epochs 16]
"""

from __future__ import annotations

import argparse
import copy

import torch
from bench_attacks import timed

from robust_transfer.data import load_task
from robust_transfer.models import ModelSpec, build_model
from robust_transfer.train import SourceConfig, TrainConfig, fit, train_source
from robust_transfer.train.methods import METHODS, NOISE_METHODS, make_objective


def pass_timer(cfg: SourceConfig, passes: int = 8):
    """A function that runs `passes` passes of `fit` (free: passes / m sweeps of m replays)
    from a fresh copy of one initial model."""
    data = load_task(cfg.task).train
    template = build_model(ModelSpec(cfg.arch, 5), seed=0)
    schedule = TrainConfig(epochs=passes, batch_size=cfg.train.batch_size, lr=cfg.train.lr)

    def run():
        objective = make_objective(cfg.method, cfg.eps, cfg.norm, cfg.attack_steps,
                                   seed=cfg.train.seed, free_replays=cfg.free_replays or 1,
                                   sigma=cfg.sigma, noise_samples=cfg.noise_samples)
        fit(copy.deepcopy(template), data, schedule, objective)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eps", type=float, default=0.15)
    parser.add_argument("--norm", default="linf")
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--steps", type=int, default=7, help="PGD-AT / TRADES steps")
    parser.add_argument("--free-replays", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    configs = {}
    for method in (m for m in METHODS if m not in NOISE_METHODS):  # bench_smoothing.py
        eps = 0.0 if method == "natural" else args.eps
        configs[method] = SourceConfig(
            task="digits-0to4", eps=eps, norm=args.norm, method=method,
            attack_steps=args.steps, free_replays=args.free_replays if method == "free" else None,
            train=TrainConfig(epochs=args.epochs, batch_size=64))
    # Rounds over all methods, so that a burst of load on the shared machine does not hit
    # one method only; each method's cost is its fastest round.
    timers = {m: pass_timer(c) for m, c in configs.items()}
    for run in timers.values():
        run()  # warm-up
    rounds: dict[str, list[float]] = {m: [] for m in timers}
    for _ in range(args.repeats):
        for m, run in timers.items():
            rounds[m].append(timed(run, 1, warmup=False) / 8)
    costs = {m: min(v) for m, v in rounds.items()}
    rows = []
    for method, cfg in configs.items():
        seconds = costs[method]
        _, card = train_source(cfg)
        m = card.metrics
        monitor = sum(r.get("monitor_seconds", 0.0) for r in m["history"])
        rows.append((method, seconds, m["clean_accuracy"], m["robust_accuracy"],
                     m["history"][-1]["passes"], monitor, m.get("overfit")))
    natural = rows[0][1]
    pgd_robust = next(r[3] for r in rows if r[0] == "pgd")
    print(f"digits-0to4, {args.norm} eps={args.eps:g}, {args.epochs} epochs (passes), "
          f"PGD-AT/TRADES {args.steps} steps, free m={args.free_replays}; "
          f"robust = PGD-20 at eps {args.eps:g} on the test set")
    print("| method | s/epoch | × natural | clean | PGD-20 | Δ robust vs PGD-AT | passes |")
    print("|---|---|---|---|---|---|---|")
    for method, seconds, clean, robust, passes, _, _ in rows:
        delta = "" if method == "natural" else f"{100 * (robust - pgd_robust):+.1f} pt"
        print(f"| {method} | {seconds:.3f} | {seconds / natural:.2f} | {clean:.3f} | "
              f"{robust:.3f} | {delta} | {passes} |")
    for method, _, _, _, _, monitor, overfit in rows:
        if overfit:
            print(f"{method}: overfitting watch {monitor:.1f} s in all (not in s/epoch); "
                  f"collapses at epochs {overfit['catastrophic_overfit_epochs']}, held out "
                  f"{overfit['monitor_size']} training images")
    goals = {"free": 1.2, "fast": 2.2}
    for method, limit in goals.items():
        row = next(r for r in rows if r[0] == method)
        ratio, gap = row[1] / natural, 100 * (row[3] - pgd_robust)
        ok = ratio <= limit and gap >= -2
        print(f"goal {method}: cost {ratio:.2f}x (<= {limit}x), robust {gap:+.1f} pt vs PGD-AT "
              f"(>= -2 pt): {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
