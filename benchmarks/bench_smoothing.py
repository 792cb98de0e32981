"""Training for randomized smoothing on digits 0-4: cost per epoch relative to natural
training, clean test accuracy, clean accuracy under N(0, sigma^2) noise, and PGD-20 L2
accuracy of the base model (a benchmark, not a test).

Sources: natural, gaussian (Cohen et al. 2019) at sigma, smoothadv (Salman et al. 2019) at
L2 eps and sigma with m = 1 and m = 2 noise samples, all on the demo's recipe (cnn-small,
30 epochs, 7 attack steps). Cost as in bench_methods.py: 8 passes, fastest of `--repeats`
interleaved rounds. Noise accuracy: mean over `--draws` noise draws of the test set.

    .venv/bin/python benchmarks/bench_smoothing.py [--sigma 0.25] [--eps 0.5] [--epochs 30]
"""

from __future__ import annotations

import argparse

import torch
from bench_attacks import timed
from bench_methods import pass_timer

from robust_transfer.attacks import PGD, evaluate
from robust_transfer.data import load_task
from robust_transfer.train import SourceConfig, TrainConfig, train_source
from robust_transfer.train.smoothing import noisy_accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--eps", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--steps", type=int, default=7, help="smoothadv PGD steps")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--draws", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    train = TrainConfig(epochs=args.epochs, batch_size=64)
    base = {"task": "digits-0to4", "attack_steps": args.steps, "train": train}
    configs = {
        "natural": SourceConfig(**base),
        "gaussian": SourceConfig(**base, method="gaussian", sigma=args.sigma),
        "smoothadv (m = 1)": SourceConfig(**base, method="smoothadv", eps=args.eps,
                                          sigma=args.sigma, noise_samples=1),
        "smoothadv (m = 2)": SourceConfig(**base, method="smoothadv", eps=args.eps,
                                          sigma=args.sigma, noise_samples=2),
    }
    timers = {name: pass_timer(cfg) for name, cfg in configs.items()}
    for run in timers.values():
        run()  # warm-up
    rounds: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(args.repeats):
        for name, run in timers.items():
            rounds[name].append(timed(run, 1, warmup=False) / 8)
    costs = {name: min(v) for name, v in rounds.items()}
    test = load_task("digits-0to4").test

    def pgd(m, e):
        return PGD(m, e, steps=20, norm="l2", seed=0)

    pgd.__name__ = "pgd-20"
    print(f"digits-0to4, cnn-small, {args.epochs} epochs; sigma {args.sigma:g}; smoothadv L2 "
          f"eps {args.eps:g}, {args.steps} steps; noise accuracy over {args.draws} draws; "
          f"PGD-20 L2 eps {args.eps:g} on the base model")
    print("| source | s/epoch | × natural | clean | clean under N(0, σ²) | PGD-20 L2 |")
    print("|---|---|---|---|---|---|")
    for name, cfg in configs.items():
        model, card = train_source(cfg)
        clean = card.metrics["clean_accuracy"]
        noisy = noisy_accuracy(model, test.x, test.y, args.sigma, seed=1, draws=args.draws)
        table = evaluate(model, test.x, test.y, [pgd], [args.eps], "l2", check=False)
        robust = float(table[table["attack"] == "worst case"].iloc[0].robust_accuracy)
        print(f"| {name} | {costs[name]:.3f} | {costs[name] / costs['natural']:.2f} | "
              f"{clean:.3f} | {noisy:.3f} | {robust:.3f} |")


if __name__ == "__main__":
    main()
