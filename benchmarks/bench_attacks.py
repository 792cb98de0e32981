"""Attack speed on the digits models (a benchmark script, not a test).

Prints (1) the time of one PGD step divided by the time of one forward + backward pass with
respect to the input on the same batch, as attacks take it (floor 1.0; goal <= 1.10), for
each norm, beside that pass's time with PyTorch's own BatchNorm backward, (2)
images per second for each attack at a fixed budget on a natural and a PGD-trained model, and
(3) wall time against torchattacks (Kim 2020) at equal budgets on the same models, batch and
threads: our time / theirs (goal: <= 0.9 for APGD-CE and APGD-T, <= 1.0 for FAB-T, Square and
the AutoAttack cascade) with both robust accuracies side by side. The two libraries alternate
(ABAB..., `--peer-repeats` pairs after a warm-up on a few examples) and the ratio is the
median of the pairs' ratios, in wall time and in this process's CPU time (on a shared
machine the second does not count other processes' turns on the cores). Section (3) is
skipped, saying so, when torchattacks is not importable (it is not a dependency; `pip install
--no-deps torchattacks` into a separate folder on PYTHONPATH is enough: it needs no
torchvision for these attacks).

    .venv/bin/python benchmarks/bench_attacks.py [--batch 256] [--threads 1]
        [--sections step,throughput,peers] [--peer-repeats 5] [--peer-rows fab,square]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

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
from robust_transfer.attacks.registry import make_attack
from robust_transfer.attacks.threats import make_threat
from robust_transfer.data import load_task
from robust_transfer.models.runtime import input_gradients_only, predict_logits
from robust_transfer.train import SourceConfig, TrainConfig, train_source

try:  # optional: the peer library of section (3)
    import torchattacks
except ImportError:  # pragma: no cover - depends on the environment
    torchattacks = None

SECTIONS = ("step", "throughput", "peers")


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
    """One forward and one backward pass with respect to the input, as an attack step takes
    them (eval-mode BatchNorm backpropagating to its input only, `input_gradients_only`)."""
    with input_gradients_only(model):
        return plain_forward_backward(model, x, y)


def plain_forward_backward(model, x, y):
    """`forward_backward` with PyTorch's own BatchNorm backward (which also reduces over the
    input for the unused weight gradient)."""
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


def robust_accuracy(model, x, y, x_adv, eps: float, norm: str) -> float:
    """Share of `x` still classified as `y` at `x_adv` or broken only beyond eps (the rule
    both libraries' cascades use; minimal-norm results may lie outside the ball)."""
    pred = predict_logits(model, x_adv).argmax(1)
    size = make_threat(norm, eps).distance(x_adv, x)
    return ((pred == y) | (size > eps * (1 + 1e-5) + 1e-7)).float().mean().item()


def peer_pairs(eps: float, n_classes: int) -> list[tuple[str, float, Callable, Callable]]:
    """(row, goal ratio, ours, theirs): each a function (model, x, y) -> x_adv at the same
    budget (AutoAttack's standard one) and eps."""
    ta = torchattacks
    k = n_classes

    def ours_cascade(m, x, y):
        ex: dict = {}
        evaluate(m, x, y, ["autoattack"], [eps], "linf", check=False, examples=ex)
        return ex[eps]

    def theirs_cascade(m, x, y):
        atk = ta.AutoAttack(m, norm="Linf", eps=eps, version="standard", n_classes=k, seed=0)
        for inner in atk._autoattack.attacks[:3]:  # its APGD, APGD-T, FAB default to 10 steps
            inner.steps = 100
        return atk(x, y)

    return [
        ("APGD-CE linf (100 it)", 0.9,
         lambda m, x, y: APGD(m, eps, steps=100, seed=0)(x, y),
         lambda m, x, y: ta.APGD(m, eps=eps, steps=100, loss="ce", seed=0)(x, y)),
        (f"APGD-T linf ({k - 1} targets x 100 it)", 0.9,
         lambda m, x, y: APGDT(m, eps, steps=100, seed=0)(x, y),
         lambda m, x, y: ta.APGDT(m, eps=eps, steps=100, n_classes=k, seed=0)(x, y)),
        (f"FAB-T linf ({k - 1} targets x 100 it)", 1.0,
         lambda m, x, y: make_attack("fab-t", m, eps, "linf", 100)(x, y),
         lambda m, x, y: ta.FAB(m, eps=eps, steps=100, multi_targeted=True, n_classes=k,
                                seed=0)(x, y)),
        ("Square linf (5000 queries)", 1.0,  # AutoAttack's, as torchattacks' (see Square)
         lambda m, x, y: Square(m, eps, n_queries=5000, seed=0, windows="batch")(x, y),
         lambda m, x, y: ta.Square(m, eps=eps, n_queries=5000, seed=0)(x, y)),
        ("AutoAttack standard linf (cascade)", 1.0, ours_cascade, theirs_cascade),
    ]


def _pair_ratios(ours: Callable, theirs: Callable, pairs: int) -> tuple[dict, dict]:
    """Run `ours()` and `theirs()` alternately (ABAB...) `pairs` times: ({"wall": ratios,
    "cpu": ratios}, last outputs). A ratio is per pair (ours / theirs of the same round), so
    a load change between rounds cancels; CPU time (this process's, one thread) does not
    count the time other processes hold the cores."""
    outputs: dict = {}
    ratios: dict[str, list[float]] = {"wall": [], "cpu": []}
    for _ in range(pairs):
        spent = {}
        for side, fn in (("ours", ours), ("theirs", theirs)):
            w0, c0 = time.perf_counter(), time.process_time()
            outputs[side] = fn()
            spent[side] = (time.perf_counter() - w0, time.process_time() - c0)
        for k, kind in enumerate(("wall", "cpu")):
            ratios[kind].append(spent["ours"][k] / max(spent["theirs"][k], 1e-9))
    return ratios, outputs


def peer_table(models: dict, x, y, eps: float, pairs: int, rows: str | None) -> None:
    """Section (3): our time / torchattacks' per attack and model (median of per-pair ratios
    over `pairs` alternating pairs, wall and CPU time), and both robust accuracies."""
    if torchattacks is None:
        print("\ntorchattacks is not importable: the comparison with it is skipped "
              "(pip install --no-deps --target DIR torchattacks; PYTHONPATH=DIR)")
        return
    n_classes = int(predict_logits(next(iter(models.values())), x[:1]).shape[1])
    print(f"\nagainst torchattacks {torchattacks.__version__}, linf eps {eps}, batch {len(x)}, "
          f"{torch.get_num_threads()} thread(s); ratio = ours / theirs, the median over {pairs} "
          "alternating pairs (ABAB...) of the pair's ratio, [min-max] its spread; cpu: this "
          "process's CPU time, unaffected by other processes holding the cores")
    print(f"{'attack':<36}{'model':<17}{'wall ratio':>11}{'[min-max]':>13}{'cpu ratio':>11}"
          f"{'[min-max]':>13}{'goal':>6}{'robust acc ours/theirs':>24}")
    for name, goal, ours, theirs in peer_pairs(eps, n_classes):
        if rows and not any(r.lower() in name.lower() for r in rows.split(",")):
            continue
        for label, m in models.items():
            m.eval()
            ours(m, x[:8], y[:8]), theirs(m, x[:8], y[:8])  # warm-up, on a few examples
            ratios, adv = _pair_ratios(partial(ours, m, x, y), partial(theirs, m, x, y), pairs)
            acc = {side: robust_accuracy(m, x, y, adv[side], eps, "linf") for side in adv}
            cells = "".join(f"{statistics.median(r):>11.2f}{f'[{min(r):.2f}-{max(r):.2f}]':>13}"
                            for r in (ratios["wall"], ratios["cpu"]))
            print(f"{name:<36}{label:<17}{cells}{goal:>6.1f}"
                  f"{acc['ours']:>13.3f} / {acc['theirs']:.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help="comma-separated subset of: " + ", ".join(SECTIONS))
    parser.add_argument("--peer-repeats", type=int, default=5,
                        help="alternating pairs (ours, theirs) per cell of the torchattacks "
                             "comparison; the ratio is the median of the pairs' ratios")
    parser.add_argument("--peer-rows", default=None,
                        help="only the comparison rows whose name contains one of these "
                             "comma-separated words (e.g. fab,square)")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    if not sections <= set(SECTIONS):
        parser.error(f"--sections: choose from {', '.join(SECTIONS)}")
    if args.peer_repeats < 1:
        parser.error("--peer-repeats must be >= 1")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {args.batch}")

    task = load_task("digits-0to4")
    x, y = task.test.x[: args.batch], task.test.y[: args.batch]
    models = {
        "natural": train_source(SourceConfig(task=task.name, train=TrainConfig(epochs=10)))[0],
        "pgd-at linf 0.1": train_source(SourceConfig(task=task.name, eps=0.1, norm="linf",
                                                     train=TrainConfig(epochs=10)))[0],
    }
    if "step" in sections:
        step_table(models["natural"].eval(), x, y, args.repeats)
    if "throughput" in sections:
        throughput_table(models, x, y, task)
    if "peers" in sections:
        peer_table(models, x, y, 0.1, args.peer_repeats, args.peer_rows)


def step_table(model, x, y, repeats: int) -> None:
    """Section (1): one PGD step against one forward + backward, per norm."""
    steps = 20
    base = timed(lambda: forward_backward(model, x, y), repeats * 10)
    plain = timed(lambda: plain_forward_backward(model, x, y), repeats * 10)
    print(f"\nforward+backward (w.r.t. input), batch {len(x)}: {base * 1e3:.3f} ms (with "
          f"PyTorch's own BatchNorm backward: {plain * 1e3:.3f} ms)")
    forward_backward(model, x, y)  # warm-up before the alternating rounds
    print(f"{'PGD step / (forward+backward)':<34}{'ratio':>8}{'ms/step':>10}")
    for norm, eps in (("linf", 0.1), ("l2", 1.0), ("l1", 3.0)):
        ratio, per_step = pgd_step_ratio(model, x, y, norm, eps, steps, repeats)
        print(f"  PGD-{norm:<28}{ratio:>8.3f}{per_step * 1e3:>10.3f}")


def throughput_table(models: dict, x, y, task) -> None:
    """Section (2): images per second for each attack at a fixed budget."""
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
