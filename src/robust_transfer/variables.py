"""Experiment variables, each declared once: as dataclass field metadata on the config that
owns it (`train.SourceConfig` for how a source is trained, `transfer.FinetuneConfig` for how
it is fine-tuned). Everything else is derived from the declarations by the queries below:
the spec parser's source options, the comparison-group (pairing) fields, what the batched
engines cover, result columns, report facets, and which fields enter a content id at their
default. Adding a variable is one `variable(...)` line plus the code that uses it
(docs/ADDING_A_VARIABLE.md). Top-level, like `errors`: every layer may import it.

Roles: "treatment" (what a comparison varies between sources of one recipe: threat model,
training method and its options, distillation, a planted backdoor), "recipe" (how every
source of a grid is trained: task, arch, attack steps, ...), "finetune" (the fine-tuning
protocol, crossed by the grid).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import MISSING, Field
from typing import Any

ROLES = ("treatment", "recipe", "finetune")
ENGINES = ("batched", "stacked")  # transfer.batched (ConvNet) and transfer.stacked (any)


def variable(default: Any = MISSING, *, role: str, default_factory: Any = MISSING,
             engines: tuple[str, ...] = ENGINES, column: str | None = None,
             label: str | None = None, id_at_default: bool = True,
             omit: Callable[[Any], bool] | None = None, methods: tuple[str, ...] = (),
             method_default: Any = None, facet: int = 0, option: bool = False,
             grid: str | None = None) -> Field:
    """A dataclass field declared as an experiment variable.

    `engines`: the batched engines that implement it away from its default (a source field:
    both or none: how a source was trained does not change how it is fine-tuned, but a
    planted backdoor is measured per epoch). `column`: its results column (default: its
    name). `label`: its text in figures and summaries. `id_at_default=False`: left out of
    `to_dict` (so of content ids) while at its default, so ids from before it existed stay
    the same; `omit(config)`: another such rule, for a default that depends on other fields.
    `methods`/`method_default`: a training method's option, only for those methods, and
    resolved to `method_default` when unset. `option`: a `sources` entry key of its own
    type (a treatment option the spec parser reads as is). `facet` > 0: a fine-tune variable
    whose every value gets its own figures and summary section (never pooled); the number
    orders the facets (headings, file names). `grid`: a
    fine-tune variable a grid spec sets by its own key (its name): "one" value, or
    "crossed" (a value or a list, crossed with the other variables like `lr`).
    """
    if role not in ROLES:
        raise ValueError(f"unknown variable role {role!r}; allowed: {', '.join(ROLES)}")
    meta = {"role": role, "engines": engines, "column": column, "label": label,
            "id_at_default": id_at_default, "omit": omit, "methods": methods,
            "method_default": method_default, "facet": facet, "option": option,
            "grid": grid}
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={"variable": meta})


def declared(cls) -> list[Field]:
    """`cls`'s fields declared with `variable`, in field order."""
    return [f for f in dataclasses.fields(cls) if "variable" in f.metadata]


def spec(f: Field) -> dict:
    """A declared field's declaration (role, engines, column, ...)."""
    return f.metadata["variable"]


def names(cls, role: str | None = None, **where: Any) -> tuple[str, ...]:
    """Names of `cls`'s variables of `role` (all roles if None) whose declaration matches
    every `where` item (e.g. `facet=True`)."""
    return tuple(f.name for f in declared(cls)
                 if (role is None or spec(f)["role"] == role)
                 and all(spec(f)[k] == v for k, v in where.items()))


def treatment_fields(cls) -> tuple[str, ...]:
    """The source treatment: sources sharing the rest of their recipe are one comparison."""
    return names(cls, "treatment")


def finetune_fields(cls) -> tuple[str, ...]:
    return names(cls, "finetune")


def engine_fields(cls, engine: str) -> set[str]:
    """Variables that `engine` implements at any value (the rest only at their default)."""
    return {f.name for f in declared(cls) if engine in spec(f)["engines"]}


def default(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else MISSING


def first_non_default(values: dict, cls, covered: set[str]) -> str | None:
    """The first key of `values` (sorted) outside `covered` that is not a field of `cls` at
    its default, or None: a batched engine covers a run only while that is None."""
    defaults = {f.name: default(f) for f in dataclasses.fields(cls)}
    for key in sorted(set(values) - covered):
        if key not in defaults or values[key] != defaults[key]:
            return key
    return None


def omit_defaults(cfg, d: dict) -> dict:
    """`d` (`asdict(cfg)`) less the variables declared `id_at_default=False` that are at
    their default, and those whose `omit(cfg)` holds: the content id of a config that does
    not use a variable stays what it was before the variable existed."""
    for f in declared(type(cfg)):
        s = spec(f)
        if f.name in d and ((not s["id_at_default"] and d[f.name] == default(f))
                            or (s["omit"] is not None and s["omit"](cfg))):
            del d[f.name]
    return d


def columns(cls) -> dict[str, str]:
    """{field: results column} of `cls`'s variables that have a column of their own."""
    return {f.name: spec(f)["column"] or f.name for f in declared(cls)
            if spec(f)["role"] == "finetune" or spec(f)["column"]}


def labels(cls) -> dict[str, str]:
    """{results column: label} of `cls`'s labelled variables."""
    return {spec(f)["column"] or f.name: spec(f)["label"] for f in declared(cls)
            if spec(f)["label"]}


def facets(cls) -> list[str]:
    """Results columns of `cls`'s facet variables, in their declared `facet` order."""
    chosen = sorted((spec(f)["facet"], f.name) for f in declared(cls) if spec(f)["facet"])
    return [spec(cls.__dataclass_fields__[n])["column"] or n for _, n in chosen]


def method_options(cls) -> dict[str, tuple[tuple[str, ...], Any]]:
    """{field: (methods it applies to, its default there)} of the training methods' options."""
    return {f.name: (spec(f)["methods"], spec(f)["method_default"]) for f in declared(cls)
            if spec(f)["methods"]}


ZERO = {str: "", int: 0, float: 0.0, bool: False}  # a column's value when a field is unset


def kind(cls, name: str) -> type:
    """The scalar type (str, int, float, bool) a field's annotation names first."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    text = f.type if isinstance(f.type, str) else f.type.__name__
    return {"str": str, "int": int, "float": float, "bool": bool}[text.split("|")[0].strip()]
