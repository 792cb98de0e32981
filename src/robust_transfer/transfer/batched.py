"""Many fine-tunes of one shape at once: the grid's fast path for the standard protocol.

Why: in the study of Utrera et al. (arXiv 2007.05869) one source is fine-tuned thousands of
times (seeds x images per class x unfrozen blocks), and with k blocks unfrozen the frozen
prefix computes the same features for every one of those runs (its BatchNorm is in eval mode,
so its output is a pure function of the input). So a batch of runs that differ only in their
seed (same source, target, k, images per class, epochs, lr, batch size) is trained as one wide
network: the prefix features of the target's train and test sets are computed once, and the R
runs' suffixes are stacked along the channel axis, their convolutions run as one grouped
convolution (one per block), BatchNorm over R x C channels (the same per-channel statistics and
running-stat updates as R separate models), one batched matmul for the R heads.

Each run keeps everything the per-run path (`finetune.finetune_per_run`) gives it: its own
k-shot subset and data order (its seed's subset, a fresh `randperm` from its own seeded
generator every epoch, batches cut by `train.loop.batch_bounds`), its own new head
(`reset_head` with its seed's generator), PyTorch SGD semantics (weight decay added to the
gradient, momentum buffer, dampening 0) and the same step schedule (`train.loop.lr_schedule`).
Runs are independent: the loss is the sum of the runs' mean losses, so each run's gradient is
its own. Results agree with the per-run path up to float rounding (sums in another order);
`tests/test_grid_fast.py` checks equal test accuracy per epoch.

What it covers is one explicit check, `applies`: a `ConvNet` whose blocks are Conv-BN-ReLU, a
plain `FinetuneConfig`, and a source checkpoint whose metadata holds nothing beyond the
standard protocol. Anything else (another architecture, a backdoored source with extra
per-epoch metrics, new config fields set away from their defaults) takes the per-run path.
"""

from __future__ import annotations

from dataclasses import fields

import torch
import torch.nn.functional as F
from torch import nn

from robust_transfer.data import adapt_images, load_task, shots_per_class
from robust_transfer.models.base import Normalize
from robust_transfer.models.card import SourceCard
from robust_transfer.models.nets import ConvNet
from robust_transfer.train import SourceConfig, TrainConfig, freeze_all_but_last
from robust_transfer.train.loop import batch_bounds, lr_schedule, sgd_step
from robust_transfer.transfer.finetune import FinetuneConfig
from robust_transfer.variables import engine_fields, finetune_fields, first_non_default

ENGINE = "batched"  # its name in the variables' declarations (`variables.variable`)

# What a standard source checkpoint's card records (train_source + save_checkpoint).
STANDARD_META = {"role", "recipe", "eps", "norm", "method", "amp", "seed", "task", "metrics",
                 "torch_threads", "model", "package_version", "sha256", "distill",
                 "teacher_path"}
# Test images per evaluation chunk (measured: 64 is 1.4-1.9x faster than the whole test set
# at once for 50 runs with 2-3 blocks unfrozen, whose activations would not fit in cache).
EVAL_CHUNK = 64


def _standard_block(block: nn.Module) -> bool:
    if type(block) is not nn.Sequential or len(block) != 3:
        return False
    conv, bn, relu = block
    return (type(conv) is nn.Conv2d and conv.bias is None and conv.groups == 1
            and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)
            and type(bn) is nn.BatchNorm2d and bn.affine and bn.track_running_stats
            and bn.momentum is not None and type(relu) is nn.ReLU)


def applies(model: nn.Module, cfg: FinetuneConfig, source_card: SourceCard | None = None) -> bool:
    """Whether this engine covers the run: else the per-run path must be used.

    Covered: a `ConvNet` (normaliser, Conv-BN-ReLU blocks, global average pool, linear head)
    without forward hooks (the engine does not call the modules' forward),
    a `FinetuneConfig` of the standard protocol (step schedule; any field added later at its
    default), and, given its card, a source trained by `train_source` with nothing beyond
    the standard recipe (no backdoor, no extra per-epoch metrics, new recipe fields at their
    defaults).
    """
    if type(model) is not ConvNet or type(cfg) is not FinetuneConfig:
        return False
    if not (type(model.normalizer) is Normalize and type(model.head) is nn.Linear
            and model.head.bias is not None and type(model.pool) is nn.AdaptiveAvgPool2d
            and model.pool.output_size in (1, (1, 1))
            and all(_standard_block(b) for b in model.blocks)):
        return False
    if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        return False  # this engine never calls the modules' forward: hooks would not fire
    if first_non_default(cfg.to_dict(), FinetuneConfig, engine_fields(FinetuneConfig, ENGINE)):
        return False
    if cfg.train_config().schedule != "step":
        return False
    if source_card is None:
        return True
    if source_card.recorded() - STANDARD_META or not source_card.is_source:
        return False
    recipe = source_card.recipe or {}
    train = source_card.train_recipe
    return not (first_non_default(recipe, SourceConfig, engine_fields(SourceConfig, ENGINE))
                or first_non_default(train, TrainConfig, {f.name for f in fields(TrainConfig)}))


def shape_key(cfg: FinetuneConfig) -> tuple:
    """Runs with the same key differ only in their seed: one batch of the engine."""
    return tuple(getattr(cfg, name) for name in finetune_fields(FinetuneConfig)
                 if name != "seed" and name in engine_fields(FinetuneConfig, ENGINE))


class _WideSuffix:
    """R copies of the model's trainable suffix, stacked: conv weights (R*Cout, Cin, kh, kw),
    BN parameters and running stats (R*C,), heads (R, classes, D) and (R, classes)."""

    def __init__(self, model: ConvNet, k: int, heads: list[tuple[torch.Tensor, torch.Tensor]]):
        r = len(heads)
        self.r = r
        self.blocks = list(model.blocks)[len(model.blocks) - k:] if k else []
        self.params: list[torch.Tensor] = []
        self.buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
        for conv, bn, _ in self.blocks:
            self.params += [conv.weight.detach().repeat(r, 1, 1, 1),
                            bn.weight.detach().repeat(r), bn.bias.detach().repeat(r)]
            self.buffers.append((bn.running_mean.detach().repeat(r),
                                 bn.running_var.detach().repeat(r)))
        self.params += [torch.stack([w for w, _ in heads]), torch.stack([b for _, b in heads])]
        for p in self.params:
            p.requires_grad_(True)

    def forward(self, h: torch.Tensor, shared: bool, training: bool) -> torch.Tensor:
        """Logits (n, R, classes). `h` is (n, C, H, W) (or (n, D) for k=0) when `shared`
        (the same input for every run: the test set), else (n, R, C, H, W) / (n, R, D)."""
        n = h.shape[0]
        for i, (conv, bn, _) in enumerate(self.blocks):
            weight, gamma, beta = self.params[3 * i : 3 * i + 3]
            if shared and i == 0:  # one convolution with R*Cout output channels
                h = F.conv2d(h, weight, None, conv.stride, conv.padding, conv.dilation)
            else:
                h = F.conv2d(h.reshape(n, -1, *h.shape[-2:]), weight, None, conv.stride,
                             conv.padding, conv.dilation, groups=self.r)
            mean, var = self.buffers[i]
            h = F.relu(F.batch_norm(h, mean, var, gamma, beta, training, bn.momentum, bn.eps))
        if self.blocks:
            h = F.adaptive_avg_pool2d(h, 1).view(n, self.r, -1)
        weight, bias = self.params[-2:]
        if shared and not self.blocks:
            return (h @ weight.reshape(-1, weight.shape[-1]).T).view(n, self.r, -1) + bias
        return torch.einsum("nrd,rcd->nrc", h, weight) + bias

    @torch.no_grad()
    def write_back(self, model: ConvNet, run: int) -> None:
        """Copy run `run`'s suffix (weights and BN running stats) into `model`."""
        for i, (conv, bn, _) in enumerate(self.blocks):
            weight, gamma, beta = self.params[3 * i : 3 * i + 3]
            c = conv.out_channels
            conv.weight.copy_(weight[run * c : (run + 1) * c])
            bn.weight.copy_(gamma[run * c : (run + 1) * c])
            bn.bias.copy_(beta[run * c : (run + 1) * c])
            bn.running_mean.copy_(self.buffers[i][0][run * c : (run + 1) * c])
            bn.running_var.copy_(self.buffers[i][1][run * c : (run + 1) * c])
        model.head.weight.copy_(self.params[-2][run])
        model.head.bias.copy_(self.params[-1][run])


@torch.no_grad()
def prefix_features(model: ConvNet, k: int | None, x: torch.Tensor,
                    batch_size: int = 1024) -> torch.Tensor:
    """The frozen prefix's output for `x` (eval mode: frozen BatchNorm uses its running stats,
    so this is a pure function of the input and is computed once for every run)."""
    prefix, _ = model.split(k)
    flags = [(m, m.training) for m in prefix.modules()]
    prefix.eval()
    device = next(model.parameters()).device
    out = torch.cat([prefix(x[i : i + batch_size].to(device))
                     for i in range(0, len(x), batch_size)])
    for m, flag in flags:
        m.training = flag
    return out


def finetune_batch(model: ConvNet, cfgs: list[FinetuneConfig],
                   write_back: bool = False) -> list[list[dict]]:
    """Fine-tune `model` once per config of `cfgs` (one shape, `shape_key`; any seeds), all
    at once; one history per config, records as `finetune_per_run` gives them (epoch,
    train_loss, epoch_lr, train_images, test_accuracy).

    `model` is left with the new head and freezing of the last config (reset_head, then
    `freeze_all_but_last`); with `write_back` (one config) it also holds the trained weights.
    """
    if len({shape_key(c) for c in cfgs}) != 1:
        raise ValueError("finetune_batch takes runs of one shape (they may differ in seed only)")
    if write_back and len(cfgs) != 1:
        raise ValueError("write_back needs exactly one run")
    cfg = cfgs[0]
    task = load_task(cfg.target_task)
    device = next(model.parameters()).device
    k = len(model.blocks) if cfg.unfrozen_blocks is None else cfg.unfrozen_blocks
    heads = []
    for c in cfgs:
        model.reset_head(task.num_classes, torch.Generator().manual_seed(c.seed))
        heads.append((model.head.weight.detach().clone(), model.head.bias.detach().clone()))
    freeze_all_but_last(model, cfg.unfrozen_blocks)
    spec, what = model.spec, f"target task {cfg.target_task!r} images"
    train_set = adapt_images(task.train, spec.in_channels, spec.input_size, what)  # per image
    test_set = adapt_images(task.test, spec.in_channels, spec.input_size, what)
    train_x = prefix_features(model, cfg.unfrozen_blocks, train_set.x)
    test_x = prefix_features(model, cfg.unfrozen_blocks, test_set.x)
    train_y, test_y = task.train.y.to(device), task.test.y.to(device)
    subsets = [shots_per_class(task.train.y, c.images_per_class, c.seed) for c in cfgs]
    n = len(subsets[0])
    subsets = torch.stack(subsets).to(device)
    shuffles = [torch.Generator().manual_seed(c.train_config().seed) for c in cfgs]
    wide = _WideSuffix(model, k, heads)
    params, bufs = wide.params, None
    tc = cfg.train_config()
    histories: list[list[dict]] = [[] for _ in cfgs]
    for epoch, lr in enumerate(lr_schedule(tc), start=1):
        orders = torch.stack([torch.randperm(n, generator=g) for g in shuffles]).to(device)
        batches = torch.gather(subsets, 1, orders).T.contiguous()  # (n, R) indices into train
        total = torch.zeros(len(cfgs), device=device)
        for a, b in batch_bounds(n, tc.batch_size):
            idx = batches[a:b]
            logits = wide.forward(train_x[idx], shared=False, training=True)
            b = idx.shape[0]
            losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                     train_y[idx].reshape(-1), reduction="none")
            losses = losses.view(b, -1).mean(0)
            grads = torch.autograd.grad(losses.sum(), params)
            bufs = sgd_step(params, grads, bufs, lr, tc)
            with torch.no_grad():
                total += losses * b
        with torch.no_grad():  # in chunks: R runs' activations of a chunk stay in cache
            pred = torch.cat([wide.forward(test_x[j : j + EVAL_CHUNK], shared=True,
                                           training=False).argmax(-1)
                              for j in range(0, len(test_x), EVAL_CHUNK)])
            acc = (pred == test_y[:, None]).float().mean(0)
        for history, loss, a in zip(histories, total.tolist(), acc.tolist(), strict=True):
            history.append({"epoch": epoch, "train_loss": loss / n, "epoch_lr": lr,
                            "train_images": n, "test_accuracy": a})
    if write_back:
        wide.write_back(model, 0)
        steps_taken = cfg.epochs * len(batch_bounds(n, tc.batch_size))
        for _conv, bn, _relu in wide.blocks:
            bn.num_batches_tracked += steps_taken
    model.eval()
    return histories
