"""The watermark removal study (Adi et al. 2018, USENIX Security): does a backdoor watermark
survive each removal attack and transfer to a new task, and at what cost in accuracy?

Inputs (spec fields, paths): the watermarked `checkpoint` (`watermark embed`) and its `key`.
Their content hashes (the weights' and the key's sha256) enter every run id, so another
checkpoint or key never reuses old runs. The one artifact: an independently trained model,
the checkpoint's recipe with another seed and no key (`backdoors.watermark.independent_recipe`),
under `out/sources/<recipe id>/`: the baseline every verdict is read against, the accuracy
reference after transfer, and the permutation test's negative control.

Runs, one row each: the two baselines (binomial test); each removal attack (FTLL | FTAL |
RTLL | RTAL) of the watermarked model per seed (binomial test); transfer of either model to
`target_task` with each of `unfrozen_blocks` trained, per seed (`transfer.engines.finetune`,
the one fine-tuning protocol; the permutation test of `backdoors.watermark.transfer_verify`).
The seed draws the attacker's data, the new head and the batch order. `study_table` adds what
compares runs (`reference_accuracy`, `accuracy_change`) and orders them for the report.

Columns (the grid's vocabulary): run_id, model, source (watermarked | independent), stage
(baseline | removal | transfer), seed (-1 for the baselines), source_task, source_arch,
target_task (the task the model is tuned and tested on: the source task for baselines and
removals), unfrozen_blocks ("0" | ... | "all"), images_per_class, epochs, lr, batch_size,
train_images (of the training that made the row's model: the source recipe's for a baseline,
the attacker's share for a removal), clean_fraction (removals), test_accuracy,
trigger_accuracy (after transfer: the cross-fitted mapped accuracy), chance, p_value, owned,
verification (binomial | permutation), seconds, alpha, permutations, trigger_size, key_seed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from robust_transfer.backdoors.defenses import clean_subset
from robust_transfer.backdoors.watermark import (
    ALPHA,
    ATTACKS,
    PERMUTATIONS,
    RemovalConfig,
    check_key_apart,
    check_model_fits,
    independent_recipe,
    load_key,
    remove,
    transfer_verify,
    verify,
)
from robust_transfer.data import load_task
from robust_transfer.data.tasks import ALL, check_task, parse_shots
from robust_transfer.errors import UserError, check_choice
from robust_transfer.models import load_checkpoint
from robust_transfer.models.checkpoint import WEIGHTS, file_sha256
from robust_transfer.models.runtime import accuracy
from robust_transfer.studies import STUDIES, spec_record
from robust_transfer.train import SourceConfig
from robust_transfer.transfer.engines import finetune
from robust_transfer.transfer.finetune import FinetuneConfig, parse_blocks
from robust_transfer.transfer.grid import SourceJob, train_source_job, worker_device
from robust_transfer.transfer.runner import SOURCES, Artifact, Unit
from robust_transfer.transfer.spec import content_id

WATERMARKED, INDEPENDENT = "watermarked", "independent"
BASELINE, REMOVAL, TRANSFER = "baseline", "removal", "transfer"


@STUDIES.register
@dataclass(frozen=True)
class WatermarkRemoval:
    """The removal study of the watermarked `checkpoint` with `key` (both paths; relative ones
    are taken from the current directory): `attacks` on `clean_fraction` of each class of the
    source task's training set, `removal_epochs` at constant `removal_lr`; transfer to
    `target_task` (None: none) with each of `unfrozen_blocks` trained (an int or "all"), on
    `images_per_class` target images for `transfer_epochs` at `transfer_lr`; every removal and
    transfer once per seed of `seeds`; ownership at `alpha`, after transfer by `permutations`
    permutations. Checked at construction, inputs included (they are read, not changed).

    Example:
        study = WatermarkRemoval(Path("ckpt/wm"), Path("keys/wm"), seeds=(0,))
        runner.run_study(study, "out/wm"); study_table(read_results("out/wm", study.required))
    """

    checkpoint: Path
    key: Path
    attacks: tuple[str, ...] = ATTACKS
    clean_fraction: float = 0.2
    removal_epochs: int = 20
    removal_lr: float = 0.01
    removal_batch_size: int = 32
    target_task: str | None = "digits-5to9"
    unfrozen_blocks: tuple[int | str, ...] = (0, 1, "all")
    images_per_class: int | str = ALL
    transfer_epochs: int = 30
    transfer_lr: float = 0.1
    seeds: tuple[int, ...] = (0, 1, 2)
    alpha: float = ALPHA
    permutations: int = PERMUTATIONS
    name = "watermark-removal"
    required = ("run_id", "model", "source", "stage", "seed", "source_task", "target_task",
                "test_accuracy", "trigger_accuracy", "chance", "p_value", "owned")

    def __post_init__(self) -> None:
        def setting(name, value):
            object.__setattr__(self, name, value)

        setting("checkpoint", Path(self.checkpoint).absolute())
        setting("key", Path(self.key).absolute())
        setting("attacks", tuple(dict.fromkeys(self.attacks)))
        for a in self.attacks:
            check_choice("removal attack", a, ATTACKS)
        self.removal()  # checks the attacker's budget
        if self.target_task is not None:
            check_task(self.target_task)
        setting("images_per_class", parse_shots(self.images_per_class))
        blocks = (parse_blocks(b) for b in self.unfrozen_blocks)
        setting("unfrozen_blocks", tuple(dict.fromkeys(ALL if b is None else b for b in blocks)))
        if not self.seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0
                                 for s in self.seeds):
            raise UserError(f"the watermark study needs seeds: integers >= 0, got "
                            f"{list(self.seeds)}")
        if not 0 < self.alpha < 1:
            raise UserError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.transfer_epochs < 1 or not self.transfer_lr > 0 or self.permutations < 1:
            raise UserError("transfer epochs and permutations must be >= 1 and lr > 0")
        setting("_inputs", _read_inputs(self.checkpoint, self.key))

    def removal(self, seed: int = 0) -> RemovalConfig:
        return RemovalConfig(self.clean_fraction, self.removal_epochs, self.removal_lr,
                             self.removal_batch_size, seed)

    def finetune_config(self, blocks: int | str, seed: int) -> FinetuneConfig:
        return FinetuneConfig(target_task=self.target_task,
                              images_per_class=self.images_per_class,
                              unfrozen_blocks=parse_blocks(blocks), epochs=self.transfer_epochs,
                              lr=self.transfer_lr, seed=seed)

    def runs(self) -> list[WatermarkRun]:
        """Every run, in the report's order: baselines, then per seed the removals and the
        transfers (the watermarked model's, then the independent one's, per block count)."""
        runs = [WatermarkRun(BASELINE, WATERMARKED), WatermarkRun(BASELINE, INDEPENDENT)]
        for seed in self.seeds:
            runs += [WatermarkRun(REMOVAL, WATERMARKED, seed, attack=a) for a in self.attacks]
            runs += [WatermarkRun(TRANSFER, s, seed, blocks=b)
                     for b in (self.unfrozen_blocks if self.target_task else ())
                     for s in (WATERMARKED, INDEPENDENT)]
        return runs

    def run_id(self, run: WatermarkRun) -> str:
        """The content id of what `run` computes: its settings and the inputs' hashes."""
        settings = {"study": self.name, **vars(run), "alpha": self.alpha,
                    "checkpoint_sha256": self._inputs.checkpoint_sha256,
                    "key_sha256": self._inputs.key_sha256}
        if run.stage == REMOVAL:
            settings |= {"clean_fraction": self.clean_fraction, "epochs": self.removal_epochs,
                         "lr": self.removal_lr, "batch_size": self.removal_batch_size}
        elif run.stage == TRANSFER:
            settings |= {"target_task": self.target_task, "images_per_class":
                         self.images_per_class, "epochs": self.transfer_epochs,
                         "lr": self.transfer_lr, "permutations": self.permutations}
        return content_id(settings)

    # ---- runner.Study ----------------------------------------------------------------------

    def record(self) -> dict:
        return spec_record(self)

    def run_ids(self) -> list[str]:
        return [self.run_id(r) for r in self.runs()]

    def independent_dir(self, out: Path) -> Path:
        return Path(out) / SOURCES / content_id(self._inputs.independent.to_dict())

    def artifacts(self, out: Path, device: str) -> list[list[Artifact]]:
        """The independent model, trained as the grid trains its sources."""
        job = SourceJob(self._inputs.independent, self.independent_dir(out), device)
        return [[Artifact(job.directory, train_source_job, job)]]

    def units(self, pending: list[str], out: Path, device: str) -> list[Unit]:
        runs = {self.run_id(r): r for r in self.runs()}
        return [Unit((i,), run_watermark, _RunJob(self, runs[i], self.independent_dir(out),
                                                  device)) for i in pending]


@dataclass(frozen=True)
class WatermarkRun:
    """One run: a `stage` of one `source` model (watermarked | independent); `seed` (-1: a
    baseline), the removal `attack` or the transfer's unfrozen `blocks`."""

    stage: str
    source: str
    seed: int = -1
    attack: str | None = None
    blocks: int | str | None = None

    @property
    def model(self) -> str:
        """The row's label in the table and the figure."""
        if self.stage == BASELINE:
            return self.source
        if self.stage == REMOVAL:
            return self.attack
        name = f"transfer k={self.blocks}"
        return name if self.source == WATERMARKED else f"{name} ({INDEPENDENT})"


@dataclass(frozen=True)
class _Inputs:
    """What the study reads from its inputs once, at construction."""

    checkpoint_sha256: str
    key_sha256: str
    independent: SourceConfig


def _read_inputs(checkpoint: Path, key_dir: Path) -> _Inputs:
    """The inputs checked (the key apart from the checkpoint, both intact, the model fits the
    key, a recipe to train the independent model with) and their hashes."""
    check_key_apart(key_dir, checkpoint)
    key, key_meta = load_key(key_dir)
    model, card = load_checkpoint(checkpoint)
    check_model_fits(model, key)
    sha = card.sha256 or file_sha256(checkpoint / WEIGHTS)
    return _Inputs(sha, key_meta["sha256"], independent_recipe(card))


# ---- one run -----------------------------------------------------------------------------

@dataclass(frozen=True)
class _RunJob:
    study: WatermarkRemoval
    run: WatermarkRun
    independent: Path
    device: str = "cpu"


def run_watermark(job: _RunJob) -> list[list[dict]]:
    """The row of one run (`runner.Unit.fn`): loads its model and the key from disk, attacks
    or transfers it (or neither: a baseline), measures test accuracy and ownership."""
    s, r = job.study, job.run
    key, _ = load_key(s.key)
    model, card = load_checkpoint(s.checkpoint if r.source == WATERMARKED else job.independent,
                                  worker_device(job.device))
    source_task = card.task
    task = load_task(source_task)
    start, seconds = time.perf_counter(), 0.0
    if r.stage == BASELINE:
        train = card.train_recipe
        row = {"target_task": source_task, "unfrozen_blocks": ALL, "images_per_class": ALL,
               "epochs": train["epochs"], "lr": train["lr"], "batch_size": train["batch_size"],
               "train_images": len(task.train)}
    elif r.stage == REMOVAL:
        removal = s.removal(r.seed)
        model = remove(model, r.attack, task, removal)
        seconds = time.perf_counter() - start
        shares = torch.bincount(clean_subset(task, removal.clean_fraction, r.seed).y)
        row = {"target_task": source_task,
               "unfrozen_blocks": "0" if r.attack.endswith("LL") else ALL,
               "images_per_class": int(shares.max()), "epochs": removal.epochs,
               "lr": removal.lr, "batch_size": removal.batch_size,
               "train_images": int(shares.sum()), "clean_fraction": removal.clean_fraction}
    else:
        cfg = s.finetune_config(r.blocks, r.seed)
        history = finetune(model, cfg)
        seconds = time.perf_counter() - start
        task = load_task(cfg.target_task)
        row = {"target_task": cfg.target_task, "unfrozen_blocks": str(r.blocks),
               "images_per_class": cfg.images_per_class, "epochs": cfg.epochs, "lr": cfg.lr,
               "batch_size": cfg.batch_size, "train_images": history[-1]["train_images"]}
    if r.stage == TRANSFER:
        v = transfer_verify(model, key, s.alpha, s.permutations, r.seed)
    else:
        v = {**verify(model, key, s.alpha), "verification": "binomial"}
    return [[{
        "model": r.model, "source": r.source, "stage": r.stage, "seed": r.seed,
        "source_task": source_task, "source_arch": card.model.arch, **row,
        "clean_fraction": row.get("clean_fraction"),
        "test_accuracy": accuracy(model, task.test.x, task.test.y),
        "trigger_accuracy": v["trigger_accuracy"], "chance": v["chance"],
        "p_value": v["p_value"], "owned": v["owned"], "verification": v["verification"],
        "seconds": seconds, "alpha": s.alpha, "permutations": s.permutations,
        "trigger_size": len(key), "key_seed": key.seed,
    }]]


# ---- the study's table -------------------------------------------------------------------

def study_table(results: pd.DataFrame) -> pd.DataFrame:
    """The study's results in the report's order (baselines; per seed, removals in `ATTACKS`
    order, then transfers by unfrozen blocks, the watermarked model's before the independent
    one's), with `reference_accuracy` and `accuracy_change`: against the watermarked
    baseline for a removal, against the independent model's transfer (same blocks and seed)
    for a transfer; none for the baselines. Reads the rows alone (no inputs needed)."""
    t = results.copy()
    stage = t.stage.map({BASELINE: 0, REMOVAL: 1, TRANSFER: 2})
    blocks = pd.to_numeric(t.unfrozen_blocks.where(t.unfrozen_blocks != ALL), errors="coerce")
    within = t.model.map({a: i for i, a in enumerate(ATTACKS)}).where(
        stage == 1, blocks.fillna(float("inf")))
    t = t.assign(_base=stage.clip(upper=1), _stage=stage, _within=within,
                 _ind=(t.source == INDEPENDENT).astype(int))
    t = t.sort_values(["_base", "seed", "_stage", "_within", "_ind"], kind="stable")
    base = t[(t.stage == BASELINE) & (t.source == WATERMARKED)].test_accuracy
    ref = pd.Series(float("nan"), index=t.index)
    ref[t.stage == REMOVAL] = base.iloc[0] if len(base) else float("nan")
    independent = (t[(t.stage == TRANSFER) & (t.source == INDEPENDENT)]
                   .set_index(["unfrozen_blocks", "seed"]).test_accuracy)
    transfers = t.stage == TRANSFER
    keys = pd.MultiIndex.from_frame(t.loc[transfers, ["unfrozen_blocks", "seed"]])
    ref[transfers] = independent.reindex(keys).to_numpy()
    t = t.assign(reference_accuracy=ref, accuracy_change=t.test_accuracy - ref)
    return t.drop(columns=["_base", "_stage", "_within", "_ind"]).reset_index(drop=True)
