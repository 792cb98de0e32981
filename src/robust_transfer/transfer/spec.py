"""Experiment specs: the six variables of the paper's study, loaded from YAML and validated.

A spec names source models (eps, norm) trained on one source task, target tasks, images per
class, unfrozen blocks, epochs, seeds and learning rates. `expand` turns it into one `Run`
per combination; each run has a content id, so a re-run can tell what is already done.

Everything is validated when the spec is parsed, before anything trains: names, numbers,
unfrozen blocks against the architecture's blocks, images per class against every target's
smallest class, and source/target channels. An eps=0 source is the natural model whatever
its norm, so a spec lists it once: later eps=0 entries with another norm are dropped
(training the same natural model twice would make the report's pairing ambiguous).

A `sources` entry may plant a backdoor: `backdoor: {attack: badnets, rate: 0.1, target: 0}`
(data poisoning) or `{attack: neuba}` (NeuBA pre-training). The backdoor is part of the
source's treatment (a backdoored and a clean source of the same eps are two sources), and a
grid with any backdoor measures every run with the triggers of all of them (`Run.probes`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml

from robust_transfer.data.poison import BackdoorConfig
from robust_transfer.data.tasks import ALL, check_shots, load_task, parse_shots
from robust_transfer.errors import UserError
from robust_transfer.models.nets import ARCHS
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
class SourceEntry:
    """One entry of the spec's `sources` list: what makes this source differ from the others
    (the treatment: threat model, and any other per-source setting); the rest of its recipe
    is the spec's shared `source` block (`SourceRecipe`)."""

    eps: float = 0.0
    norm: str = "l2"
    # A planted backdoor (BadNets poisoning, NeuBA, ...): part of the treatment, so a
    # backdoored and a clean source of the same eps are different sources.
    backdoor: BackdoorConfig | None = None

    @property
    def natural(self) -> bool:
        return self.eps == 0

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.backdoor is None:  # clean sources are recorded as before backdoors existed
            del d["backdoor"]
        return d


@dataclass(frozen=True)
class GridSpec:
    sources: tuple[SourceEntry, ...]
    targets: tuple[str, ...]
    images_per_class: tuple[int | str, ...]  # each an int or "all" (`parse_shots`)
    unfrozen_blocks: tuple[int | None, ...]
    epochs: tuple[int, ...]
    seeds: tuple[int, ...]
    lr: tuple[float, ...] = (0.1,)
    batch_size: int = 32
    source: SourceRecipe = SourceRecipe()
    name: str = "grid"


@dataclass(frozen=True)
class Run:
    """One fine-tune of the grid: which source, and the fine-tuning config.

    `probes`: the backdoors whose triggers are evaluated after every epoch (C-Acc, ASR, RA;
    `transfer.backdoor_eval`). A grid with any backdoored source probes every run with the
    triggers of all its backdoors, so a clean source gives the baseline ASR of each trigger.
    """

    source: SourceConfig
    finetune: FinetuneConfig
    probes: tuple[BackdoorConfig, ...] = ()

    @property
    def source_id(self) -> str:
        s = self.source
        backdoor = getattr(s, "backdoor", None)
        attack = f"-{backdoor.attack}" if backdoor is not None else ""
        return f"{s.norm}-eps{s.eps:g}{attack}-{content_id(s.to_dict(), 8)}"

    @property
    def run_id(self) -> str:
        d = {"source": self.source.to_dict(), "finetune": self.finetune.to_dict()}
        if self.probes:  # runs without probes keep the ids they had before probes existed
            d["probes"] = [p.to_dict() for p in self.probes]
        return content_id(d)


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


def _no_repeats(values: list, key: str) -> list:
    """A value listed twice would be the same run twice (one id, counted twice)."""
    seen = []
    for v in values:
        if v in seen:
            shown = "all" if v is None else v
            raise UserError(f"spec key {key!r} lists {shown!r} twice; list each value once")
        seen.append(v)
    return values


def _one_natural(sources: list[SourceEntry]) -> list[SourceEntry]:
    """Keep the first natural source of each backdoor (None = clean): natural training does
    not depend on the norm."""
    first: dict = {}
    for s in sources:
        if s.natural:
            first.setdefault(s.backdoor, s)
    return [s for s in sources if not s.natural or first[s.backdoor] is s]


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


def _parse_source(s: dict) -> SourceEntry:
    """One `sources` entry (a mapping of SourceEntry's keys) into a `SourceEntry`."""
    _check_keys(s, {f.name for f in fields(SourceEntry)}, "sources entry")
    eps = _number(s.get("eps", 0.0), "sources.eps")
    if eps < 0:
        raise UserError(f"source eps must be >= 0, got {eps}")
    return SourceEntry(eps=eps, norm=str(s.get("norm", "l2")),
                       backdoor=_parse_backdoor(s.get("backdoor")))


def _parse_backdoor(d) -> BackdoorConfig | None:
    """A `sources` entry's `backdoor` mapping (e.g. {attack: badnets, rate: 0.1, target: 0})
    into a `BackdoorConfig`, whose own checks name a bad attack, rate or label mode."""
    if d is None:
        return None
    if not isinstance(d, dict):
        raise UserError(f"sources.backdoor must be a mapping such as {{attack: badnets, rate: "
                        f"0.1, target: 0}}, got {d!r}")
    return BackdoorConfig.from_dict(d)


def parse_spec(d: dict) -> GridSpec:
    """Validate a spec dict (as loaded from YAML) into a `GridSpec`; `UserError` if bad."""
    top = {f.name for f in fields(GridSpec)}
    _check_keys(d, top, "spec")
    missing = sorted({"sources", "targets", "images_per_class", "unfrozen_blocks", "epochs",
                      "seeds"} - set(d))
    if missing:
        raise UserError(f"spec is missing key {missing[0]!r}")
    sources = [_parse_source(s) for s in _as_list(d["sources"], "sources")]
    recipe = _parse_recipe(d.get("source", {}))

    def values(key, parse, default=None):
        raw = _as_list(d[key] if default is None else d.get(key, default), key)
        return tuple(_no_repeats([parse(v) for v in raw], key))

    spec = GridSpec(
        sources=tuple(_one_natural(_no_repeats(sources, "sources"))),
        targets=values("targets", str),
        images_per_class=values("images_per_class", parse_shots),
        unfrozen_blocks=values("unfrozen_blocks", parse_blocks),
        epochs=values("epochs", lambda e: _number(e, "epochs", int)),
        seeds=values("seeds", lambda s: _number(s, "seeds", int)),
        lr=values("lr", lambda v: _number(v, "lr"), default=0.1),
        batch_size=_number(d.get("batch_size", 32), "batch_size", int),
        source=recipe,
        name=str(d.get("name", "grid")),
    )
    expand(spec)  # validates every name and number through the configs' own checks
    check_against_data(spec)
    return spec


def check_against_data(spec: GridSpec) -> None:
    """What the names alone cannot tell, checked before any source trains: unfrozen blocks
    within the architecture, images per class within every target's smallest class, and
    targets with the source's number of channels. Loads the tasks (cached)."""
    arch = spec.source.arch
    n_blocks = len(ARCHS[arch][0])
    for k in spec.unfrozen_blocks:
        if k is not None and k > n_blocks:
            raise UserError(f"unfrozen blocks {k} is more than arch {arch!r} has ({n_blocks}); "
                            f"use 0..{n_blocks} or 'all'")
    source_task = load_task(spec.source.task)
    channels = source_task.input_shape[0]
    for entry in spec.sources:
        if entry.backdoor is not None:
            entry.backdoor.check(source_task.num_classes)
    for target in spec.targets:
        task = load_task(target)
        if task.input_shape[0] != channels:
            raise UserError(f"target task {target!r} has {task.input_shape[0]} channel(s) but "
                            f"source task {spec.source.task!r} has {channels}")
        for k in spec.images_per_class:
            if k != ALL:
                check_shots(task, k)


def load_spec(path: str | Path) -> GridSpec:
    """Read and validate a YAML spec file."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"spec file {str(path)!r} is a directory; give a YAML file")
    if not path.is_file():
        raise UserError(f"spec file {str(path)!r} does not exist")
    try:
        d = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"spec file {str(path)!r} is not a text (UTF-8 YAML) file") from None
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0]
        raise UserError(f"spec file {str(path)!r} is not valid YAML: {first}") from None
    except OSError as e:
        raise UserError(f"cannot read spec file {str(path)!r}: {e.strerror}") from None
    if d is not None and not isinstance(d, dict):
        raise UserError(f"spec file {str(path)!r} must hold a YAML mapping of spec keys, "
                        f"got {type(d).__name__}")
    return parse_spec(d or {})


def source_configs(spec: GridSpec) -> list[SourceConfig]:
    r = spec.source
    train = TrainConfig(epochs=r.epochs, lr=r.lr, batch_size=r.batch_size, seed=r.seed)
    return [
        SourceConfig(task=r.task, arch=r.arch, eps=e.eps, norm=e.norm,
                     attack_steps=r.attack_steps, train=train,
                     **({} if e.backdoor is None else {"backdoor": e.backdoor}))
        for e in spec.sources
    ]


def probes(spec: GridSpec) -> tuple[BackdoorConfig, ...]:
    """The distinct backdoors of the spec's sources, in spec order (`Run.probes`)."""
    return tuple(dict.fromkeys(e.backdoor for e in spec.sources if e.backdoor is not None))


def expand(spec: GridSpec) -> list[Run]:
    """Every combination of the spec's variables, as `Run`s (sources outermost)."""
    runs, probed = [], probes(spec)
    for source, target, k, blocks, epochs, lr, seed in itertools.product(
        source_configs(spec), spec.targets, spec.images_per_class, spec.unfrozen_blocks,
        spec.epochs, spec.lr, spec.seeds,
    ):
        cfg = FinetuneConfig(target, k, blocks, epochs, lr, spec.batch_size, seed)
        runs.append(Run(source, cfg, probed))
    return runs
