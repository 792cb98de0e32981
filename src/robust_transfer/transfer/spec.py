"""Experiment specs: the six variables of the paper's study, loaded from YAML and validated.

A spec names source models (eps, norm) trained on one source task, target tasks, images per
class, unfrozen blocks, epochs, seeds and learning rates. `expand` turns it into one `Run`
per combination; each run has a content id, so a re-run can tell what is already done.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from robust_transfer.data.tasks import parse_shots
from robust_transfer.errors import UserError
from robust_transfer.train import SourceConfig, TrainConfig
from robust_transfer.transfer.finetune import FinetuneConfig, parse_blocks


def content_id(obj: dict, length: int = 12) -> str:
    """A short stable hash of a JSON-able dict."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


@dataclass(frozen=True)
class SourceRecipe:
    """How every source model of the grid is trained (all but eps and norm)."""

    task: str = "digits-0to4"
    arch: str = "cnn-small"
    epochs: int = 30
    lr: float = 0.1
    batch_size: int = 64
    attack_steps: int = 7
    seed: int = 0


@dataclass(frozen=True)
class GridSpec:
    sources: tuple[tuple[float, str], ...]
    targets: tuple[str, ...]
    images_per_class: tuple[int | None, ...]
    unfrozen_blocks: tuple[int | None, ...]
    epochs: tuple[int, ...]
    seeds: tuple[int, ...]
    lr: tuple[float, ...] = (0.1,)
    batch_size: int = 32
    source: SourceRecipe = SourceRecipe()
    name: str = "grid"


@dataclass(frozen=True)
class Run:
    """One fine-tune of the grid: which source, and the fine-tuning config."""

    source: SourceConfig
    finetune: FinetuneConfig

    @property
    def source_id(self) -> str:
        s = self.source
        return f"{s.norm}-eps{s.eps:g}-{content_id(s.to_dict(), 8)}"

    @property
    def run_id(self) -> str:
        return content_id({"source": self.source.to_dict(), "finetune": self.finetune.to_dict()})


def _as_list(value, key: str) -> list:
    if isinstance(value, list):
        if not value:
            raise UserError(f"spec key {key!r} must not be empty")
        return value
    return [value]


def _check_keys(d: dict, allowed: set[str], where: str) -> None:
    if not isinstance(d, dict):
        raise UserError(f"{where} must be a mapping, got {type(d).__name__}")
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise UserError(
            f"unknown key {unknown[0]!r} in {where}; allowed: {', '.join(sorted(allowed))}"
        )


def _number(value, key: str, kind=float):
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UserError(f"spec key {key!r} must be a number, got {value!r}")
    if kind is int and value != int(value):
        raise UserError(f"spec key {key!r} must be an integer, got {value!r}")
    return kind(value)


def _parse_recipe(d: dict) -> SourceRecipe:
    _check_keys(d, {f.name for f in fields(SourceRecipe)}, "spec.source")
    kinds = {"str": str, "int": int, "float": float}
    values = {}
    for f in fields(SourceRecipe):
        if f.name in d:
            kind = kinds[f.type]
            value = d[f.name]
            values[f.name] = str(value) if kind is str else _number(value, f"source.{f.name}", kind)
    return SourceRecipe(**values)


def parse_spec(d: dict) -> GridSpec:
    """Validate a spec dict (as loaded from YAML) into a `GridSpec`; `UserError` if bad."""
    top = {f.name for f in fields(GridSpec)}
    _check_keys(d, top, "spec")
    missing = sorted({"sources", "targets", "images_per_class", "unfrozen_blocks", "epochs",
                      "seeds"} - set(d))
    if missing:
        raise UserError(f"spec is missing key {missing[0]!r}")
    sources = []
    for s in _as_list(d["sources"], "sources"):
        _check_keys(s, {"eps", "norm"}, "sources entry")
        eps = _number(s.get("eps", 0.0), "sources.eps")
        if eps < 0:
            raise UserError(f"source eps must be >= 0, got {eps}")
        sources.append((eps, str(s.get("norm", "l2"))))
    recipe = _parse_recipe(d.get("source", {}))
    spec = GridSpec(
        sources=tuple(sources),
        targets=tuple(str(t) for t in _as_list(d["targets"], "targets")),
        images_per_class=tuple(parse_shots(k) for k in _as_list(d["images_per_class"],
                                                                 "images_per_class")),
        unfrozen_blocks=tuple(parse_blocks(k) for k in _as_list(d["unfrozen_blocks"],
                                                                "unfrozen_blocks")),
        epochs=tuple(_number(e, "epochs", int) for e in _as_list(d["epochs"], "epochs")),
        seeds=tuple(_number(s, "seeds", int) for s in _as_list(d["seeds"], "seeds")),
        lr=tuple(_number(v, "lr") for v in _as_list(d.get("lr", 0.1), "lr")),
        batch_size=_number(d.get("batch_size", 32), "batch_size", int),
        source=recipe,
        name=str(d.get("name", "grid")),
    )
    expand(spec)  # validates every name and number through the configs' own checks
    return spec


def load_spec(path: str | Path) -> GridSpec:
    """Read and validate a YAML spec file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"spec file {str(path)!r} does not exist")
    try:
        d = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0]
        raise UserError(f"spec file {str(path)!r} is not valid YAML: {first}") from None
    return parse_spec(d or {})


def source_configs(spec: GridSpec) -> list[SourceConfig]:
    r = spec.source
    train = TrainConfig(epochs=r.epochs, lr=r.lr, batch_size=r.batch_size, seed=r.seed)
    return [
        SourceConfig(task=r.task, arch=r.arch, eps=eps, norm=norm, attack_steps=r.attack_steps,
                     train=train)
        for eps, norm in spec.sources
    ]


def expand(spec: GridSpec) -> list[Run]:
    """Every combination of the spec's variables, as `Run`s (sources outermost)."""
    runs = []
    for source, target, k, blocks, epochs, lr, seed in itertools.product(
        source_configs(spec), spec.targets, spec.images_per_class, spec.unfrozen_blocks,
        spec.epochs, spec.lr, spec.seeds,
    ):
        cfg = FinetuneConfig(target, k, blocks, epochs, lr, spec.batch_size, seed)
        runs.append(Run(source, cfg))
    return runs
