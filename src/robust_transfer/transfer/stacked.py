"""Many fine-tunes of one shape at once, for any `BlockNet`: stacked suffixes under `vmap`.

Why: the protocol of Utrera et al. (arXiv 2007.05869) fine-tunes one source thousands of
times, and the runs of one shape (same source, target, k, images per class, epochs, lr,
batch size, augmentation; different seeds) share everything but their data and their new
head. This engine trains them as one program through `torch.func`:

- **Frozen features once.** The frozen prefix (`model.split(k)`, BatchNorm in eval mode, so
  a pure function of the input) runs once on the target's test images and on the union of
  the runs' k-shot training images; every run and epoch reads the cache. With k = 0 the
  whole network is frozen and every run is a linear problem on cached features (the
  fixed-feature protocol of Salman et al. 2020, arXiv 2007.08489).
- **Stacked suffixes.** The trainable suffix's parameters and buffers get a leading run
  axis (R copies of the source's, each run's own new head); `vmap(functional_call)` runs
  them on each run's own batch. BatchNorm in the suffix trains per run: its batch
  statistics and its running-stat updates are each run's own (the buffers are batched).
- **Each run as the per-run path** (`finetune.finetune_per_run` through `train.fit`): its
  seed's k-shot subset and new head (`reset_head`), a fresh `randperm` from its own seeded
  generator every epoch cut by `train.loop.batch_bounds`, its own augmentation draws
  (`finetune.augmentation`), `torch.optim.SGD` semantics (weight decay added to the
  gradient, momentum buffer, no dampening) and the epoch schedule `train.loop.lr_schedule`.
  The loss is the sum of the runs' mean losses, so each run's gradient is its own. Results
  equal the per-run path's up to float rounding (`tests/test_engine.py`: equal test
  accuracy per epoch for every registered architecture, k = 0, 1, all).
- **Bounded memory.** Runs are trained in chunks that fit `max_memory` bytes, estimated from
  tensor sizes (cached features, per-run parameters with gradient and momentum, and the
  suffix's activations per image, measured by one forward pass); chunking is logged.
- **GPU.** bf16 autocast where the per-run path uses it (`models.runtime.amp_enabled`),
  channels-last features, data on the device, and no host synchronisation in the epoch
  loop: losses and accuracies stay on the device until the runs are done.

`why_not` is the one coverage check; `transfer.batched` stays the faster special case for
the small `ConvNet` (a hand-written grouped convolution), picked first where it applies.
"""

from __future__ import annotations

import logging
import math
from dataclasses import fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from robust_transfer.data import adapt_images, load_task, shots_per_class
from robust_transfer.errors import UserError
from robust_transfer.models.card import SourceCard
from robust_transfer.models.nets import BlockNet
from robust_transfer.models.runtime import amp_enabled, autocast
from robust_transfer.train import SourceConfig, TrainConfig, freeze_all_but_last
from robust_transfer.train.loop import batch_bounds, lr_schedule, sgd_step
from robust_transfer.transfer.finetune import FinetuneConfig, augmentation
from robust_transfer.variables import engine_fields, finetune_fields, first_non_default

log = logging.getLogger(__name__)

# What a standard source checkpoint's card records (train_source + save_checkpoint) and an
# imported one's (models.foreign: role "source", no recipe).
STANDARD_META = {"role", "recipe", "eps", "norm", "method", "amp", "seed", "task", "metrics",
                 "torch_threads", "model", "package_version", "sha256", "distill",
                 "teacher_path", "imported_from"}
ENGINE = "stacked"  # its name in the variables' declarations (`variables.variable`)
# Default memory budget (bytes) on CPU; on CUDA, 3/4 of the device's free memory.
DEFAULT_MAX_MEMORY = 4 * 2**30
# fp32 copies of a run's trainable parameters alive at once in a step: the parameters, the
# momentum buffer, the gradient, the SGD step, and vmap's grouped-layout weight and weight
# gradient (bench_engine, ResNet-18 layer4 x 50 runs: 4 copies underestimated the peak).
RUN_PARAM_COPIES = 6
# Test images per evaluation chunk, at most (smaller when memory asks for it).
EVAL_CHUNK = 256


def why_not(model: nn.Module, cfg: FinetuneConfig, source_card: SourceCard | None = None
            ) -> str | None:
    """Why this engine cannot train the run (one line), or None when it covers it.

    Covered: any `BlockNet` without hooks (vmap calls the modules' own forward on batched
    tensors, hooks would see one run's slice), a `FinetuneConfig` of the standard protocol
    (fields added later at their defaults), and a source whose card records nothing
    beyond the standard recipe (no backdoor to measure per epoch, not a fine-tuned model).
    """
    if not isinstance(model, BlockNet):
        return f"{type(model).__name__} is not a BlockNet"
    if any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
           for m in model.modules()):
        return "the model has hooks"
    if any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules()):
        return "the model has dropout (random per run)"
    if not isinstance(cfg, FinetuneConfig):
        return f"{type(cfg).__name__} is not a plain FinetuneConfig"
    extra = first_non_default(cfg.to_dict(), type(cfg), engine_fields(type(cfg), ENGINE))
    if extra is not None:
        return f"fine-tune option {extra!r} is set (the per-run path implements it)"
    if source_card is None:
        return None
    extra = next(iter(sorted(source_card.recorded() - STANDARD_META)), None)
    if extra is not None:
        return f"the source's metadata has {extra!r} (e.g. a backdoor to measure per epoch)"
    if not source_card.is_source:
        return f"the checkpoint is a {source_card.role!r}, not a source"
    recipe = source_card.recipe or {}
    extra = (first_non_default(recipe, SourceConfig, engine_fields(SourceConfig, ENGINE))
             or first_non_default(source_card.train_recipe, TrainConfig,
                                  {f.name for f in fields(TrainConfig)}))
    if extra is not None:
        return f"the source's recipe sets {extra!r} (e.g. a planted backdoor)"
    return None


def shape_key(cfg: FinetuneConfig) -> tuple:
    """Runs with the same key differ only in their seed: one batch of the engine."""
    return tuple(getattr(cfg, name) for name in finetune_fields(FinetuneConfig)
                 if name != "seed" and name in engine_fields(FinetuneConfig, ENGINE))


@torch.no_grad()
def prefix_outputs(prefix: nn.Module, x: torch.Tensor, device: torch.device,
                   amp: bool, batch_size: int = 512) -> torch.Tensor:
    """The frozen prefix's output for `x` (the caller has put it in eval mode), in batches;
    fp32 under amp (the cache the suffix's autocast reads), else the model's dtype."""
    out = []
    for i in range(0, len(x), batch_size):
        with autocast(device, amp):
            h = prefix(x[i : i + batch_size].to(device))
        out.append(h.float() if amp else h)
    return torch.cat(out)


class FeatureCache:
    """Frozen-prefix outputs of one loaded source, shared by every shape (seeds, shot counts,
    epochs, lr) of one (target, k): each image goes through the prefix once.

    Entries grow: a lookup computes only the images not yet cached. One cache per loaded
    model (`run.finetune_many_from_checkpoint` keeps one per checkpoint read); the prefix
    is frozen, so its outputs never go stale.
    """

    def __init__(self) -> None:
        self.entries: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def lookup(self, key: tuple, prefix: nn.Module | None, images: torch.Tensor,
               idx: torch.Tensor, device: torch.device, amp: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(store, position): `store[position[i]]` is the prefix's output for `images[i]`
        for every i in `idx` (the images themselves, on `device`, when `prefix` is None)."""
        store, position = self.entries.get(key, (None, None))
        if position is None:
            position = torch.full((len(images),), -1, dtype=torch.long)
        missing = torch.unique(idx[position[idx] < 0])
        if len(missing):
            new = (images[missing].to(device) if prefix is None
                   else prefix_outputs(prefix, images[missing], device, amp))
            if device.type == "cuda" and new.dim() == 4:  # cuDNN's NHWC kernels
                new = new.contiguous(memory_format=torch.channels_last)
            start = 0 if store is None else len(store)
            store = new if store is None else torch.cat([store, new])
            position[missing] = torch.arange(start, start + len(missing))
        self.entries[key] = (store, position)
        return store, position


def _stack(tensors: dict[str, torch.Tensor], r: int) -> dict[str, torch.Tensor]:
    return {n: t.detach().unsqueeze(0).repeat(r, *[1] * t.dim()).contiguous()
            for n, t in tensors.items()}


def _activation_floats(suffix: nn.Module, example: torch.Tensor) -> int:
    """Floats of every leaf module's output for one input image (what training keeps for
    the backward pass, at most), measured by one forward pass in eval mode."""
    total = [0]
    leaves = [m for m in suffix.modules() if not list(m.children())]
    handles = [m.register_forward_hook(lambda _m, _i, o: total.__setitem__(0, total[0]
                                                                          + o.numel()))
               for m in leaves]
    flags = [(m, m.training) for m in suffix.modules()]
    try:
        suffix.eval()
        with torch.no_grad():
            suffix(example[:1])
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags:
            m.training = flag
    return total[0] + example[:1].numel()


def default_max_memory(device: torch.device) -> int:
    """`DEFAULT_MAX_MEMORY` on CPU; 3/4 of the free memory on a CUDA device."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.75)
    return DEFAULT_MAX_MEMORY


def plan_chunks(runs: int, feature_bytes: int, run_bytes: int, image_bytes: int,
                batch_size: int, max_memory: int) -> tuple[int, int]:
    """(runs per chunk, test images per evaluation chunk) within `max_memory` bytes.

    Shared: the cached features. Per run: `run_bytes` (`RUN_PARAM_COPIES` copies of its
    parameters) plus one training batch of activations (`image_bytes` per image, forward
    and backward). A budget below the features plus one run is a `UserError`.
    """
    per_run = run_bytes + 2 * batch_size * image_bytes
    room = max_memory - feature_bytes
    if room < per_run:
        need = (feature_bytes + per_run) / 2**30
        raise UserError(f"max memory {max_memory / 2**30:.3g} GiB is below what one run "
                        f"needs ({need:.3g} GiB: cached features and one run's training); "
                        "raise --max-memory")
    chunk = min(runs, room // per_run)
    eval_chunk = max(1, min(EVAL_CHUNK, room // max(1, chunk * image_bytes)))
    return int(chunk), int(eval_chunk)


def finetune_stacked(model: BlockNet, cfgs: list[FinetuneConfig], write_back: bool = False,
                     amp: bool | None = None, max_memory: int | None = None,
                     cache: FeatureCache | None = None) -> list[list[dict]]:
    """Fine-tune `model` once per config of `cfgs` (one `shape_key`; any seeds), all at once;
    one history per config, records as `finetune_per_run` gives them (epoch, train_loss,
    epoch_lr, train_images, test_accuracy).

    `model` is left with the new head and freezing of the last config; with `write_back`
    (one config) it also holds that run's trained weights and BatchNorm statistics.
    `amp`: bf16 autocast (None: on CUDA only). `max_memory`: bytes for the engine's tensors
    (None: `default_max_memory`); the runs are trained in chunks that fit. `cache`: the
    prefix outputs of earlier calls on this same `model` (None: a cache for this call).
    """
    if len({shape_key(c) for c in cfgs}) != 1:
        raise ValueError("finetune_stacked takes runs of one shape (they may differ in seed "
                         "only)")
    if write_back and len(cfgs) != 1:
        raise ValueError("write_back needs exactly one run")
    cfg = cfgs[0]
    device = next(model.parameters()).device
    amp = amp_enabled(device, amp)
    task = load_task(cfg.target_task)
    heads = []
    for c in cfgs:
        model.reset_head(task.num_classes, torch.Generator().manual_seed(c.seed))
        heads.append({"head.weight": model.head.weight.detach().clone(),
                      "head.bias": model.head.bias.detach().clone()})
    freeze_all_but_last(model, cfg.unfrozen_blocks)
    prefix, suffix = model.split(cfg.unfrozen_blocks)
    spec, what = model.spec, f"target task {cfg.target_task!r} images"
    train_set = adapt_images(task.train, spec.in_channels, spec.input_size, what)
    test_set = adapt_images(task.test, spec.in_channels, spec.input_size, what)
    subsets = [shots_per_class(task.train.y, c.images_per_class, c.seed) for c in cfgs]
    cache = FeatureCache() if cache is None else cache
    key = (cfg.target_task, cfg.unfrozen_blocks, amp)
    flags = [(m, m.training) for m in model.modules()]
    prefix.eval()
    try:
        test_x, _ = cache.lookup((*key, "test"), prefix, test_set.x,
                                 torch.arange(len(test_set)), device, amp)
        # augmented runs: each run's own crops of the images; the prefix runs per step
        train_x, position = cache.lookup((*key, "train", cfg.augment),
                                         None if cfg.augment else prefix, train_set.x,
                                         torch.cat(subsets), device, amp)
        train_y = torch.full((len(train_x),), -1, dtype=torch.long)
        train_y[position[position >= 0]] = train_set.y[position >= 0]
        train_y, test_y = train_y.to(device), test_set.y.to(device)
        n = len(subsets[0])
        example = (prefix_outputs(prefix, train_x[:1], device, amp) if cfg.augment
                   else train_x[:1])
        image_bytes = 4 * _activation_floats(suffix, example)
        run_bytes = RUN_PARAM_COPIES * 4 * sum(p.numel() for p in suffix.parameters())
        feature_bytes = (train_x.numel() + test_x.numel()) * train_x.element_size()
        budget = default_max_memory(device) if max_memory is None else int(max_memory)
        chunk, eval_chunk = plan_chunks(len(cfgs), feature_bytes, run_bytes, image_bytes,
                                        min(cfg.batch_size, n), budget)
        if chunk < len(cfgs):
            log.warning("note: %d runs of one shape trained in %d chunks of up to %d runs "
                        "(max memory %.2f GiB)", len(cfgs), math.ceil(len(cfgs) / chunk),
                        chunk, budget / 2**30)
        histories: list[list[dict]] = []
        for a in range(0, len(cfgs), chunk):
            histories += _train_chunk(
                prefix, suffix, cfgs[a : a + chunk], heads[a : a + chunk],
                [position[s] for s in subsets[a : a + chunk]], train_x, train_y, test_x,
                test_y, amp, eval_chunk, write_back)
    finally:
        for m, flag in flags:
            m.training = flag
    model.eval()
    return histories


def _train_chunk(prefix: nn.Module, suffix: nn.Module, cfgs: list[FinetuneConfig],
                 heads: list[dict], subsets: list[torch.Tensor], train_x: torch.Tensor,
                 train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 amp: bool, eval_chunk: int, write_back: bool) -> list[list[dict]]:
    """Train the runs `cfgs` together (see `finetune_stacked`); their histories."""
    r, cfg, tc = len(cfgs), cfgs[0], cfgs[0].train_config()
    device = train_x.device
    params = _stack(dict(suffix.named_parameters()), r)
    for name in heads[0]:
        params[name] = torch.stack([h[name] for h in heads]).to(device)
    for p in params.values():
        p.requires_grad_(True)
    buffers = _stack(dict(suffix.named_buffers()), r)
    names, plist = list(params), list(params.values())

    def run_forward(p, b, x):
        return functional_call(suffix, (p, b), (x,))

    train_fn = vmap(run_forward)  # each run its parameters, buffers and batch
    test_fn = vmap(run_forward, in_dims=(0, 0, None))  # every run on the same images
    augments = [augmentation(c) for c in cfgs] if cfg.augment else None
    subsets_d = torch.stack(subsets).to(device)
    n = subsets_d.shape[1]
    bounds = batch_bounds(n, tc.batch_size)
    shuffles = [torch.Generator().manual_seed(c.train_config().seed) for c in cfgs]
    bufs = None
    losses_per_epoch, acc_per_epoch = [], []
    lrs = lr_schedule(tc)
    # Every epoch's shuffle up front (each run's generator draws in the same order as in
    # `fit`), copied to the device once: no host-to-device copy inside the epoch loop.
    orders = torch.stack([torch.stack([torch.randperm(n, generator=g) for g in shuffles])
                          for _ in lrs]).to(device)  # (epochs, R, n)
    for epoch, lr in enumerate(lrs):
        batches = torch.gather(subsets_d, 1, orders[epoch])  # (R, n) rows of train_x
        total = torch.zeros(r, device=device, dtype=train_x.dtype)
        suffix.train()
        for a, b in bounds:
            idx = batches[:, a:b]
            x = train_x[idx]  # (R, b, ...)
            if augments is not None:
                with torch.no_grad():
                    x = torch.stack([aug(xr) for aug, xr in zip(augments, x, strict=True)])
                    x = prefix_outputs(prefix, x.flatten(0, 1), device, amp, len(x[0]) * r)
                    x = x.view(r, b - a, *x.shape[1:])
            with autocast(device, amp):
                logits = train_fn(params, buffers, x)
            if amp:
                logits = logits.float()
            losses = F.cross_entropy(logits.flatten(0, 1), train_y[idx].flatten(),
                                     reduction="none").view(r, -1).mean(1)
            grads = torch.autograd.grad(losses.sum(), plist)
            bufs = sgd_step(plist, grads, bufs, lr, tc)
            total += losses.detach() * (b - a)
        suffix.eval()
        with torch.no_grad(), autocast(device, amp):
            correct = torch.zeros(r, device=device, dtype=torch.long)
            for j in range(0, len(test_x), eval_chunk):
                pred = test_fn(params, buffers, test_x[j : j + eval_chunk]).argmax(-1)
                correct += (pred == test_y[j : j + eval_chunk]).sum(1)
        losses_per_epoch.append(total / n)
        acc_per_epoch.append(correct.float() / len(test_y))
    losses_all = torch.stack(losses_per_epoch).T.tolist()  # one host sync for the chunk
    accs_all = torch.stack(acc_per_epoch).T.tolist()
    if write_back:
        with torch.no_grad():
            state = {**{k: v[0] for k, v in zip(names, plist, strict=True)},
                     **{k: v[0] for k, v in buffers.items()}}
            for k, v in suffix.state_dict().items():
                v.copy_(state[k])
    return [[{"epoch": e, "train_loss": loss, "epoch_lr": lr, "train_images": n,
              "test_accuracy": acc}
             for e, (loss, lr, acc) in enumerate(zip(run_losses, lrs, run_accs, strict=True),
                                                 start=1)]
            for run_losses, run_accs in zip(losses_all, accs_all, strict=True)]
