"""The attack calling convention: `atk = Name(model, ...)`, `x_adv = atk(x, y)`.

Every attack runs the model in eval mode (`set_mode("train")`: in the mode the caller has
it, as training-time attacks in some reference codes do) and restores each module's mode
afterwards, takes gradients with `torch.autograd.grad` (so `param.grad` is never touched;
in eval mode its BatchNorm layers skip their own weight gradients, `input_gradients_only`),
and returns a detached tensor. Randomness inside `perturb` comes from `ExampleRNG`
(attacks/rng.py): per example, keyed by `seed` and the example's content, so a fresh attack
with the same seed gives the same examples and an example's result does not depend on its
batch; no global flags.
`generator()` remains for dataset-level sampling (fit order, start images).

Adaptive options against input-transformation defenses (attacks/adaptive.py, Athalye et al.
2018), set with `set_adaptive(bpda=..., eot_samples=...)` on any attack: BPDA holds for every
gradient the attack takes (the scope spans its whole run); EOT averages the gradient over
draws of the defense's randomness in `input_gradient`, the one place the gradient attacks
(FGSM, BIM, PGD, APGD family) take their gradients, so only attacks with `supports_eot` take it.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch
from torch import nn

from robust_transfer.attacks.adaptive import bpda_scope, check_adaptive, eot_gradient
from robust_transfer.attacks.losses import get_loss
from robust_transfer.errors import UserError, check_choice
from robust_transfer.models.runtime import eval_mode, input_gradients_only

ATTACK_MODES = ("eval", "train")


class Attack:
    """Base class: subclasses implement `perturb(x, y, target)` on detached inputs.

    `loss` names the per-example objective the gradient attacks ascend ("ce", "cw" margin,
    "dlr"; see `attacks.losses`). Class attributes describe the attack to evaluators and to
    the name registry (`attacks.registry`):

    - `name`: the registry name ("pgd", "apgd-ce", ...); "" for attacks not in the registry;
    - `norms`: the threat models it supports; asking for another is a `UserError`;
    - `minimal_norm`: it finds the smallest perturbation and takes no eps (an evaluator
      counts an example broken at eps only where that perturbation's norm is <= eps);
    - `black_box`: it uses no gradients;
    - `default_steps`: its published iteration/query budget (None: it has none);
    - `norm`: the norm an instance's perturbations are measured in;
    - `supports_eot`: its gradients all come from `input_gradient`, so `eot_samples` applies;
    - `stop_norm` (minimal-norm attacks, per instance): None when it searches each example
      for its smallest perturbation; a norm when, as AutoAttack's FAB, it stops searching an
      example once it has one of at most that norm (an evaluator may not read a larger
      result as the smallest norm).

    `build(model, eps, norm, steps, seed)` makes an instance from the evaluator's budget;
    subclasses override it to map `steps` onto their own parameter.
    """

    name: str = ""
    norms: tuple[str, ...] = ("linf",)
    minimal_norm: bool = False
    black_box: bool = False
    default_steps: int | None = None
    norm: str = "linf"
    supports_eot: bool = False
    stop_norm: float | None = None
    bpda: bool = False
    eot_samples: int = 1
    mode: str = "eval"

    @classmethod
    def check_norm(cls, norm: str) -> None:
        """`UserError` unless this attack supports `norm`, naming the ones it does."""
        if norm not in cls.norms:
            label = cls.name or cls.__name__
            raise UserError(f"attack {label!r} does not support norm {norm!r}; "
                            f"it supports: {', '.join(cls.norms)}")

    @classmethod
    def build(
        cls, model: nn.Module, eps: float, norm: str, steps: int | None = None, seed: int = 0
    ) -> Attack:
        """An instance for one evaluation: threat model (norm, eps), `steps` iterations
        (None: `default_steps`), random streams seeded by `seed`."""
        raise NotImplementedError(f"{cls.__name__} is not buildable by name")

    def __init__(self, model: nn.Module, seed: int | None = None, loss: str = "ce") -> None:
        self.model = model
        self.seed = seed
        self.loss = loss
        self.loss_fn = get_loss(loss)
        self._generator: torch.Generator | None = None

    def set_adaptive(self, bpda: bool = False, eot_samples: int = 1) -> Attack:
        """Adaptive options (Athalye et al. 2018): `bpda` backpropagates through the
        differentiable approximation of every non-differentiable `InputTransform` in the model;
        `eot_samples=n` averages each gradient over n draws of the model's randomness.
        Returns the attack, so `PGD(defended, eps).set_adaptive(eot_samples=30)(x, y)` is one
        line. `UserError` for eot_samples > 1 on an attack without `supports_eot`."""
        check_adaptive(bpda, eot_samples)
        if eot_samples > 1 and not self.supports_eot:
            label = self.name or type(self).__name__
            raise UserError(f"attack {label!r} does not take eot_samples (its gradients do not "
                            "all come from input_gradient); use pgd, fgsm, bim or apgd-*")
        self.bpda, self.eot_samples = bpda, eot_samples
        return self

    def set_mode(self, mode: str) -> Attack:
        """The model's mode while this attack runs: "eval" (default: BatchNorm on its running
        statistics, as MadryLab robustness and TRADES make training examples) or "train": the
        model as the caller has it (a training loop: BatchNorm on the batch's statistics, and
        the attack's forward passes update its running statistics, as Wong et al.'s fast-AT,
        Shafahi et al.'s free-AT and Goldblum et al.'s ARD code do). Returns the attack."""
        check_choice("attack mode", mode, ATTACK_MODES)
        self.mode = mode
        return self

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The attack's own random stream on `device` (None: torch's global stream)."""
        if self.seed is None:
            return None
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None
    ) -> torch.Tensor:
        if target is not None:
            target = target.detach().to(y.device)
        with ExitStack() as scope:
            if self.mode == "eval":
                scope.enter_context(eval_mode(self.model))
                scope.enter_context(input_gradients_only(self.model))
            scope.enter_context(torch.enable_grad())
            scope.enter_context(bpda_scope(self.bpda))
            x_adv = self.perturb(x.detach(), y.detach(), target)
        return x_adv.detach()

    def perturb(self, x, y, target):
        raise NotImplementedError

    def input_gradient(
        self, x_adv: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(gradient, logits): ascent direction of the summed loss at `x_adv`.

        Untargeted: gradient of loss(f(x), y), e.g. CE(f(x), y). Targeted: gradient of the
        targeted loss, e.g. -CE(f(x), target), so an ascent step moves toward the target class
        either way. One forward and one backward; `self.last_loss` keeps the per-example loss.
        With `eot_samples=n`: gradient, logits and loss averaged over n draws (EOT).
        """
        if self.eot_samples > 1:
            grad, logits, self.last_loss = eot_gradient(self.model, self.loss_fn, x_adv, y,
                                                        target, self.eot_samples)
            return grad, logits
        x_adv = x_adv.detach().requires_grad_(True)
        logits = self.model(x_adv)
        loss = self.loss_fn(logits, y, target)
        (grad,) = torch.autograd.grad(loss.sum(), x_adv)
        self.last_loss = loss.detach()
        return grad, logits.detach()

    def input_logits(
        self, x_adv: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits at `x_adv`, setting `self.last_loss` as `input_gradient` does, for an
        iterate whose gradient would go unused (an attack's last one): a forward pass, no
        backward. With `eot_samples=n`: `input_gradient`'s averages (it runs)."""
        if self.eot_samples > 1:
            return self.input_gradient(x_adv, y, target)[1]
        with torch.no_grad():
            logits = self.model(x_adv)
            self.last_loss = self.loss_fn(logits, y, target)
        return logits
