"""Which engine trains a fine-tune: the one place that chooses, for a single `finetune` call
and for a grid's runs alike.

The engines: the per-run reference (`finetune.finetune_per_run`), the ConvNet special case
(`batched.finetune_batch`: prefix features once, the runs' suffixes as grouped convolutions;
the fastest) and the stacked engine for any `BlockNet` (`stacked.finetune_stacked`). Both
batched engines give the per-run path's records up to float rounding (Utrera et al., arXiv
2007.05869, fine-tune one source thousands of times; that is what they are for).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from robust_transfer.data import ImageSet
from robust_transfer.data.poison import BackdoorConfig
from robust_transfer.errors import check_choice
from robust_transfer.models.card import SourceCard
from robust_transfer.models.nets import BlockNet
from robust_transfer.models.runtime import amp_enabled
from robust_transfer.transfer import batched, stacked
from robust_transfer.transfer.certify_eval import CertifySpec
from robust_transfer.transfer.finetune import FinetuneConfig, finetune_per_run

# `engine` of `finetune`; of a grid (`run.finetune_many_from_checkpoint`, `grid --engine`).
ENGINES = ("auto", "per-run")
GRID_ENGINES = ("auto", "batched", "per-run")


def _convnet_engine(model: nn.Module, cfg: FinetuneConfig, source_card: SourceCard | None,
                    amp: bool | None = None) -> bool:
    """Whether the ConvNet engine covers `cfg` on `model` (it trains in fp32: not under AMP)."""
    device = next(model.parameters()).device
    return batched.applies(model, cfg, source_card) and not amp_enabled(device, amp)


def finetune(model: BlockNet, cfg: FinetuneConfig, engine: str = "auto",
             amp: bool | None = None,
             on_epoch: Callable[[nn.Module, int], dict] | None = None,
             train_transform: Callable[[ImageSet], ImageSet] | None = None,
             source_card: SourceCard | None = None) -> list[dict]:
    """Fine-tune `model` in place on `cfg.target_task`; one record per epoch.

    `engine`: "auto" takes the ConvNet engine where it applies (`batched.applies`, given the
    source's card `source_card` when known), else the per-run reference; "per-run" forces
    the reference (`finetune_per_run`). Both give the same records (up to float rounding of
    the loss) and leave the model in the same state. An `on_epoch` hook (extra per-epoch
    measurements, e.g. a backdoor's ASR) and a `train_transform` (a change to the k-shot
    training set, e.g. the de-biased target of bias transfer) need the per-run path, so they
    force it.
    """
    check_choice("engine", engine, ENGINES)
    if (engine == "auto" and on_epoch is None and train_transform is None
            and _convnet_engine(model, cfg, source_card, amp)):
        return batched.finetune_batch(model, [cfg], write_back=True)[0]
    return finetune_per_run(model, cfg, amp, on_epoch, train_transform)


def why_not(model: BlockNet, cfg: FinetuneConfig, source_card: SourceCard | None,
            probes: Sequence[BackdoorConfig] | None = None,
            certify: CertifySpec | None = None) -> str | None:
    """Why no batched engine can train this run (one line), or None when one can: backdoor
    `probes` (measured after every epoch), a final model to `certify`, or what
    `stacked.why_not` names."""
    if probes:
        return "backdoor triggers are measured after every epoch (per-run path)"
    if certify is not None:
        return "the final model is certified (per-run path)"
    return stacked.why_not(model, cfg, source_card)


def finetune_group(model: BlockNet, cfgs: list[FinetuneConfig], source_card: SourceCard | None,
                   max_memory: int | None = None,
                   cache: stacked.FeatureCache | None = None) -> list[list[dict]]:
    """Records per run of `cfgs` (one shape, `stacked.shape_key`; none with a `why_not`),
    trained together from `model` (left unchanged): by the ConvNet engine where it applies,
    else by the stacked engine (`max_memory` bytes, prefix outputs shared through `cache`)."""
    if _convnet_engine(model, cfgs[0], source_card):
        return batched.finetune_batch(model, cfgs)
    return stacked.finetune_stacked(model, cfgs, max_memory=max_memory, cache=cache)


