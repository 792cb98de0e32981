"""ANP: adversarial neuron pruning (Wu & Wang 2021, "Adversarial neuron pruning purifies
backdoored deep models", arXiv 2110.14430).

Backdoor neurons are the ones whose small multiplicative perturbation makes a backdoored model
misbehave on clean data. ANP gives every BatchNorm channel (a "neuron") a mask m in [0, 1]
(init 1) and multiplicative noise on its BN scale and shift, and solves

    min_m  alpha L(m) + (1 - alpha) max_{|d|,|x| <= eps} L((m + d) * gamma, (1 + x) * beta)

on a little clean data; then it prunes the neurons whose mask ends at or below a threshold.
Following their code (csdongxian/ANP_backdoor, `optimize_mask_cifar.py`,
`prune_neuron_cifar.py`): per iteration a batch of 128 drawn with replacement, the noise
initialised uniform in [-eps, eps] and moved by `steps` signed-gradient ascent steps of size
eps / steps, the mask updated by SGD (lr 0.2, momentum 0.9) and clipped to [0, 1]; BatchNorm
uses the batch's statistics (they optimise in train mode); eps 0.4, alpha 0.2, 2000
iterations. Pruning zeroes the BN scale of each pruned channel (their `pruning`), leaving
the channel a constant (its shift).

The masks live in forward hooks on the model's own BatchNorm layers (`neuron_masks`), removed
on exit, failure included; the model's parameters and buffers are never written while masks
are learned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from robust_transfer.data.datasets import ImageSet
from robust_transfer.errors import UserError
from robust_transfer.models.runtime import eval_mode
from robust_transfer.plugins import option


@dataclass(frozen=True)
class ANPConfig:
    """ANP's settings, their code's defaults: noise `eps`, ascent `steps`, trade-off `alpha`
    (weight of the clean loss), `mask_lr`, `iterations`, `batch_size`, pruning `threshold`."""

    eps: float = option(0.4, "size of the multiplicative neuron noise")
    steps: int = option(1, "signed-gradient ascent steps on the noise per iteration")
    alpha: float = option(0.2, "weight of the clean loss beside the perturbed one, in [0, 1]")
    mask_lr: float = option(0.2, "SGD learning rate of the masks")
    iterations: int = option(2000, "mask optimisation iterations")
    batch_size: int = option(128, "batch size (drawn with replacement)")
    threshold: float = option(0.2, "prune the neurons whose mask ends at or below this")

    def __post_init__(self) -> None:
        if not self.eps >= 0 or not 0 <= self.alpha <= 1 or not 0 <= self.threshold < 1:
            raise UserError(f"ANP needs eps >= 0, 0 <= alpha <= 1 and 0 <= threshold < 1, got "
                            f"{self.eps}, {self.alpha}, {self.threshold}")
        if min(self.steps, self.iterations, self.batch_size) < 1 or not self.mask_lr > 0:
            raise UserError("ANP steps, iterations and batch size must be >= 1 and mask lr > 0")


class NeuronPerturbation:
    """A forward hook on one BatchNorm layer: its output recomputed with scale
    gamma * (mask + noise) and shift beta * (1 + noise_bias) (noise only while `perturbed`),
    normalised with the batch's statistics."""

    def __init__(self, bn: _BatchNorm) -> None:
        if bn.weight is None or bn.bias is None:
            raise UserError("ANP needs BatchNorm layers with a scale and a shift (affine)")
        like = bn.weight.detach()
        self.mask = nn.Parameter(torch.ones_like(like))
        self.noise = nn.Parameter(torch.zeros_like(like))
        self.noise_bias = nn.Parameter(torch.zeros_like(like))
        self.perturbed = False
        self.handle = bn.register_forward_hook(self)

    def __call__(self, bn: _BatchNorm, inputs: tuple, _output: torch.Tensor) -> torch.Tensor:
        scale = self.mask + self.noise if self.perturbed else self.mask
        shift = 1.0 + self.noise_bias if self.perturbed else 1.0
        return F.batch_norm(inputs[0], None, None, bn.weight * scale, bn.bias * shift,
                            training=True, momentum=0.0, eps=bn.eps)

    @torch.no_grad()
    def reset(self, eps: float, generator: torch.Generator) -> None:
        """Noise uniform in [-eps, eps] (their random start)."""
        for p in (self.noise, self.noise_bias):
            p.copy_((torch.rand(p.shape, generator=generator) * 2 - 1) * eps)


def batch_norms(model: nn.Module) -> dict[str, _BatchNorm]:
    """The model's BatchNorm layers by module name (ANP's neurons are their channels)."""
    norms = {name: m for name, m in model.named_modules() if isinstance(m, _BatchNorm)}
    if not norms:
        raise UserError("ANP needs a model with BatchNorm layers")
    return norms


def neuron_masks(model: nn.Module, clean: ImageSet, cfg: ANPConfig = ANPConfig(),
                 seed: int = 0) -> dict[str, torch.Tensor]:
    """Learn ANP's neuron masks on `clean`; {BatchNorm name: mask (channels,) in [0, 1]}.

    The model's weights, buffers, train/eval flags and requires_grad flags are as before on
    return and on failure (the hooks are removed).
    """
    device = next(model.parameters()).device
    flags = [(p, p.requires_grad) for p in model.parameters()]
    hooks: dict[str, NeuronPerturbation] = {}
    try:
        model.requires_grad_(False)
        hooks = {name: NeuronPerturbation(bn) for name, bn in batch_norms(model).items()}
        masks = [h.mask for h in hooks.values()]
        noises = [p for h in hooks.values() for p in (h.noise, h.noise_bias)]
        mask_opt = torch.optim.SGD(masks, lr=cfg.mask_lr, momentum=0.9)
        noise_opt = torch.optim.SGD(noises, lr=cfg.eps / cfg.steps)
        gen = torch.Generator().manual_seed(seed)
        with eval_mode(model):  # BN's own forward leaves its running stats; hooks use batch's
            for _ in range(cfg.iterations):
                index = torch.randint(len(clean), (cfg.batch_size,), generator=gen)
                x, y = clean.x[index].to(device), clean.y[index].to(device)
                _anp_step(model, x, y, hooks.values(), noises, mask_opt, noise_opt, cfg, gen)
        return {name: h.mask.detach().clone() for name, h in hooks.items()}
    finally:
        for h in hooks.values():
            h.handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)


def _anp_step(model, x, y, hooks, noises, mask_opt, noise_opt, cfg: ANPConfig, gen) -> None:
    """One iteration of their `mask_train`: worst-case noise, then a mask step."""
    if cfg.eps > 0:
        for h in hooks:
            h.reset(cfg.eps, gen)
            h.perturbed = True
        for _ in range(cfg.steps):
            noise_opt.zero_grad()
            (-F.cross_entropy(model(x), y)).backward()
            for p in noises:
                p.grad = torch.sign(p.grad)
            noise_opt.step()
    mask_opt.zero_grad()
    loss_rob = F.cross_entropy(model(x), y) if cfg.eps > 0 else 0.0
    for h in hooks:
        h.perturbed = False
    loss = cfg.alpha * F.cross_entropy(model(x), y) + (1 - cfg.alpha) * loss_rob
    loss.backward()
    mask_opt.step()
    with torch.no_grad():
        for h in hooks:
            h.mask.clamp_(0.0, 1.0)


@torch.no_grad()
def prune_by_threshold(model: nn.Module, masks: dict[str, torch.Tensor],
                       threshold: float) -> dict[str, torch.Tensor]:
    """Zero the BN scale of every neuron whose mask is <= `threshold` (their pruning by
    threshold); {BatchNorm name: pruned channel indices}."""
    norms = batch_norms(model)
    pruned = {}
    for name, mask in masks.items():
        index = torch.nonzero(mask <= threshold).flatten()
        norms[name].weight[index.to(norms[name].weight.device)] = 0.0
        pruned[name] = index.cpu()
    return pruned


def adversarial_neuron_pruning(model: nn.Module, clean: ImageSet, cfg: ANPConfig = ANPConfig(),
                               seed: int = 0) -> tuple[nn.Module, int]:
    """ANP (Wu & Wang 2021) on `model` in place: learn the masks on `clean`, prune by
    `cfg.threshold`; (model, number of pruned neurons).

    Example:
        defended, n = adversarial_neuron_pruning(copy.deepcopy(model), clean_subset, ANPConfig())
    """
    masks = neuron_masks(model, clean, cfg, seed)
    pruned = prune_by_threshold(model, masks, cfg.threshold)
    return model, sum(len(v) for v in pruned.values())
