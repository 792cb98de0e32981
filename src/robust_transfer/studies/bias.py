"""The bias-transfer study (Salman et al. 2022, "When does bias transfer in transfer
learning?", arXiv 2207.02842): does a spurious feature planted in a source model move the
predictions of the models fine-tuned from it, on a target task that never had the feature?

Per seed s: a biased source (the feature on every training image of `bias_classes`, labels
kept: `backdoors.bias.bias_backdoor`) and a clean source, both trained with seed s (the
study's artifacts, under `sources/`); each is fine-tuned with seed s (the same k-shot subset
and new head for both, `transfer.finetune`)

- fixed-feature (head only, 0 unfrozen blocks) and full-network (all blocks),
- on the standard target training set and on a de-biased one (the feature on the same share
  of every class's images, `backdoors.bias.DebiasedFeature`; the paper's Section 3),
- at every requested number of images per class,

and each fine-tuned model's prediction shift towards one class is measured on the target test
set (`backdoors.bias.prediction_shift`). One run per fine-tune, one row per run
(`run_bias`); `transfer.runner.run_study` runs them (resumable, any executor). `finetune`
picks its engine: standard-target runs may take the batched one, the de-biased ones (a
`train_transform`) always the per-run reference; both agree up to float rounding.

Example:
    study = BiasStudy(seeds=(0, 1), images_per_class=(5, "all"))
    run_study(study, "runs/bias"); table = read_bias_table("runs/bias")
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from robust_transfer.backdoors.bias import DebiasedFeature, bias_backdoor, prediction_shift
from robust_transfer.backdoors.source import source_backdoor_metrics
from robust_transfer.data import adapt_images, check_task, load_task
from robust_transfer.data.poison import BackdoorConfig
from robust_transfer.data.tasks import check_shots, parse_shots
from robust_transfer.data.triggers import TRIGGERS
from robust_transfer.errors import UserError, check_choice
from robust_transfer.models import load_checkpoint
from robust_transfer.models.nets import ARCHS
from robust_transfer.studies import STUDIES, spec_record
from robust_transfer.train import SourceConfig, TrainConfig
from robust_transfer.transfer.engines import finetune
from robust_transfer.transfer.finetune import FinetuneConfig
from robust_transfer.transfer.grid import SourceJob, train_source_job, worker_device
from robust_transfer.transfer.results import read_results
from robust_transfer.transfer.runner import SOURCES, Artifact, Unit
from robust_transfer.transfer.spec import content_id, source_id

MODES = {"fixed": 0, "full": None}  # fine-tuning mode -> unfrozen blocks (None: all)
TARGET_DATA = ("standard", "de-biased")
SOURCE_KINDS = ("biased", "clean")
SHOTS = "images_per_class"
# The columns a finished run's row holds (the report needs them).
REQUIRED = ("run_id", "seed", "source_kind", "mode", SHOTS, "target_data", "shots",
            "prediction_shift", "shift_class", "test_accuracy")


def _distinct(name: str, values, allowed=None) -> tuple:
    values = tuple(values)
    if not values:
        raise UserError(f"give at least one {name}")
    if len(set(values)) != len(values):
        raise UserError(f"{name}s must not repeat, got {', '.join(map(str, values))}")
    for v in values if allowed is not None else ():
        check_choice(name, v, allowed)
    return values


@STUDIES.register
@dataclass(frozen=True)
class BiasStudy:
    """The study's spec (`study: bias-transfer`), validated at construction (bad values are
    `UserError`s naming them). Defaults: the embedded digits, 0-4 -> 5-9, the blended pattern
    (`feature`) on source class 0, 5 seeds, 1 / 5 / 25 / all images per class, both modes and
    both target data sets.

    Example:
        study = BiasStudy(seeds=(0, 1), images_per_class=(5, "all"))
        run_study(study, "runs/bias")
    """

    source_task: str = "digits-0to4"
    target_task: str = "digits-5to9"
    source_arch: str = "cnn-small"
    bias_classes: tuple[int, ...] = (0,)
    # Blended (a fixed random pattern at alpha 0.2), the analogue of the paper's fixed
    # Gaussian-pattern feature: on the digits the source's features react to it more than to
    # the 2x2 BadNets square (shift difference ~0.2 vs ~0.07 fixed-feature; see README).
    feature: str = "blended"
    patch_size: int | None = None  # badnets only (None: scaled to the image, 2 on 8x8)
    # The feature's trigger options (e.g. blended alpha, sig delta; a YAML mapping), kept as
    # sorted (key, value) pairs.
    trigger_options: dict | tuple[tuple[str, object], ...] = ()
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    images_per_class: tuple[int | str, ...] = (1, 5, 25, "all")
    modes: tuple[str, ...] = ("fixed", "full")
    target_data: tuple[str, ...] = TARGET_DATA
    debias_share: float = 0.5
    source_epochs: int = 20
    source_lr: float = 0.1
    epochs: int = 10
    lr: float = 0.1
    batch_size: int = 32

    name = "bias-transfer"
    required = REQUIRED

    def __post_init__(self) -> None:
        check_task(self.source_task)
        check_task(self.target_task)
        check_choice("arch", self.source_arch, ARCHS)
        check_choice("bias feature", self.feature, TRIGGERS)
        object.__setattr__(self, "trigger_options",
                           tuple(sorted(dict(self.trigger_options).items())))
        source, target = load_task(self.source_task), load_task(self.target_task)
        classes = ((self.bias_classes,) if isinstance(self.bias_classes, int)
                   else tuple(self.bias_classes))
        object.__setattr__(self, "bias_classes", _distinct("bias class", classes))
        for c in self.bias_classes:
            if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < source.num_classes:
                raise UserError(f"bias class {c!r} does not exist: source task "
                                f"{self.source_task!r} has classes 0..{source.num_classes - 1}")
        self.backdoor.trigger(source.input_shape)  # a patch too large for the image: now
        channels = (source.input_shape[0], target.input_shape[0])
        if channels[0] != channels[1] and channels[1] != 1:
            raise UserError(f"target task {self.target_task!r} has {channels[1]}-channel "
                            f"images, the source model takes {channels[0]}")
        seeds = _distinct("seed", self.seeds)
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
            raise UserError(f"seeds must be integers >= 0, got {', '.join(map(str, seeds))}")
        shots = _distinct("images-per-class value",
                          [check_shots(target, parse_shots(k)) for k in self.images_per_class])
        object.__setattr__(self, "seeds", seeds)
        object.__setattr__(self, "images_per_class", shots)
        object.__setattr__(self, "modes", _distinct("mode", self.modes, MODES))
        object.__setattr__(self, "target_data",
                           _distinct("target data", self.target_data, TARGET_DATA))
        object.__setattr__(self, "source_lr", float(self.source_lr))
        object.__setattr__(self, "lr", float(self.lr))
        object.__setattr__(self, "debias_share", float(self.debias_share))
        DebiasedFeature(self.backdoor.trigger(source.input_shape), self.debias_share)
        self.source_config(seeds[0])  # epochs, lr, batch size via TrainConfig
        self.finetune_config(seeds[0], shots[0], self.modes[0])

    @property
    def backdoor(self) -> BackdoorConfig:
        """The poisoning that plants the feature (`backdoors.bias.bias_backdoor`)."""
        return bias_backdoor(self.bias_classes, self.feature, self.patch_size,
                             dict(self.trigger_options))

    def source_config(self, seed: int, biased: bool = True) -> SourceConfig:
        return SourceConfig(task=self.source_task, arch=self.source_arch,
                            backdoor=self.backdoor if biased else None,
                            train=TrainConfig(epochs=self.source_epochs, lr=self.source_lr,
                                              seed=seed))

    def finetune_config(self, seed: int, shots, mode: str) -> FinetuneConfig:
        return FinetuneConfig(target_task=self.target_task, images_per_class=shots,
                              unfrozen_blocks=MODES[mode], epochs=self.epochs, lr=self.lr,
                              batch_size=self.batch_size, seed=seed)

    # -- runner.Study --------------------------------------------------------------------

    def record(self) -> dict:
        return spec_record(self)

    def runs(self, out: Path = Path("."), device: str = "cpu") -> list[BiasRun]:
        """Every fine-tune of the study, in order (seed, source kind, mode, target data,
        images per class)."""
        return [BiasRun(src, out / SOURCES / source_id(src), self.backdoor, mode, data,
                        self.debias_share, self.finetune_config(seed, shots, mode), device)
                for seed in self.seeds for src in self._sources(seed)
                for mode in self.modes for data in self.target_data
                for shots in self.images_per_class]

    def run_ids(self) -> list[str]:
        return [r.run_id for r in self.runs()]

    def artifacts(self, out: Path, device: str) -> list[list[Artifact]]:
        """One stage: the biased and the clean source of every seed."""
        sources = [src for seed in self.seeds for src in self._sources(seed)]
        return [[Artifact(d, train_source_job, SourceJob(src, d, device)) for src in sources
                 for d in [out / SOURCES / source_id(src)]]]

    def units(self, pending: list[str], out: Path, device: str) -> list[Unit]:
        """One unit per fine-tune (each loads its source from disk)."""
        runs = {r.run_id: r for r in self.runs(out, device)}
        return [Unit((run_id,), run_bias, runs[run_id]) for run_id in pending]

    def _sources(self, seed: int) -> tuple[SourceConfig, SourceConfig]:
        """(biased, clean) source recipes of `seed`, in `SOURCE_KINDS` order."""
        return self.source_config(seed, True), self.source_config(seed, False)


@dataclass(frozen=True)
class BiasRun:
    """One fine-tune of the study: the `source` (trained into `source_dir`), fine-tuned per
    `finetune` on the `target_data` training set, then measured with the `backdoor`'s
    feature."""

    source: SourceConfig
    source_dir: Path
    backdoor: BackdoorConfig  # the planted feature (also on the clean source's runs: measured)
    mode: str
    target_data: str
    debias_share: float
    finetune: FinetuneConfig
    device: str = "cpu"

    @property
    def source_kind(self) -> str:
        return "clean" if self.source.backdoor is None else "biased"

    @property
    def run_id(self) -> str:
        """The content id of what the row depends on: the source's recipe, the feature, the
        target data (with the de-biased share only where it is used) and the fine-tune."""
        d = {"study": BiasStudy.name, "source": self.source.to_dict(),
             "feature": self.backdoor.to_dict(), "target_data": self.target_data,
             "finetune": self.finetune.to_dict()}
        if self.target_data == "de-biased":
            d["debias_share"] = self.debias_share
        return content_id(d)


def run_bias(run: BiasRun) -> list[list[dict]]:
    """The one row of `run` (as a `runner.Unit` function: [[row]]). Columns, in the grid's
    vocabulary: source_task, source_arch, target_task, target_classes, feature, patch_size,
    trigger_options (JSON text),
    bias_classes (as text, e.g. "0,3"), debias_share (de-biased runs; NaN on the standard
    target), epochs, lr, batch_size, source_epochs, source_lr, seed, source_kind (biased |
    clean), mode (fixed | full), unfrozen_blocks, images_per_class, target_data (standard |
    de-biased), train_images, shots (train images per class), test_accuracy (clean target
    test accuracy), prediction_shift, shift_class, shift_clean_share, shift_triggered_share,
    flip_rate (`backdoors.bias`), source_clean_accuracy, source_asr (share of source test
    images not of the first bias class sent to it by the feature: how much the source itself
    relies on it).
    """
    model, card = load_checkpoint(run.source_dir, worker_device(run.device))
    scores = source_backdoor_metrics(model, card, run.backdoor)
    ft = run.finetune
    target = load_task(ft.target_task)
    spec = model.spec
    test = adapt_images(target.test, spec.in_channels, spec.input_size,
                        f"target task {ft.target_task!r} images")
    feature = run.backdoor.trigger(tuple(test.x.shape[1:]))
    debiased = run.target_data == "de-biased"
    transform = DebiasedFeature(feature, run.debias_share, ft.seed) if debiased else None
    history = finetune(model, ft, train_transform=transform)
    shift = prediction_shift(model, test.x, test.y, feature)
    n = history[-1]["train_images"]
    src = run.source
    return [[{
        "source_task": src.task, "source_arch": src.arch,
        "target_task": ft.target_task, "target_classes": target.num_classes,
        "feature": run.backdoor.attack, "patch_size": run.backdoor.patch_size,
        "trigger_options": json.dumps(dict(run.backdoor.trigger_options)),
        "bias_classes": ",".join(map(str, run.backdoor.classes)),
        "debias_share": run.debias_share if debiased else float("nan"),
        "epochs": ft.epochs, "lr": ft.lr, "batch_size": ft.batch_size,
        "source_epochs": src.train.epochs, "source_lr": src.train.lr, "seed": ft.seed,
        "source_kind": run.source_kind, "mode": run.mode,
        "unfrozen_blocks": "all" if ft.unfrozen_blocks is None else str(ft.unfrozen_blocks),
        SHOTS: ft.images_per_class, "target_data": run.target_data, "train_images": n,
        "shots": n / target.num_classes,
        "test_accuracy": shift["clean_accuracy"],
        "prediction_shift": shift["prediction_shift"],
        "shift_class": shift["shift_class"],
        "shift_clean_share": shift["shift_clean_share"],
        "shift_triggered_share": shift["shift_triggered_share"],
        "flip_rate": shift["flip_rate"],
        "source_clean_accuracy": scores["clean_accuracy"],
        "source_asr": scores["asr"]}]]


# Columns of tables written before the study ran on the runner (`bias_transfer.parquet`).
OLD_COLUMNS = {"arch": "source_arch", "source": "source_kind", "target_accuracy":
               "test_accuracy", "source_accuracy": "source_clean_accuracy"}


def read_bias_table(path: str | Path) -> pd.DataFrame:
    """The study's table: from its folder (or its results.parquet), or a
    `bias_transfer.parquet` of the previous version (its columns renamed to today's).
    `images_per_class` comes back as int or "all". A missing or foreign file is a
    `UserError`."""
    path = Path(path)
    if path.is_file() and path.name != "results.parquet":
        table = read_results(path, ()).rename(columns=OLD_COLUMNS)
        missing = [c for c in REQUIRED if c != "run_id" and c not in table.columns]
        if missing:
            raise UserError(f"{str(path)!r} is not a bias-transfer table: missing column "
                            f"{missing[0]!r}")
        return table
    return read_results(path, REQUIRED)
