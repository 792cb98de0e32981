"""Experiment specs: the six variables of the paper's study, loaded from YAML and validated.

A spec names source models (eps, norm) trained on one source task, target tasks, images per
class, unfrozen blocks, epochs, seeds and learning rates. `expand` turns it into one `Run`
per combination; each run has a content id, so a re-run can tell what is already done.

Everything is validated when the spec is parsed, before anything trains: names, numbers,
unfrozen blocks against every source architecture's blocks, images per class against every
target's smallest class, and source/target channels. An eps=0 source is the natural model
whatever its norm, so a spec lists it once: later eps=0 entries with another norm are dropped
(training the same natural model twice would make the report's pairing ambiguous); sources
may differ in `arch`, and then there is one natural source per arch (and per backdoor).

A source may be a student distilled from another source of the spec (`distill:` key, see
`DistillEntry`); the grid trains its teacher first.

A `sources` entry may be trained for randomized smoothing: `{method: gaussian, sigma: 0.25}`
(Gaussian data augmentation, eps 0) or `{method: smoothadv, eps: 0.5, sigma: 0.25,
noise_samples: 2}` (SmoothAdv); like any method, a treatment paired with the natural source.
A fine-tune may add Gaussian noise (`noise_sigma: [0, 0.25]`, crossed like `lr`).

A `sources` entry may plant a backdoor: `backdoor: {attack: badnets, rate: 0.1, target: 0}`
(data poisoning) or `{attack: neuba}` (NeuBA pre-training). The backdoor is part of the
source's treatment (a backdoored and a clean source of the same eps are two sources), and a
grid with any backdoor measures every run with the triggers of all of them (`Run.probes`).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import yaml

from robust_transfer.data.poison import BackdoorConfig
from robust_transfer.data.tasks import ALL, check_shots, load_task, parse_shots
from robust_transfer.errors import UserError, check_choice
from robust_transfer.models.nets import ARCHS, num_blocks
from robust_transfer.train import DistillConfig, SourceConfig, TrainConfig
from robust_transfer.transfer.certify_eval import CertifySpec
from robust_transfer.transfer.finetune import FinetuneConfig, parse_blocks
from robust_transfer.variables import declared, kind, names
from robust_transfer.variables import default as declared_default
from robust_transfer.variables import spec as spec_of


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
class DistillEntry:
    """A `sources` entry's `distill:` key: this source is a student (same recipe and arch)
    distilled from `teacher`, another source of the spec, by Hinton KD at `temperature` and
    `alpha` (the weight of the KL term, `train.kd_loss`), or by ARD (`adversarial: true`,
    Goldblum et al. 2020) under the entry's eps/norm (default: the teacher's). E.g.

        {distill: {teacher: {eps: 0.5, norm: l2}, temperature: 4, alpha: 0.9, adversarial: true}}
    """

    teacher: SourceEntry
    temperature: float = 4.0
    alpha: float = 0.9
    adversarial: bool = False

    @property
    def method(self) -> str:
        return "ard" if self.adversarial else "kd"


@dataclass(frozen=True)
class SourceEntry:
    """One entry of the spec's `sources` list: what makes this source differ from the others
    (the treatment: threat model, and any other per-source setting); the rest of its recipe
    is the spec's shared `source` block (`SourceRecipe`)."""

    eps: float = 0.0
    norm: str = "l2"
    # Training method and its options (`SourceConfig`): None = the default (natural at eps
    # 0, else PGD-AT); an option that does not apply to the method is an error there.
    method: str | None = None
    # The method's options, `SourceConfig`'s fields declared `option=True` (trades_beta,
    # sigma, attack_mode, ...), as (name, value) pairs in their declared order; an unset one
    # is left out (None = the method's default there).
    options: tuple[tuple[str, object], ...] = ()
    # Architecture of this source (Kornblith et al. 2019, "Do Better ImageNet Models Transfer
    # Better?"); None: the spec's `source.arch`.
    arch: str | None = None
    distill: DistillEntry | None = None
    # A planted backdoor (BadNets poisoning, NeuBA, ...): part of the treatment, so a
    # backdoored and a clean source of the same eps are different sources.
    backdoor: BackdoorConfig | None = None

    @property
    def natural(self) -> bool:
        """Natural training: eps 0, no distillation, no other method (e.g. gaussian)."""
        return self.eps == 0 and self.distill is None and self.method in (None, "natural")

    def to_dict(self) -> dict:
        """As written in the recorded spec; unset (None) keys are left out, so a spec that
        does not use a key records the same text as before the key existed."""
        d = asdict(self)
        d = {**{k: d[k] for k in ("eps", "norm", "method")}, **dict(self.options),
             **{k: d[k] for k in ("arch", "distill", "backdoor")}}
        d = {k: v for k, v in d.items() if v is not None}
        if self.distill is not None:
            d["distill"]["teacher"] = self.distill.teacher.to_dict()
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
    # The fine-tune variables declared with a spec key (`FinetuneConfig`'s `grid=...`, e.g.
    # augment, noise_sigma): (name, values) pairs, one value unless crossed.
    options: tuple[tuple[str, tuple], ...] = ()
    # certify every fine-tuned model (randomized smoothing; `transfer.certify_eval`)
    certify: CertifySpec | None = None


@dataclass(frozen=True)
class Run:
    """One fine-tune of the grid: which source, and the fine-tuning config.

    `probes`: the backdoors whose triggers are evaluated after every epoch (C-Acc, ASR, RA;
    `transfer.backdoor_eval`). A grid with any backdoored source probes every run with the
    triggers of all its backdoors, so a clean source gives the baseline ASR of each trigger.
    `certify`: certify the final model (`transfer.certify_eval`; the spec's `certify:`).
    """

    source: SourceConfig
    finetune: FinetuneConfig
    probes: tuple[BackdoorConfig, ...] = ()
    certify: CertifySpec | None = None

    # Cached: a paper-scale grid has 14,400 runs of a few sources, and `asdict` is slow.
    @functools.cached_property
    def source_id(self) -> str:
        return source_id(self.source)

    @functools.cached_property
    def run_id(self) -> str:
        d = {"source": _source_dict(self.source), "finetune": self.finetune.to_dict()}
        if self.probes:  # runs without probes keep the ids they had before probes existed
            d["probes"] = [p.to_dict() for p in self.probes]
        if self.certify is not None:  # likewise for runs that certify nothing
            d["certify"] = self.certify.to_dict()
        return content_id(d)


@functools.lru_cache(maxsize=256)
def _cached_source_dict(source: SourceConfig) -> dict:
    return source.to_dict()  # callers only read it


def _source_dict(source: SourceConfig) -> dict:
    try:
        return _cached_source_dict(source)
    except TypeError:  # unhashable: a student's recipe holds its teacher's as a dict
        return source.to_dict()


def source_id(s: SourceConfig) -> str:
    """A source's directory name: readable treatment plus a hash of its whole recipe."""
    if s.distill is not None:
        prefix = f"{s.distill.method}-"
    else:
        prefix = "" if s.method in ("natural", "pgd") else f"{s.method}-"
    noise = "" if s.sigma is None else f"-sigma{s.sigma:g}"
    attack = "" if s.backdoor is None else f"-{s.backdoor.attack}"
    return f"{prefix}{s.norm}-eps{s.eps:g}{noise}{attack}-{content_id(_source_dict(s), 8)}"


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


def _one_natural(sources: list[SourceEntry], default_arch: str) -> list[SourceEntry]:
    """Keep the first natural source of each (arch, backdoor): natural training ignores the
    norm."""
    first = {}
    for s in sources:
        if s.natural:
            first.setdefault((s.arch or default_arch, s.backdoor), s)
    return [s for s in sources
            if not s.natural or first[(s.arch or default_arch, s.backdoor)] is s]


def _number(value, key: str, kind=float, minimum: float | None = None):
    """A finite number (an integer if `kind` is int), >= `minimum` if given (minimum 0 for a
    float means > 0: a learning rate of 0 trains nothing)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UserError(f"spec key {key!r} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise UserError(f"spec key {key!r} must be finite, got {value!r}")
    if kind is int and value != int(value):
        raise UserError(f"spec key {key!r} must be an integer, got {value!r}")
    if minimum is not None and (value < minimum or (kind is float and value <= minimum)):
        bound = f">= {minimum}" if kind is int else f"> {minimum:g}"
        raise UserError(f"spec key {key!r} must be {bound}, got {value!r}")
    return kind(value)


def _text(value, key: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"spec key {key!r} must be text, got {value!r}")
    return value


# The least value of each number in the spec (float 0: must be > 0), checked when parsed.
MINIMUM = {"epochs": 1, "batch_size": 1, "attack_steps": 1, "seed": 0, "seeds": 0, "lr": 0.0}


def grid_options() -> dict[str, tuple[bool, object]]:
    """{name: (crossed, default)} of the fine-tune variables a spec sets by their own key
    (declared `grid="crossed"`: a value or a list, crossed like `lr`; "one": one value)."""
    return {f.name: (spec_of(f)["grid"] == "crossed", declared_default(f))
            for f in declared(FinetuneConfig) if spec_of(f)["grid"]}


def _option(value, key: str):
    """A fine-tune variable's spec value, read as its declared type."""
    k = kind(FinetuneConfig, key)
    return (_flag(value, key) if k is bool else _text(value, key) if k is str
            else _number(value, key, k))


def _flag(value, key: str) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"spec key {key!r} must be true or false, got {value!r}")
    return value


def _parse_recipe(d: dict) -> SourceRecipe:
    _check_keys(d, {f.name for f in fields(SourceRecipe)}, "spec.source")
    kinds = {"str": str, "int": int, "float": float}
    values = {}
    for f in fields(SourceRecipe):
        if f.name in d:
            kind = kinds[f.type]
            value = d[f.name]
            key = f"source.{f.name}"
            values[f.name] = (_text(value, key) if kind is str
                              else _number(value, key, kind, MINIMUM.get(f.name)))
    return SourceRecipe(**values)


def _parse_source(s: dict, teacher: bool = False) -> SourceEntry:
    """One `sources` entry (a mapping of SourceEntry's keys) into a `SourceEntry`."""
    where = "sources.distill.teacher" if teacher else "sources entry"
    keys = {f.name for f in fields(SourceEntry)} - {"options"} \
        | set(names(SourceConfig, "treatment", option=True))
    _check_keys(s, keys - ({"distill"} if teacher else set()), where)
    eps = _number(s.get("eps", 0.0), "sources.eps")
    if eps < 0:
        raise UserError(f"source eps must be >= 0, got {eps}")
    method_options = {}
    for key in names(SourceConfig, "treatment", option=True):  # read as their declared type
        if s.get(key) is not None:
            method_options[key] = (
                _text(s[key], f"sources.{key}") if kind(SourceConfig, key) is str
                else _number(s[key], f"sources.{key}", kind(SourceConfig, key)))
    options = dict(method_options)
    # The default method is stored as None, so {eps: 0.5} and {eps: 0.5, method: pgd} are
    # one source (one run id), not two.
    method = s.get("method")
    if method is not None and _text(method, "sources.method") != ("natural" if eps == 0
                                                                  else "pgd"):
        options["method"] = method
    if s.get("arch") is not None:
        options["arch"] = _text(s["arch"], "sources.arch")
        check_choice("arch", options["arch"], ARCHS)
    if s.get("backdoor") is not None:
        options["backdoor"] = _parse_backdoor(s["backdoor"])
    norm = _text(s.get("norm", "l2"), "sources.norm")
    distill = None if s.get("distill") is None else _parse_distill(s["distill"])
    if distill is not None:
        if options:
            raise UserError(f"a distilled source takes no {sorted(options)[0]!r}: its "
                            "recipe is the spec's, its treatment the distillation")
        if not distill.adversarial and eps > 0:
            raise UserError("a distilled source's eps is ARD's threat model: give eps only "
                            "with adversarial: true")
        if distill.adversarial and "eps" not in s:
            eps = distill.teacher.eps
            if eps == 0:
                raise UserError("adversarial distillation from a natural teacher needs the "
                                "source's own eps > 0")
            norm = _text(s.get("norm", distill.teacher.norm), "sources.norm")
    return SourceEntry(eps=eps, norm=norm, distill=distill,
                       **{k: v for k, v in options.items() if k not in method_options},
                       options=tuple(method_options.items()))


def _parse_backdoor(d) -> BackdoorConfig:
    """A `sources` entry's `backdoor` mapping (e.g. {attack: badnets, rate: 0.1, target: 0})
    into a `BackdoorConfig`, whose own checks name a bad attack, rate or label mode."""
    if not isinstance(d, dict):
        raise UserError(f"sources.backdoor must be a mapping such as {{attack: badnets, rate: "
                        f"0.1, target: 0}}, got {d!r}")
    return BackdoorConfig.from_dict(d)


def _parse_distill(d: dict) -> DistillEntry:
    _check_keys(d, {f.name for f in fields(DistillEntry)}, "sources.distill")
    if "teacher" not in d:
        raise UserError("sources.distill needs a teacher (the eps/norm of another source)")
    adversarial = d.get("adversarial", False)
    if not isinstance(adversarial, bool):
        raise UserError(f"sources.distill.adversarial must be true or false, got "
                        f"{adversarial!r}")
    entry = DistillEntry(
        teacher=_parse_source(d["teacher"], teacher=True),
        temperature=_number(d.get("temperature", 4.0), "sources.distill.temperature"),
        alpha=_number(d.get("alpha", 0.9), "sources.distill.alpha"),
        adversarial=adversarial,
    )
    DistillConfig(entry.method, entry.temperature, entry.alpha)  # validates T and alpha
    return entry


def _check_teachers(sources: list[SourceEntry]) -> list[SourceEntry]:
    """Every distilled source's teacher must be one of the spec's (not distilled) sources;
    a natural teacher matches the spec's natural source whatever its recorded norm."""
    plain = [s for s in sources if s.distill is None]
    out = []
    for s in sources:
        if s.distill is not None:
            t = s.distill.teacher
            match = [p for p in plain if p == t or (p.natural and t.natural)]
            if not match:
                shown = "natural (eps 0)" if t.natural else f"eps {t.eps:g}, norm {t.norm}"
                raise UserError(f"the teacher of a distilled source ({shown}) is not one of "
                                "the spec's sources; list it under sources")
            s = replace(s, distill=replace(s.distill, teacher=match[0]))
        out.append(s)
    return out


def parse_spec(d: dict) -> GridSpec:
    """Validate a spec dict (as loaded from YAML) into a `GridSpec`; `UserError` if bad."""
    top = {f.name for f in fields(GridSpec)} - {"options"} | set(grid_options())
    _check_keys(d, top, "spec")
    missing = sorted({"sources", "targets", "images_per_class", "unfrozen_blocks", "epochs",
                      "seeds"} - set(d))
    if missing:
        raise UserError(f"spec is missing key {missing[0]!r}")
    sources = _check_teachers([_parse_source(s) for s in _as_list(d["sources"], "sources")])
    recipe = _parse_recipe(d.get("source", {}))

    def values(key, parse, default=None):
        raw = _as_list(d[key] if default is None else d.get(key, default), key)
        return tuple(_no_repeats([parse(v) for v in raw], key))

    spec = GridSpec(
        sources=tuple(_one_natural(_no_repeats(sources, "sources"), recipe.arch)),
        targets=values("targets", lambda t: _text(t, "targets")),
        images_per_class=values("images_per_class", parse_shots),
        unfrozen_blocks=values("unfrozen_blocks", parse_blocks),
        epochs=values("epochs", lambda e: _number(e, "epochs", int, MINIMUM["epochs"])),
        seeds=values("seeds", lambda s: _number(s, "seeds", int, MINIMUM["seeds"])),
        lr=values("lr", lambda v: _number(v, "lr", float, MINIMUM["lr"]), default=0.1),
        batch_size=_number(d.get("batch_size", 32), "batch_size", int, MINIMUM["batch_size"]),
        source=recipe,
        name=_text(d.get("name", "grid"), "name"),
        options=tuple((name, values(name, lambda v, n=name: _option(v, n), default)
                             if crossed else (_option(d.get(name, default), name),))
                      for name, (crossed, default) in grid_options().items()),
        certify=None if d.get("certify") is None else CertifySpec.from_dict(d["certify"]),
    )
    expand(spec)  # validates every name and number through the configs' own checks
    check_against_data(spec)
    return spec


def check_against_data(spec: GridSpec) -> None:
    """What the names alone cannot tell, checked before any source trains: unfrozen blocks
    within the architecture, images per class within every target's smallest class, and
    targets with the source's number of channels (or grey: fine-tuning repeats it to RGB).
    Loads the tasks (cached). Unfrozen blocks are checked against every source's arch."""
    for arch in dict.fromkeys(e.arch or spec.source.arch for e in spec.sources):
        n_blocks = num_blocks(arch)
        for k in spec.unfrozen_blocks:
            if k is not None and k > n_blocks:
                raise UserError(f"unfrozen blocks {k} is more than arch {arch!r} has "
                                f"({n_blocks}); use 0..{n_blocks} or 'all'")
    source_task = load_task(spec.source.task)
    channels = source_task.input_shape[0]
    for entry in spec.sources:
        if entry.backdoor is not None:
            entry.backdoor.check(source_task.num_classes)
    for target in spec.targets:
        task = load_task(target)
        if task.input_shape[0] not in (channels, 1):  # grey targets are repeated to RGB
            raise UserError(f"target task {target!r} has {task.input_shape[0]} channel(s) but "
                            f"source task {spec.source.task!r} has {channels}")
        for k in spec.images_per_class:
            if k != ALL:
                check_shots(task, k)


def load_spec(path: str | Path) -> GridSpec:
    """Read and validate a YAML spec file."""
    return parse_spec(read_spec_file(path))


def read_spec_file(path: str | Path) -> dict:
    """A YAML spec file's mapping (empty: {}), or a `UserError` saying why it is none."""
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
    return d or {}


def source_config(spec: GridSpec, e: SourceEntry) -> SourceConfig:
    """The full recipe of source entry `e` (a student's includes its teacher's recipe)."""
    r = spec.source
    train = TrainConfig(epochs=r.epochs, lr=r.lr, batch_size=r.batch_size, seed=r.seed)
    distill = None
    if e.distill is not None:
        teacher = source_config(spec, e.distill.teacher).to_dict()
        distill = DistillConfig(e.distill.method, e.distill.temperature, e.distill.alpha,
                                teacher)
    return SourceConfig(task=r.task, arch=e.arch or r.arch, eps=e.eps, norm=e.norm,
                        attack_steps=r.attack_steps, train=train, method=e.method,
                        distill=distill, backdoor=e.backdoor, **dict(e.options))


def source_configs(spec: GridSpec) -> list[SourceConfig]:
    return [source_config(spec, e) for e in spec.sources]


def probes(spec: GridSpec) -> tuple[BackdoorConfig, ...]:
    """The distinct backdoors of the spec's sources, in spec order (`Run.probes`)."""
    return tuple(dict.fromkeys(e.backdoor for e in spec.sources if e.backdoor is not None))


def expand(spec: GridSpec) -> list[Run]:
    """Every combination of the spec's variables, as `Run`s (sources outermost)."""
    runs, probed = [], probes(spec)
    option_names = [name for name, _ in spec.options]
    for source, target, k, blocks, epochs, lr, *options, seed in itertools.product(
        source_configs(spec), spec.targets, spec.images_per_class, spec.unfrozen_blocks,
        spec.epochs, spec.lr, *(values for _, values in spec.options), spec.seeds,
    ):
        cfg = FinetuneConfig(target, k, blocks, epochs, lr, spec.batch_size, seed,
                             **dict(zip(option_names, options, strict=True)))
        runs.append(Run(source, cfg, probed, spec.certify))
    return runs
