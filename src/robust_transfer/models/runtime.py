"""Running models: device choice, exact mode save/restore, batched prediction."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from robust_transfer.errors import UserError, check_choice

DEVICES = ("auto", "cpu", "cuda")


def check_device(name: str) -> str:
    """`name` if it is one of `DEVICES` (else a `UserError`), unresolved: work shipped to other
    machines resolves it there (`resolve_device` on the worker: "auto" is the worker's GPU)."""
    check_choice("device", name, DEVICES)
    return name


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else CPU; asking for absent CUDA is a `UserError`."""
    check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' requested but no CUDA device is available; use cpu or auto")
    return torch.device(name)


def amp_enabled(device: torch.device, amp: bool | None = None) -> bool:
    """Whether to run in bf16 autocast: `amp` if given, else on CUDA only (off on CPU, so CPU
    numbers are those of plain fp32)."""
    return device.type == "cuda" if amp is None else bool(amp)


def autocast(device: torch.device, amp: bool | None = None) -> AbstractContextManager:
    """bf16 autocast on `device` when `amp_enabled` (Micikevicius et al. 2018, "Mixed
    Precision Training"; bf16 keeps fp32's range, so no loss scaling), else a no-op."""
    if amp_enabled(device, amp):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block on `n` intra-op CPU threads, then restore the caller's count.

    CPU float sums depend on the thread count, so work that must give the same bits wherever
    and whenever it runs (a grid's runs, resumed or not) fixes it rather than inheriting it.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module in eval mode, then restore each module's own flag exactly.

    `model.train(was_training)` would not do: it would wake frozen BatchNorm layers that the
    transfer protocol deliberately keeps in eval mode.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


class _InputGradBatchNorm(torch.autograd.Function):
    """Eval-mode batch norm whose backward gives the input gradient only, as PyTorch's CPU
    kernel computes it (dy * invstd * w, invstd rounded from double): bit-identical, without
    the kernel's two reductions over the input for the weight and bias gradients, which it
    makes even when they are not asked for (~1/6 of an attack step on a small CNN)."""

    @staticmethod
    def forward(ctx, x, mean, var, weight, bias, eps):
        invstd = (1 / torch.sqrt(var.double() + eps)).to(x.dtype)
        ctx.save_for_backward(invstd, weight)
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)

    @staticmethod
    def backward(ctx, grad):
        invstd, weight = ctx.saved_tensors
        shape = (1, -1) + (1,) * (grad.ndim - 2)
        grad_x = grad * invstd.view(shape)
        if weight is not None:
            grad_x.mul_(weight.view(shape))
        return grad_x, None, None, None, None, None


def _input_grad_forward(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    if (bn.training or bn.running_var is None or x.device.type != "cpu"
            or x.dtype != torch.float32 or not (torch.is_grad_enabled() and x.requires_grad)):
        return type(bn).forward(bn, x)
    weight = None if bn.weight is None else bn.weight.detach()
    bias = None if bn.bias is None else bn.bias.detach()
    return _InputGradBatchNorm.apply(x, bn.running_mean, bn.running_var, weight, bias, bn.eps)


@contextmanager
def input_gradients_only(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, the model's eval-mode BatchNorm layers on CPU backpropagate to their input
    only (`_InputGradBatchNorm`): the same outputs and input gradients, bit for bit, faster;
    their weight and bias get no gradient. For attacks, which take gradients with respect
    to the input alone; a layer's own `forward` is restored on exit (nesting is safe).
    Layers whose class overrides `forward` (e.g. SyncBatchNorm) are left as they are."""
    patched = []
    stock = nn.modules.batchnorm._BatchNorm.forward  # a subclass with its own forward: left
    for bn in model.modules():
        if (isinstance(bn, nn.modules.batchnorm._BatchNorm) and type(bn).forward is stock
                and "forward" not in vars(bn)):
            bn.forward = partial(_input_grad_forward, bn)
            patched.append(bn)
    try:
        yield model
    finally:
        for bn in patched:
            vars(bn).pop("forward", None)


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Logits of `model` on `x` in eval mode, batched; on `x`'s device."""
    device = next(model.parameters()).device
    with eval_mode(model):
        out = [model(x[i : i + batch_size].to(device)) for i in range(0, len(x), batch_size)]
    return torch.cat(out).to(x.device)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024,
             amp: bool | None = None) -> float:
    """Fraction of `x` that `model` classifies as `y`; under bf16 autocast when `amp` (None:
    on CUDA only). Robust accuracy (`attacks.evaluate`) stays fp32: an attack's gradients in
    low precision could mask the model's weakness."""
    if len(y) == 0:
        return float("nan")
    with autocast(next(model.parameters()).device, amp):
        logits = predict_logits(model, x, batch_size)
    return (logits.argmax(1) == y.to(logits.device)).float().mean().item()
