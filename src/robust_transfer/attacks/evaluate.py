"""Robustness evaluation: a cascade of attacks per eps, worst case per example.

`evaluate(model, data, ["apgd-ce", "apgd-t", "square"], eps=[...])` is an AutoAttack-style
evaluation: for each eps, each attack runs only on the examples every earlier attack left
correctly classified, so the final robust accuracy is the per-example worst case.
Minimal-norm attacks (CW, DeepFool, LBFGS) run once, without eps; an example counts as
broken at eps when they fooled it with a perturbation of norm <= eps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pandas as pd
import torch
from torch import nn

from robust_transfer.attacks.apgd import APGD, APGDT
from robust_transfer.attacks.base import Attack
from robust_transfer.attacks.gradient import BIM, FGSM, PGD
from robust_transfer.attacks.masking import check_black_box, check_eps_curve, check_model
from robust_transfer.attacks.minimal import CW, LBFGS, DeepFool
from robust_transfer.attacks.square import Square
from robust_transfer.attacks.threats import make_threat
from robust_transfer.errors import UserError, check_choice
from robust_transfer.models.runtime import predict_logits


def _steps(steps, default):
    return default if steps is None else steps


# name -> builder(model, eps, norm, steps, seed): one place that maps CLI names to classes.
ATTACKS: dict[str, Callable[..., Attack]] = {
    "fgsm": lambda m, eps, norm, steps, seed: FGSM(m, eps, norm),
    "bim": lambda m, eps, norm, steps, seed: BIM(m, eps, steps=steps),
    "pgd": lambda m, eps, norm, steps, seed: PGD(m, eps, steps=_steps(steps, 20), norm=norm,
                                                 seed=seed),
    "apgd-ce": lambda m, eps, norm, steps, seed: APGD(m, eps, norm, _steps(steps, 100), "ce",
                                                      seed=seed),
    "apgd-dlr": lambda m, eps, norm, steps, seed: APGD(m, eps, norm, _steps(steps, 100), "dlr",
                                                       seed=seed),
    "apgd-t": lambda m, eps, norm, steps, seed: APGDT(m, eps, norm, _steps(steps, 100),
                                                      seed=seed),
    "square": lambda m, eps, norm, steps, seed: Square(m, eps, norm, _steps(steps, 5000),
                                                       seed=seed),
    "cw": lambda m, eps, norm, steps, seed: CW(m, steps=_steps(steps, 10000)),
    "deepfool": lambda m, eps, norm, steps, seed: DeepFool(m, "linf" if norm == "linf" else "l2",
                                                           steps=_steps(steps, 50)),
    "lbfgs": lambda m, eps, norm, steps, seed: LBFGS(m, max_iter=_steps(steps, 100)),
}
MINIMAL_NORM = ("cw", "deepfool", "lbfgs")
# AutoAttack's standard cascade (Croce & Hein 2020), without FAB-T.
AUTOATTACK = ("apgd-ce", "apgd-t", "square")


def make_attack(
    name: str,
    model: nn.Module,
    eps: float = 8 / 255,
    norm: str = "linf",
    steps: int | None = None,
    seed: int = 0,
) -> Attack:
    """The attack called `name` (see `ATTACKS`); `steps` is its iteration/query budget."""
    check_choice("attack", name, ATTACKS)
    make_threat(norm, eps)  # validates norm and eps
    if steps is not None and steps < 1:
        raise UserError(f"steps must be >= 1, got {steps}")
    return ATTACKS[name](model, eps, norm, steps, seed)


def _as_xy(data) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(data, "x") and hasattr(data, "y"):
        return data.x, data.y
    x, y = data
    return x, y


def run_batched(attack: Attack, x, y, batch_size: int, device) -> torch.Tensor:
    """`attack(x, y)` in batches on `device`; the result on x's device."""
    out = [attack(x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)).to(x.device)
           for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else x.clone()


AttackSpec = str | Callable[[nn.Module, float], Attack]


def evaluate(
    model: nn.Module,
    data,
    attacks: Sequence[AttackSpec] = AUTOATTACK,
    eps: Sequence[float] = (8 / 255,),
    norm: str = "linf",
    steps: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    check: bool = True,
    progress: Callable[[], None] | None = None,
    examples: dict | None = None,
) -> pd.DataFrame:
    """Clean and robust accuracy per eps under the attack cascade, as a tidy DataFrame.

    `attacks`: names from `ATTACKS`, or callables `(model, eps) -> Attack`. One row per
    (eps, attack) — `robust_accuracy` after that stage, `attack_success_rate` among the
    examples it attacked, `median_min_norm` for minimal-norm attacks (median `norm`-size of
    their successful perturbations on clean-correct examples) — plus an attack="worst case"
    row per eps. `progress()` is called after each stage. Pass a dict as `examples` to get
    {eps: worst-case adversarial inputs} back in it. With `check`, gradient-masking
    checks run and warn (`GradientMaskingWarning`).
    """
    x, y = _as_xy(data)
    eps = [float(e) for e in eps]
    for e in eps:
        make_threat(norm, e)
    if not attacks:
        raise UserError("no attacks given; allowed: " + ", ".join(sorted(ATTACKS)))
    for a in attacks:
        if isinstance(a, str):
            check_choice("attack", a, ATTACKS)
    device = next(model.parameters()).device
    threat = make_threat(norm, 0.0)
    clean_pred = predict_logits(model, x.to(device)).argmax(1).to(x.device)
    correct = clean_pred == y
    n = len(y)
    clean_acc = correct.float().mean().item() if n else float("nan")
    if check and n:
        k = min(n, batch_size)
        check_model(model, x[:k].to(device), y[:k].to(device))

    minimal: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def run_minimal(name: str, atk: Attack):
        """(x_adv, size, fooled) over all examples, computed once per attack."""
        if name not in minimal:
            x_adv = x.clone()
            idx = correct.nonzero().squeeze(1)
            x_adv[idx] = run_batched(atk, x[idx], y[idx], batch_size, device)
            pred = predict_logits(model, x_adv.to(device)).argmax(1).to(x.device)
            minimal[name] = (x_adv, threat.distance(x_adv, x), (pred != y) & correct)
        return minimal[name]

    rows, worst = [], []
    for e in eps:
        robust = correct.clone()
        x_worst = x.clone()
        stages = []
        for spec in attacks:
            name = spec if isinstance(spec, str) else getattr(spec, "__name__", repr(spec))
            atk = make_attack(spec, model, e, norm, steps, seed) if isinstance(spec, str) \
                else spec(model, e)
            idx = robust.nonzero().squeeze(1)
            median_norm = float("nan")
            if len(idx) == 0 and not atk.minimal_norm:
                x_adv, fooled = x[idx], torch.zeros(0, dtype=torch.bool)
            elif atk.minimal_norm:
                x_adv, size, fooled_all = run_minimal(name, atk)
                fooled = fooled_all[idx] & (size[idx] <= e * (1 + 1e-5) + 1e-7)
                x_adv = x_adv[idx]
                if fooled_all.any():
                    median_norm = size[fooled_all].median().item()
            else:
                x_adv = run_batched(atk, x[idx], y[idx], batch_size, device)
                pred = predict_logits(model, x_adv.to(device)).argmax(1).to(x.device)
                fooled = pred != y[idx]
            x_worst[idx[fooled]] = x_adv[fooled]
            robust[idx[fooled]] = False
            acc = robust.float().mean().item() if n else float("nan")
            stages.append((name, atk.black_box, acc))
            rows.append({
                "eps": e, "norm": norm, "attack": name, "n": n, "clean_accuracy": clean_acc,
                "robust_accuracy": acc,
                "attack_success_rate": fooled.float().mean().item() if len(idx) else 0.0,
                "n_attacked": len(idx), "median_min_norm": median_norm,
            })
            if progress is not None:
                progress()
        n_correct = int(correct.sum())
        rows.append({
            "eps": e, "norm": norm, "attack": "worst case", "n": n, "clean_accuracy": clean_acc,
            "robust_accuracy": robust.float().mean().item() if n else float("nan"),
            "attack_success_rate": (1 - robust.sum().item() / n_correct) if n_correct else 0.0,
            "n_attacked": n_correct, "median_min_norm": float("nan"),
        })
        worst.append(rows[-1]["robust_accuracy"])
        if examples is not None:
            examples[e] = x_worst
        if check:
            check_black_box(stages)
    if check and len(eps) > 1:
        check_eps_curve(eps, worst)
    return pd.DataFrame(rows)
