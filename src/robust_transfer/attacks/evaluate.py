"""Robustness evaluation: a cascade of attacks per eps, worst case per example.

`evaluate(model, x, y, ["autoattack"], eps=[...])` is the one code path that measures robust
accuracy (the CLI, source training's robust column and the transfer matrix all call it). For
each eps, each attack runs only on the examples every earlier attack left correctly
classified, so the final robust accuracy is the per-example worst case (AutoAttack's rule).
Minimal-norm attacks (CW, DeepFool, LBFGS, FAB) run at most once per example for all eps, on
the examples still robust when their turn comes; an example counts as broken at eps only
where they fooled it with a perturbation of norm <= eps. FAB and FAB-T stop an example once
they have one within eps (AutoAttack's rule); such a result is reused at another eps only
where it settles that eps (`_Minimal.answers`), else the example is attacked again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

from robust_transfer.attacks.adaptive import check_adaptive
from robust_transfer.attacks.base import Attack
from robust_transfer.attacks.masking import check_black_box, check_eps_curve, check_model
from robust_transfer.attacks.registry import make_attack, stages
from robust_transfer.attacks.threats import ThreatModel, make_threat
from robust_transfer.errors import UserError
from robust_transfer.models.runtime import predict_logits

# An attack given by name, or a factory (model, eps) -> Attack for custom settings.
AttackSpec = str | Callable[[nn.Module, float], Attack]
# Float slack when comparing a minimal perturbation's norm with eps.
NORM_TOLERANCE = (1e-5, 1e-7)


@dataclass(frozen=True)
class _Stage:
    label: str  # unique within one evaluation (the table's `attack` column)
    make: Callable[[float], Attack]  # eps -> attack


@dataclass
class _Minimal:
    """A minimal-norm attack's results so far (run lazily, per example, across all eps)."""

    x_adv: torch.Tensor
    size: torch.Tensor  # perturbation norm per example
    fooled: torch.Tensor  # misclassified at x_adv (only where `ran`)
    stop: torch.Tensor  # the run's stop_norm (inf: it searched for the smallest norm)
    ran: torch.Tensor

    @classmethod
    def empty(cls, x: torch.Tensor) -> _Minimal:
        inf = torch.full((len(x),), float("inf"), device=x.device, dtype=x.dtype)
        no = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        return cls(x.clone(), inf, no, inf.clone(), no.clone())

    def answers(self, idx: torch.Tensor, eps: float) -> torch.Tensor:
        """Which of `idx` have a result that settles eps: the attack ran on them and did not
        stop at a larger norm than eps before the smallest norm it could find (a result of
        norm in (eps, stop] may have stopped early and says nothing about eps)."""
        size = self.size[idx]
        early = self.fooled[idx] & ~_within(size, eps) & _within(size, self.stop[idx])
        return self.ran[idx] & ~early


def _resolve(model: nn.Module, attacks: Sequence[AttackSpec], norm: str, steps: int | None,
             seed: int, bpda: bool = False, eot_samples: int = 1) -> list[_Stage]:
    """Names (cascades expanded) and factories -> stages with unique labels; every attack
    gets the adaptive options."""
    if not attacks:
        stages([])  # raises the "no attack given" error
    out: list[_Stage] = []
    for spec in attacks:
        if isinstance(spec, str):
            for stage in stages([spec], steps):
                out.append(_Stage(stage.attack, lambda e, s=stage: make_attack(
                    s.attack, model, e, norm, s.steps, seed, bpda, eot_samples)))
        elif callable(spec):
            label = getattr(spec, "__name__", type(spec).__name__)
            if bpda or eot_samples > 1:
                out.append(_Stage(label, lambda e, f=spec: f(model, e).set_adaptive(
                    bpda, eot_samples)))
            else:
                out.append(_Stage(label, lambda e, f=spec: f(model, e)))
        else:
            raise UserError(f"an attack must be a name or a callable (model, eps) -> Attack, "
                            f"got {spec!r}")
    seen: dict[str, int] = {}
    unique = []
    for stage in out:  # two lambdas, or one attack twice, get distinct rows
        seen[stage.label] = seen.get(stage.label, 0) + 1
        label = stage.label if seen[stage.label] == 1 else f"{stage.label} ({seen[stage.label]})"
        unique.append(_Stage(label, stage.make))
    return unique


def _check_data(x: torch.Tensor, y: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise UserError("evaluate needs tensors x (N, C, H, W) in [0,1] and labels y (N,)")
    if x.ndim != 4 or y.ndim != 1 or len(x) != len(y):
        raise UserError(f"evaluate needs x of shape (N, C, H, W) and y of shape (N,), got "
                        f"{tuple(x.shape)} and {tuple(y.shape)}")


def _run_batched(attack: Attack, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                 device: torch.device) -> torch.Tensor:
    """`attack(x, y)` in batches on `device`; the result on x's device."""
    out = [attack(x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)).to(x.device)
           for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else x.clone()


def _within(size: torch.Tensor, eps: float) -> torch.Tensor:
    rel, abs_ = NORM_TOLERANCE
    return size <= eps * (1 + rel) + abs_


class _Cascade:
    """The state one evaluation shares across eps: clean predictions and minimal-norm runs."""

    def __init__(self, model, x, y, threat: ThreatModel, batch_size: int) -> None:
        self.model, self.x, self.y, self.threat = model, x, y, threat
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        self.correct = predict_logits(model, x).argmax(1) == y
        self.minimal: dict[int, _Minimal] = {}  # by stage index, never by name

    def attack(self, atk: Attack, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_adv, fooled) for the examples `idx` under an eps-bounded attack."""
        x_adv = _run_batched(atk, self.x[idx], self.y[idx], self.batch_size, self.device)
        return x_adv, predict_logits(self.model, x_adv).argmax(1) != self.y[idx]

    def minimal_run(self, index: int, atk: Attack, idx: torch.Tensor, eps: float) -> _Minimal:
        """The minimal-norm stage `index`'s results, run on those of `idx` (still robust at
        eps) that no earlier run at another eps answers (`_Minimal.answers`)."""
        res = self.minimal.setdefault(index, _Minimal.empty(self.x))
        todo = idx[~res.answers(idx, eps)]
        if len(todo):
            x_adv = _run_batched(atk, self.x[todo], self.y[todo], self.batch_size, self.device)
            res.x_adv[todo] = x_adv
            res.size[todo] = self.threat.distance(x_adv, self.x[todo])
            res.fooled[todo] = predict_logits(self.model, x_adv).argmax(1) != self.y[todo]
            res.stop[todo] = float("inf") if atk.stop_norm is None else atk.stop_norm
            res.ran[todo] = True
        return res

    def run(self, eps: float, stage_list: list[_Stage], progress) -> tuple[list[dict],
                                                                           torch.Tensor]:
        """One eps: rows per stage, and the worst-case inputs (clean where not broken)."""
        robust, x_worst = self.correct.clone(), self.x.clone()
        rows = []
        for index, stage in enumerate(stage_list):
            atk = stage.make(eps)
            idx = robust.nonzero().squeeze(1)
            median_norm = float("nan")
            if atk.minimal_norm:
                res = self.minimal_run(index, atk, idx, eps)
                x_adv = res.x_adv[idx]
                fooled = res.fooled[idx] & _within(res.size[idx], eps)
                if res.fooled.any():
                    median_norm = res.size[res.fooled].median().item()
            elif len(idx):
                x_adv, fooled = self.attack(atk, idx)
            else:
                x_adv, fooled = self.x[idx], torch.zeros(0, dtype=torch.bool)
            x_worst[idx[fooled]] = x_adv[fooled]
            robust[idx[fooled]] = False
            rows.append(self._row(eps, stage.label, robust, len(idx), int(fooled.sum()),
                                  median_norm) | {"black_box": atk.black_box})
            if progress is not None:
                progress()
        n_correct = int(self.correct.sum())
        rows.append(self._row(eps, "worst case", robust, n_correct,
                              n_correct - int(robust.sum()), float("nan")) | {"black_box": False})
        return rows, x_worst

    def _row(self, eps, label, robust, n_attacked, n_broken, median_norm) -> dict:
        n = len(self.y)
        return {
            "eps": eps, "norm": self.threat.norm, "attack": label, "n": n,
            "clean_accuracy": self.correct.float().mean().item() if n else float("nan"),
            "robust_accuracy": robust.float().mean().item() if n else float("nan"),
            "n_attacked": n_attacked, "n_broken": n_broken,
            "attack_success_rate": n_broken / n_attacked if n_attacked else 0.0,
            "median_min_norm": median_norm,
        }


def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attacks: Sequence[AttackSpec] = ("autoattack",),
    eps: Sequence[float] = (8 / 255,),
    norm: str = "linf",
    steps: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    check: bool = True,
    progress: Callable[[], None] | None = None,
    examples: dict | None = None,
    bpda: bool = False,
    eot_samples: int = 1,
) -> pd.DataFrame:
    """Clean and robust accuracy per eps under an attack cascade, as a tidy DataFrame.

    `attacks`: names from `attacks.ATTACKS`, cascade names (`"autoattack"`,
    `"autoattack-fast"`), or factories `(model, eps) -> Attack`. `steps` overrides every
    named attack's budget. One row per (eps, stage): `robust_accuracy` after that stage,
    `n_broken` (examples that stage broke), `attack_success_rate` (= n_broken / n_attacked),
    `median_min_norm` for minimal-norm attacks (median norm of their successful
    perturbations on the examples they attacked, all eps so far; FAB and FAB-T stop at the
    first one within eps, so for them it is an upper bound); plus an `attack="worst case"`
    row per eps. `progress()` is called after each stage. Pass a dict as `examples` to get
    {eps: worst-case inputs} back (clean where no attack broke the example within eps). With
    `check`, the gradient-masking checks run and warn (`GradientMaskingWarning`).

    Adaptive options for input-transformation defenses (Athalye et al. 2018; see
    attacks/adaptive.py), given to every attack: `bpda` backpropagates through the
    approximation of each non-differentiable `InputTransform`; `eot_samples=n` averages
    every gradient over n draws of the model's randomness (gradient attacks only). The
    masking checks then take their gradients the same way.
    """
    _check_data(x, y)
    check_adaptive(bpda, eot_samples)
    eps = [float(e) for e in eps]
    if not eps:
        raise UserError("give at least one eps")
    for e in eps:
        make_threat(norm, e)
    stage_list = _resolve(model, list(attacks), norm, steps, seed, bpda, eot_samples)
    for stage in stage_list:  # unsupported norms fail here, before any attack runs
        stage.make(eps[0])
    cascade = _Cascade(model, x, y, make_threat(norm, 0.0), batch_size)
    if check and len(y):
        k = min(len(y), batch_size)
        check_model(model, x[:k].to(cascade.device), y[:k].to(cascade.device), bpda,
                    eot_samples)
    rows, worst = [], []
    for e in eps:
        eps_rows, x_worst = cascade.run(e, stage_list, progress)
        rows += eps_rows
        worst.append(eps_rows[-1]["robust_accuracy"])
        if examples is not None:
            examples[e] = x_worst
        if check:
            check_black_box([(r["attack"], r["black_box"], r["robust_accuracy"])
                             for r in eps_rows[:-1]])
    if check and len(eps) > 1:
        check_eps_curve(eps, worst)
    return pd.DataFrame(rows).drop(columns="black_box")
