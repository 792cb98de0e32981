"""The `influence` study: which training images drive a fine-tuned model's predictions, natural
vs robust source (Utrera et al., arXiv 2007.05869, Figs. 5-6), with `explain.influence`
over the fine-tuned parameters (Koh & Liang 2017).

Inputs are checkpoints: fine-tuned ones are used as they are; source ones are fine-tuned
first, once per seed, into `out/finetunes/<content id>/` (the study's artifacts: the same
source content and fine-tune settings, the same directory, built once). Each run is one
fine-tune's influence computation: the influence of every training image on every held-out
test image and on every training image (itself excluded), reduced to what the report needs:

- `kind` "class_match": per targets (test / training images) and k = 1..K, the mean over the
  target images of the fraction of their top-k training images sharing their class, its
  standard deviation and the number of targets (Fig. 6: the report's bands are t-intervals
  over fine-tunes of one source group, or over target images for a lone fine-tune);
- `kind` "example": for the first evaluated test image of each class, its `examples` most
  influential training images (indices into the task's sets) and scores (Fig. 5).

An input's content hash (meta.json "sha256") is in its run ids, so another checkpoint at the
same path never reuses old runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from robust_transfer.data import shots_per_class
from robust_transfer.data.tasks import parse_shots
from robust_transfer.errors import UserError, check_choice
from robust_transfer.explain.checkpoints import load_finetune, robustness
from robust_transfer.explain.influence import (
    METHODS,
    RANKINGS,
    class_match_fractions,
    make_influence,
    rank_training_images,
)
from robust_transfer.models import SourceCard, read_card
from robust_transfer.models.checkpoint import checkpoint_sha256
from robust_transfer.studies import STUDIES, spec_record
from robust_transfer.transfer import FinetuneConfig
from robust_transfer.transfer.grid import worker_device
from robust_transfer.transfer.run import finetune_from_checkpoint
from robust_transfer.transfer.runner import Artifact, Unit
from robust_transfer.transfer.spec import content_id

FINETUNES = "finetunes"  # the study's fine-tuned models, under its --out
TARGETS = {"test": "held-out test images", "train": "training images"}
CLASS_MATCH, EXAMPLE = "class_match", "example"  # the `kind` of a row


@STUDIES.register
@dataclass(frozen=True)
class InfluenceStudy:
    """Influence of training images on `checkpoints` (fine-tuned ones, or sources fine-tuned
    per `target_task` ... `lr` with each of `seeds`). Parameters: the head plus the last
    `blocks` blocks (fine-tuned ones); the L2 term is the fine-tune's weight decay, `damping`
    is added on top; `method` exact | cg | lissa (`lissa_depth`). Class-match curves up to
    `top_k`, ranked `ranking`; `targets_per_class` caps the test and training targets per
    class (useful for CG / LiSSA, where each target costs an inverse-HVP); `examples`: the
    training images kept per test image for Fig. 5."""

    checkpoints: tuple[Path, ...]
    method: str = "exact"
    blocks: int = 0
    damping: float = 0.0
    top_k: int = 100
    examples: int = 5
    ranking: str = "helpful"
    targets_per_class: int | str = "all"
    lissa_depth: int = 1000
    target_task: str = "digits-5to9"
    images_per_class: int | str = "all"
    unfrozen_blocks: int | str | None = 0
    epochs: int = 30
    lr: float = 0.1
    seeds: tuple[int, ...] = (0,)
    name = "influence"
    required = ("run_id", "kind", "source_label", "seed")

    def __post_init__(self) -> None:
        object.__setattr__(self, "checkpoints", tuple(Path(p) for p in self.checkpoints))
        if not self.checkpoints:
            raise UserError("influence needs at least one fine-tuned checkpoint")
        check_choice("influence method", self.method, METHODS)
        check_choice("ranking", self.ranking, RANKINGS)
        for name, value in (("seeds", len(self.seeds)), ("top-k", self.top_k),
                            ("examples", self.examples)):
            if value < 1:
                raise UserError(f"{name} must be >= 1, got {value}")
        if self.blocks < 0 or self.damping < 0:
            raise UserError(f"blocks and damping must be >= 0, got {self.blocks}, "
                            f"{self.damping}")
        try:
            per_class = parse_shots(self.targets_per_class)
        except UserError:
            raise UserError(f"targets per class must be a positive integer or 'all', got "
                            f"{self.targets_per_class!r}") from None
        object.__setattr__(self, "targets_per_class", per_class)
        object.__setattr__(self, "seeds", tuple(dict.fromkeys(self.seeds)))
        configs = [self.finetune_config(s) for s in self.seeds]  # checks the settings
        object.__setattr__(self, "images_per_class", configs[0].images_per_class)
        object.__setattr__(self, "unfrozen_blocks", configs[0].unfrozen_blocks)
        tasks = set()
        for path in self.checkpoints:
            card = read_card(path)
            tuned = (_finetune_config(card) if _is_finetune(card) else configs[0]).unfrozen_blocks
            tasks.add(_finetune_config(card).target_task if _is_finetune(card)
                      else self.target_task)
            if tuned is not None and self.blocks > tuned:
                raise UserError(f"{str(path)!r} fine-tuned the head and {tuned} block(s); "
                                f"influence over {self.blocks} blocks is not allowed")
        if len(tasks) > 1:
            raise UserError(f"fine-tunes must share one target task to be compared, got "
                            f"{', '.join(sorted(tasks))}")

    def finetune_config(self, seed: int) -> FinetuneConfig:
        """How a source checkpoint is fine-tuned with `seed`."""
        return FinetuneConfig(self.target_task, self.images_per_class, self.unfrozen_blocks,
                              self.epochs, self.lr, seed=seed)

    def record(self) -> dict:
        return spec_record(self)

    def _finetunes(self, out: Path, device: str = "cpu"
                   ) -> list[tuple[str, Path, Artifact | None]]:
        """(run id, fine-tune directory, its artifact or None for an input fine-tune), in
        input order, then seed order; each fine-tune once."""
        settings = {"study": self.name, "method": self.method, "blocks": self.blocks,
                    "damping": self.damping, "top_k": self.top_k, "examples": self.examples,
                    "ranking": self.ranking, "targets_per_class": self.targets_per_class,
                    **({"lissa_depth": self.lissa_depth} if self.method == "lissa" else {})}
        found: dict[str, tuple[str, Path, Artifact | None]] = {}
        for path in self.checkpoints:
            sha = checkpoint_sha256(path)
            if _is_finetune(read_card(path)):
                run_id = content_id({**settings, "finetune_sha256": sha})
                found.setdefault(run_id, (run_id, path, None))
                continue
            for seed in self.seeds:
                cfg = self.finetune_config(seed)
                directory = out / FINETUNES / content_id({"source_sha256": sha,
                                                          "finetune": cfg.to_dict()})
                run_id = content_id({**settings, "finetune": directory.name})
                artifact = Artifact(directory, _finetune,
                                    _FinetuneJob(path, cfg, directory, device))
                found.setdefault(run_id, (run_id, directory, artifact))
        return list(found.values())

    def run_ids(self) -> list[str]:
        return [run_id for run_id, _, _ in self._finetunes(Path("."))]

    def artifacts(self, out: Path, device: str) -> list[list[Artifact]]:
        return [[a for _, _, a in self._finetunes(out, device) if a is not None]]

    def units(self, pending: list[str], out: Path, device: str) -> list[Unit]:
        where = {run_id: (directory, artifact is not None)
                 for run_id, directory, artifact in self._finetunes(out)}
        return [Unit((run_id,), _influence_run,
                     _InfluenceJob(self, where[run_id][0], device, where[run_id][1]))
                for run_id in pending]


def _is_finetune(card: SourceCard) -> bool:
    return card.role == "finetune"


def _finetune_config(card: SourceCard) -> FinetuneConfig:
    known = FinetuneConfig.__dataclass_fields__
    return FinetuneConfig(**{k: v for k, v in (card.finetune or {}).items() if k in known})


@dataclass(frozen=True)
class _FinetuneJob:
    source: Path
    config: FinetuneConfig
    directory: Path
    device: str = "cpu"


def _finetune(job: _FinetuneJob) -> Path:
    """Fine-tune a source checkpoint into the study's artifact directory (the shared transfer
    code: `finetune_from_checkpoint`; meta.json written last)."""
    finetune_from_checkpoint(job.source, job.config, job.directory, worker_device(job.device))
    return job.directory


@dataclass(frozen=True)
class _InfluenceJob:
    study: InfluenceStudy
    finetune: Path
    device: str = "cpu"
    built: bool = False  # the study's own fine-tune (named relative to --out in the rows)


def _targets(labels: torch.Tensor, per_class: int | str) -> torch.Tensor:
    return shots_per_class(labels, per_class, seed=0)


def _influence_run(job: _InfluenceJob) -> list[list[dict]]:
    """One fine-tune's influence scores, reduced to its class-match and example rows."""
    s = job.study
    ft = load_finetune(job.finetune, worker_device(job.device))
    options = {"depth": s.lissa_depth} if s.method == "lissa" else {}
    module = make_influence(s.method, ft.model, ft.train, unfrozen_blocks=s.blocks,
                            weight_decay=ft.config.train_config().weight_decay,
                            damping=s.damping, **options)
    test_index = _targets(ft.task.test.y, s.targets_per_class)
    train_index = _targets(ft.train.y, s.targets_per_class)
    test, train_targets = ft.task.test.subset(test_index), ft.train.subset(train_index)
    test_scores = module.influences(test.x, test.y).cpu()
    train_scores = module.influences(train_targets.x, train_targets.y).cpu()
    eps, norm = robustness(ft.card)
    blocks = ft.config.unfrozen_blocks
    common = {"source_label": ft.label, "source_eps": eps, "source_norm": norm,
              "target_task": ft.config.target_task,
              "images_per_class": ft.config.images_per_class,
              "unfrozen_blocks": "all" if blocks is None else str(blocks),
              "epochs": ft.config.epochs, "lr": ft.config.lr,
              "batch_size": ft.config.batch_size, "seed": ft.seed,
              "train_images": len(ft.train),
              "finetune": f"{FINETUNES}/{ft.path.name}" if job.built else str(ft.path),
              "finetune_sha256": checkpoint_sha256(ft.path), "influence_method": s.method,
              "influence_blocks": s.blocks, "damping": s.damping, "ranking": s.ranking,
              "chance": float(ft.task.train.y.bincount().max()) / len(ft.task.train.y)}
    fractions = {
        "test": class_match_fractions(test_scores, ft.train.y, test.y, s.top_k, s.ranking),
        "train": class_match_fractions(train_scores, ft.train.y, train_targets.y, s.top_k,
                                       s.ranking, exclude=train_index),
    }
    rows = []
    for targets, frac in fractions.items():
        values = frac.numpy()
        mean = values.mean(0)
        sd = values.std(0, ddof=1) if len(values) > 1 else np.full_like(mean, np.nan)
        rows += [{**common, "kind": CLASS_MATCH, "targets": TARGETS[targets], "k": k + 1,
                  "class_match": float(mean[k]), "class_match_sd": float(sd[k]),
                  "targets_n": len(values)} for k in range(values.shape[1])]
    first = [int(torch.nonzero(test.y == c)[0]) for c in torch.unique(test.y).tolist()]
    top = rank_training_images(test_scores[first], s.examples, s.ranking)
    scores = torch.gather(test_scores[first], 1, top)
    for i, row in enumerate(first):
        rows += [{**common, "kind": EXAMPLE, "test_image": int(test_index[row]),
                  "test_label": int(test.y[row]), "rank": j + 1,
                  "train_image": int(ft.train_index[top[i, j]]),
                  "train_label": int(ft.train.y[top[i, j]]), "score": float(scores[i, j])}
                 for j in range(top.shape[1])]
    return [rows]
