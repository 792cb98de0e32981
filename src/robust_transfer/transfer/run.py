"""One fine-tune from a source checkpoint: the code path shared by `finetune` and `grid`."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch

from robust_transfer.data import adapt_images, load_task
from robust_transfer.data.poison import BackdoorConfig
from robust_transfer.errors import UserError, check_choice
from robust_transfer.models import SourceCard, load_checkpoint, save_checkpoint
from robust_transfer.models.nets import BlockNet
from robust_transfer.train import SourceConfig
from robust_transfer.train.distill import distill_label
from robust_transfer.transfer import stacked
from robust_transfer.transfer.backdoor_eval import backdoor_epoch_hook
from robust_transfer.transfer.certify_eval import CertifySpec, certify_columns, task_test_images
from robust_transfer.transfer.engines import GRID_ENGINES, finetune, finetune_group, why_not
from robust_transfer.transfer.finetune import FinetuneConfig
from robust_transfer.transfer.spec import content_id
from robust_transfer.variables import ZERO, columns, kind, treatment_fields

# The source's treatment (threat model, training method with its options, distillation,
# planted backdoor: `SourceConfig`'s fields declared role "treatment"): sources that share the
# rest of their recipe are one comparison group (natural vs robust, clean vs backdoored); a
# distilled student pairs with the natural source of its recipe.
THREAT_FIELDS = treatment_fields(SourceConfig)


def source_recipe(card: SourceCard) -> dict:
    """How a source was trained, less its treatment (`THREAT_FIELDS`).

    From the checkpoint's recorded recipe; a checkpoint without one (trained elsewhere) is
    identified by what its card does say (task, arch, seed).
    """
    if not card.recipe:
        return {"task": _or(card.task, ""), "arch": card.model.arch, "seed": _or(card.seed, 0)}
    return {k: v for k, v in card.recipe.items() if k not in THREAT_FIELDS}


def _or(value, default):
    """`value`, or `default` when the card does not record it (None)."""
    return default if value is None else value


def source_method(card: SourceCard) -> str:
    """The source's training method; checkpoints from before methods: natural or PGD-AT."""
    method = card.method or (card.recipe or {}).get("method")
    return method or ("natural" if float(_or(card.eps, 0.0)) == 0 else "pgd")


def source_columns(card: SourceCard) -> dict:
    """The columns that describe a source model in a results row.

    `source_recipe` is a short hash of `source_recipe(card)`: the report pairs a robust
    source with the natural source of the same recipe only (same task, arch, epochs, lr,
    batch size, attack steps, seed), and the readable `source_*` columns label it.
    """
    metrics = _or(card.metrics, {})
    recipe = card.recipe or {}
    train = card.train_recipe
    eps, norm = float(_or(card.eps, 0.0)), _or(card.norm, "")
    return {
        "source_task": _or(card.task, ""),
        "source_arch": card.model.arch,
        "source_eps": eps,
        "source_norm": norm,
        "source_method": source_method(card),
        # the treatment variables declared with a column (e.g. `source_sigma`, the Gaussian
        # noise level of gaussian / smoothadv); unset: the type's zero
        **{column: kind(SourceConfig, name)(recipe.get(name) or ZERO[kind(SourceConfig, name)])
           for name, column in columns(SourceConfig).items()},
        "source_seed": int(_or(card.seed, 0)),
        "source_epochs": int(train.get("epochs", -1)),
        "source_lr": float(train.get("lr", float("nan"))),
        "source_attack_steps": int(recipe.get("attack_steps", -1)),
        "source_distill": distill_label(card.distill, eps, str(norm)),
        "source_recipe": content_id(source_recipe(card), 8),
        "source_clean_accuracy": float(metrics.get("clean_accuracy", float("nan"))),
        "source_robust_accuracy": float(metrics.get("robust_accuracy", float("nan"))),
        "source_backdoor": source_backdoor_label(card),
    }


def source_backdoor(card: SourceCard) -> BackdoorConfig | None:
    """The backdoor recorded in a source's recipe (None: a clean source)."""
    d = (card.recipe or {}).get("backdoor")
    return None if not d else BackdoorConfig.from_dict(d)


def source_backdoor_label(card: SourceCard) -> str:
    """The `source_backdoor` column: the planted backdoor's attack ("badnets", "neuba"), or
    "" for a clean source."""
    backdoor = source_backdoor(card)
    return "" if backdoor is None else backdoor.attack


def finetune_from_checkpoint(
    source_dir: str | Path,
    cfg: FinetuneConfig,
    out_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
    engine: str = "auto",
    probes: Sequence[BackdoorConfig] | None = None,
) -> list[dict]:
    """Fine-tune the checkpoint at `source_dir` per `cfg`; one tidy row per epoch.

    `engine` "auto" | "per-run": as `engines.finetune` takes it (given the source's
    card).

    Rows carry the source's identity (`source_columns`), every field of `cfg`
    (`images_per_class` as its one type, int or "all"; unfrozen blocks as text, "all" for
    every block) and the epoch's test accuracy. With `out_dir`, the fine-tuned model is saved
    there as a checkpoint whose metadata names its source and recipe.

    `probes`: backdoors whose triggers are measured after every epoch (`backdoor_eval`:
    C-Acc, task-agnostic ASR, RA); None = the source's own backdoor, if it has one.
    """
    model, card = load_checkpoint(source_dir, device)
    if card.task is None:  # every source records it (imports: "", no known task)
        raise UserError(f"checkpoint {str(source_dir)!r}: its meta.json has no 'task' field "
                        "(the source task every fine-tuned row records); re-save or import it")
    rows, history = _finetune_loaded(model, card, cfg, engine, probes)
    if out_dir is not None:
        save_checkpoint(model, out_dir, SourceCard(
            role="finetune", source={"path": str(source_dir), **source_columns(card)},
            finetune=cfg.to_dict(), task=cfg.target_task, seed=cfg.seed,
            metrics={"test_accuracy": history[-1]["test_accuracy"]}, history=history))
    return rows


def _finetune_loaded(model: BlockNet, card: SourceCard, cfg: FinetuneConfig, engine: str,
                     probes: Sequence[BackdoorConfig] | None,
                     certify: CertifySpec | None = None) -> tuple[list[dict], list[dict]]:
    """(rows, per-epoch history) of fine-tuning the loaded source `model` in place; with
    `certify`, the final epoch's record gets the certification columns of the final model."""
    own = source_backdoor(card)
    hook = None
    if probes or own is not None:  # extra per-epoch measurements: the per-run path
        spec = model.spec
        test = adapt_images(load_task(cfg.target_task).test, spec.in_channels, spec.input_size,
                            f"target task {cfg.target_task!r} images")
        dev = next(model.parameters()).device
        hook = backdoor_epoch_hook(test.x.to(dev), test.y.to(dev), probes or (), own)
    history = finetune(model, cfg, engine, on_epoch=hook, source_card=card)
    if certify is not None:
        x, y = task_test_images(model, cfg.target_task)
        history[-1] = {**history[-1], **certify_columns(model, x, y, certify, cfg.seed)}
    return run_rows(card, cfg, history), history


def finetune_many_from_checkpoint(
    source_dir: str | Path,
    cfgs: list[FinetuneConfig],
    device: torch.device | str = "cpu",
    probes: Sequence[BackdoorConfig] | None = None,
    engine: str = "auto",
    max_memory: int | None = None,
    certify: CertifySpec | None = None,
) -> list[list[dict]]:
    """Rows (as `finetune_from_checkpoint` gives them, plus an `engine` column: "batched" or
    "per-run") of every fine-tune in `cfgs` of the checkpoint at `source_dir`.

    `engine` "auto": runs of one shape (`stacked.shape_key`) that a batched engine covers
    (`engines.why_not`: no backdoor `probes` to measure, nothing to `certify`) are trained
    together (`engines.finetune_group` chooses the engine); every other run by the per-run
    path, one at a time. "batched": the
    same, but a run no batched engine covers is a `UserError` naming why. "per-run": every
    run by the per-run path. `max_memory`: bytes for `finetune_stacked` (None: its default).
    The frozen prefix's outputs are computed once per (target, k) for all shapes
    (`stacked.FeatureCache`).
    """
    check_choice("engine", engine, GRID_ENGINES)
    model, card = load_checkpoint(source_dir, device)
    results: list[list[dict] | None] = [None] * len(cfgs)
    groups: dict[tuple, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        reason = None if engine == "per-run" else why_not(model, cfg, card, probes,
                                                          certify)
        if engine == "batched" and reason is not None:
            raise UserError(f"engine 'batched' cannot fine-tune {source_dir} -> "
                            f"{cfg.target_task}: {reason}")
        if engine != "per-run" and reason is None:
            groups.setdefault(stacked.shape_key(cfg), []).append(i)
        else:
            # a copy of the loaded source, not a second read of the checkpoint
            rows = _finetune_loaded(copy.deepcopy(model), card, cfg, "per-run",
                                    probes, certify)[0]
            results[i] = [{**row, "engine": "per-run"} for row in rows]
    cache = stacked.FeatureCache()  # prefix outputs shared by all shapes of a (target, k)
    for members in groups.values():
        histories = finetune_group(model, [cfgs[i] for i in members], card,
                                   max_memory, cache)
        for i, history in zip(members, histories, strict=True):
            results[i] = [{**row, "engine": "batched"}
                          for row in run_rows(card, cfgs[i], history)]
    return results


def run_rows(card: SourceCard, cfg: FinetuneConfig, history: list[dict]) -> list[dict]:
    """One tidy row per epoch: the source's columns, the fine-tune's config, the record."""
    config = {column: getattr(cfg, name) for name, column in columns(FinetuneConfig).items()}
    config["unfrozen_blocks"] = "all" if cfg.unfrozen_blocks is None else str(cfg.unfrozen_blocks)
    config = {"target_task": config.pop("target_task"),
              "target_classes": load_task(cfg.target_task).num_classes, **config}
    return [{**source_columns(card), **config, **record} for record in history]
