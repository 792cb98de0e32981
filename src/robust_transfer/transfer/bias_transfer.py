"""The bias-transfer study (Salman et al. 2022, "When does bias transfer in transfer
learning?", arXiv 2207.02842): does a spurious feature planted in a source model move the
predictions of the models fine-tuned from it, on a target task that never had the feature?

Per seed s: a biased source (the feature on every training image of `bias_classes`, labels
kept: `backdoors.bias.bias_backdoor`) and a clean source, both trained with seed s; each is
fine-tuned with seed s (the same k-shot subset and new head for both, `transfer.finetune`)

- fixed-feature (head only, 0 unfrozen blocks) and full-network (all blocks),
- on the standard target training set and on a de-biased one (the feature on the same share
  of every class's images, `backdoors.bias.DebiasedFeature`; the paper's Section 3),
- at every requested number of images per class,

and each fine-tuned model's prediction shift towards one class is measured on the target test
set (`backdoors.bias.prediction_shift`). One row per fine-tune; the same config gives the same
table on CPU. `finetune` picks its engine: standard-target runs may take the batched one, the
de-biased ones (a `train_transform`) always the per-run reference; both agree up to float
rounding.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch

from robust_transfer.atomic import atomic_path
from robust_transfer.backdoors.bias import DebiasedFeature, bias_backdoor, prediction_shift
from robust_transfer.backdoors.source import source_backdoor_metrics, train_backdoor_source
from robust_transfer.data import adapt_images, check_task, load_task
from robust_transfer.data.tasks import check_shots, parse_shots
from robust_transfer.data.triggers import TRIGGERS
from robust_transfer.errors import UserError, check_choice
from robust_transfer.models.nets import ARCHS
from robust_transfer.train import SourceConfig, TrainConfig
from robust_transfer.transfer.engines import finetune
from robust_transfer.transfer.finetune import FinetuneConfig

MODES = {"fixed": 0, "full": None}  # fine-tuning mode -> unfrozen blocks (None: all)
TARGET_DATA = ("standard", "de-biased")
SOURCE_KINDS = ("biased", "clean")
SHOTS = "images_per_class"


def _distinct(name: str, values, allowed=None) -> tuple:
    values = tuple(values)
    if not values:
        raise UserError(f"give at least one {name}")
    if len(set(values)) != len(values):
        raise UserError(f"{name}s must not repeat, got {', '.join(map(str, values))}")
    for v in values if allowed is not None else ():
        check_choice(name, v, allowed)
    return values


@dataclass(frozen=True)
class BiasTransferConfig:
    """The study's settings, validated at construction (bad values are `UserError`s naming
    them). Defaults: the embedded digits, 0-4 -> 5-9,
    the blended pattern (`feature`) on source class 0, 5 seeds, 1 / 5 / 25 / all images per
    class, both modes and both target data sets.

    Example:
        cfg = BiasTransferConfig(seeds=(0, 1), images_per_class=(5, "all"))
        table = run_bias_transfer(cfg)
    """

    source_task: str = "digits-0to4"
    target_task: str = "digits-5to9"
    arch: str = "cnn-small"
    bias_classes: tuple[int, ...] = (0,)
    # Blended (a fixed random pattern at alpha 0.2), the analogue of the paper's fixed
    # Gaussian-pattern feature: on the digits the source's features react to it more than to
    # the 2x2 BadNets square (shift difference ~0.2 vs ~0.07 fixed-feature; see README).
    feature: str = "blended"
    patch_size: int | None = None  # badnets only (None: scaled to the image, 2 on 8x8)
    # The feature's trigger options (e.g. blended alpha, sig delta): a mapping, kept sorted.
    trigger_options: tuple[tuple[str, object], ...] = ()
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    images_per_class: tuple = (1, 5, 25, "all")
    modes: tuple[str, ...] = ("fixed", "full")
    target_data: tuple[str, ...] = TARGET_DATA
    debias_share: float = 0.5
    source_epochs: int = 20
    source_lr: float = 0.1
    epochs: int = 10
    lr: float = 0.1
    batch_size: int = 32

    def __post_init__(self) -> None:
        check_task(self.source_task)
        check_task(self.target_task)
        check_choice("arch", self.arch, ARCHS)
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
        DebiasedFeature(self.backdoor.trigger(source.input_shape), self.debias_share)
        self.source_config(seeds[0])  # epochs, lr, batch size via TrainConfig
        self.finetune_config(seeds[0], shots[0], self.modes[0])

    @property
    def backdoor(self):
        """The poisoning that plants the feature (`backdoors.bias.bias_backdoor`)."""
        return bias_backdoor(self.bias_classes, self.feature, self.patch_size,
                             dict(self.trigger_options))

    def source_config(self, seed: int, biased: bool = True) -> SourceConfig:
        return SourceConfig(task=self.source_task, arch=self.arch,
                            backdoor=self.backdoor if biased else None,
                            train=TrainConfig(epochs=self.source_epochs, lr=self.source_lr,
                                              seed=seed))

    def finetune_config(self, seed: int, shots, mode: str) -> FinetuneConfig:
        return FinetuneConfig(target_task=self.target_task, images_per_class=shots,
                              unfrozen_blocks=MODES[mode], epochs=self.epochs, lr=self.lr,
                              batch_size=self.batch_size, seed=seed)

    @property
    def runs(self) -> int:
        """Fine-tunes the study runs (rows of its table)."""
        return (len(self.seeds) * len(SOURCE_KINDS) * len(self.modes) * len(self.target_data)
                * len(self.images_per_class))

    def to_dict(self) -> dict:
        return asdict(self)


def run_bias_transfer(cfg: BiasTransferConfig, device: torch.device | str = "cpu",
                      on_step: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Run the study; one row per fine-tune (see the module docstring).

    `on_step(what)` is called after each trained source and each fine-tune
    (`2 * len(cfg.seeds) + cfg.runs` calls), e.g. to advance a progress bar.

    Columns: the config's settings (source_task, target_task, arch, feature, patch_size,
    trigger_options (JSON text), bias_classes (as text, e.g. "0,3"), debias_share, epochs,
    lr, source_epochs), seed, source (biased | clean),
    mode (fixed | full), unfrozen_blocks, images_per_class (int or "all"), target_data
    (standard | de-biased), train_images, shots (train images per class), target_accuracy
    (clean target test accuracy), prediction_shift, shift_class, shift_clean_share,
    shift_triggered_share, flip_rate (`backdoors.bias`), source_accuracy, source_asr (share
    of source test images not of the first bias class sent to it by the feature: how much
    the source itself relies on it).
    """
    step = on_step or (lambda _what: None)
    target = load_task(cfg.target_task)
    rows = []
    for seed in cfg.seeds:
        sources = {}
        for kind in SOURCE_KINDS:
            model, meta = train_backdoor_source(cfg.source_config(seed, kind == "biased"),
                                                device)
            scores = source_backdoor_metrics(model, meta, cfg.backdoor)
            sources[kind] = (model, scores)
            step(f"{kind} source, seed {seed}")
        spec = sources["biased"][0].spec
        test = adapt_images(target.test, spec.in_channels, spec.input_size,
                            f"target task {cfg.target_task!r} images")
        feature = cfg.backdoor.trigger(tuple(test.x.shape[1:]))
        for kind, (source, scores) in sources.items():
            for mode in cfg.modes:
                for data in cfg.target_data:
                    for shots in cfg.images_per_class:
                        model = copy.deepcopy(source)
                        transform = (DebiasedFeature(feature, cfg.debias_share, seed)
                                     if data == "de-biased" else None)
                        ft = cfg.finetune_config(seed, shots, mode)
                        history = finetune(model, ft, train_transform=transform)
                        shift = prediction_shift(model, test.x, test.y, feature)
                        n = history[-1]["train_images"]
                        rows.append({
                            "source_task": cfg.source_task, "target_task": cfg.target_task,
                            "arch": cfg.arch, "feature": cfg.feature,
                            "patch_size": cfg.patch_size,
                            "trigger_options": json.dumps(dict(cfg.trigger_options)),
                            "bias_classes": ",".join(map(str, cfg.bias_classes)),
                            "debias_share": cfg.debias_share, "epochs": cfg.epochs,
                            "lr": cfg.lr, "source_epochs": cfg.source_epochs, "seed": seed,
                            "source": kind, "mode": mode,
                            "unfrozen_blocks": "all" if MODES[mode] is None else MODES[mode],
                            SHOTS: shots, "target_data": data, "train_images": n,
                            "shots": n / target.num_classes,
                            "target_accuracy": shift["clean_accuracy"],
                            "prediction_shift": shift["prediction_shift"],
                            "shift_class": shift["shift_class"],
                            "shift_clean_share": shift["shift_clean_share"],
                            "shift_triggered_share": shift["shift_triggered_share"],
                            "flip_rate": shift["flip_rate"],
                            "source_accuracy": scores["clean_accuracy"],
                            "source_asr": scores["asr"]})
                        step(f"{kind} {mode} {data} {shots}, seed {seed}")
    table = pd.DataFrame(rows)
    table["unfrozen_blocks"] = table["unfrozen_blocks"].astype(str)
    return table


def save_bias_table(table: pd.DataFrame, path: str | Path) -> Path:
    """Write the study's table as Parquet atomically; `images_per_class` (int or "all") is
    stored as text, as in the grid's results store."""
    stored = table.assign(**{SHOTS: table[SHOTS].astype(str),
                             "patch_size": table["patch_size"].astype("Int64")})
    with atomic_path(path) as tmp:
        stored.to_parquet(tmp, index=False)
    return Path(path)


REQUIRED = ("seed", "source", "mode", SHOTS, "target_data", "shots", "prediction_shift",
            "shift_class", "target_accuracy")


def read_bias_table(path: str | Path) -> pd.DataFrame:
    """Read a table `save_bias_table` wrote; `images_per_class` comes back as int or "all".
    A missing or foreign file is a `UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no bias-transfer table at {str(path)!r}")
    try:
        table = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise UserError(f"cannot read {str(path)!r}: not a Parquet table ({type(e).__name__})"
                        ) from None
    missing = [c for c in REQUIRED if c not in table.columns]
    if missing:
        raise UserError(f"{str(path)!r} is not a bias-transfer table: missing column "
                        f"{missing[0]!r}")
    table[SHOTS] = table[SHOTS].map(parse_shots).astype(object)
    return table

