"""Plugins: everything named by a string has one shape.

A plugin is a class with a `name` and a typed `Options` dataclass (its settings, with their
defaults and one-line help), registered in the one `Registry` of its kind. The registry is
the only place a name maps to code, so it also yields the rest: the names allowed in an
error message, a spec's keys (`Registry.options(name, mapping)` checks a YAML mapping against
the dataclass: unknown keys and wrong types are `UserError`s naming what is allowed) and the
CLI's `--<kind>-option KEY=VALUE` (`parse_assignments`, with `Registry.options_help()` for
`--help`). Adding a plugin is one file: the class, its options and the `register` decorator.
Top-level, like `errors`: every layer may import it.

Example:
    TRIGGERS = Registry("trigger")

    @TRIGGERS.register
    class Blended:
        name = "blended"

        @dataclass(frozen=True)
        class Options:
            alpha: float = option(0.2, "blend weight of the pattern, in (0, 1]")

    opts = TRIGGERS.options("blended", {"alpha": 0.3})
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import MISSING
from pathlib import Path
from typing import Any, Generic, TypeVar

import yaml

from robust_transfer.errors import UserError

T = TypeVar("T")


def option(default: Any = MISSING, help: str = "", **kwargs: Any) -> Any:  # noqa: A002
    """An `Options` field with its one-line help (shown by `Registry.options_help`)."""
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """The options of a plugin that has none."""


def _allows(hint: Any, value: Any) -> bool:
    """Whether `value` (parsed from YAML or `KEY=VALUE`) fits the type hint `hint`."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_allows(h, value) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is tuple or hint in (tuple, list):
        return isinstance(value, (list, tuple))
    if hint is Path:
        return isinstance(value, (str, Path))
    return isinstance(value, hint) if isinstance(hint, type) else True


def _coerce(hint: Any, value: Any) -> Any:
    """`value` in the field's own type: an int for a float field becomes a float, a list
    for a tuple field a tuple (so equal options compare and hash equal)."""
    if hint is float or (typing.get_origin(hint) in (typing.Union, types.UnionType)
                         and float in typing.get_args(hint) and isinstance(value, int)
                         and not isinstance(value, bool)):
        return float(value)
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, str) and (hint is Path or Path in typing.get_args(hint)):
        return Path(value)
    return value


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return " | ".join(map(str, typing.get_args(hint)))
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def build_options(cls: type[T], values: Mapping[str, Any], what: str,
                  noun: str = "option") -> T:
    """`cls(**values)` for an options dataclass, with an unknown key or a value of the wrong
    type a `UserError` naming `what` (e.g. "trigger 'blended'") and what it takes; `noun`:
    what a field is called there ("option"; a spec's "key")."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        allowed = ", ".join(fields) or "none"
        raise UserError(f"unknown {noun}(s) {', '.join(unknown)} for {what}; "
                        f"allowed: {allowed}")
    hints = typing.get_type_hints(cls)
    checked = {}
    for key, value in values.items():
        if not _allows(hints[key], value):
            raise UserError(f"{what} {noun} {key} must be {_describe(hints[key])}, "
                            f"got {value!r}")
        checked[key] = _coerce(hints[key], value)
    return cls(**checked)


def parse_assignments(items: Iterable[str], flag: str) -> dict[str, Any]:
    """`["alpha=0.3", "corner=top-left"]` (a repeated CLI option) -> {key: value}, each value
    read as YAML (numbers, booleans, null, lists); a malformed or repeated item is a
    `UserError` naming `flag`."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UserError(f"{flag} takes KEY=VALUE, got {item!r}")
        if key in out:
            raise UserError(f"{flag} {key} given twice")
        try:
            out[key] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            out[key] = text
    return out


class Registry(Generic[T]):
    """The plugins of one kind, by name. `register` is the class decorator; a plugin class
    has a `name` and may have an `Options` dataclass (none: `NoOptions`)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._plugins: dict[str, type[T]] = {}

    def register(self, cls: type[T]) -> type[T]:
        name = cls.name
        if name in self._plugins:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        if not hasattr(cls, "Options"):
            cls.Options = NoOptions
        self._plugins[name] = cls
        return cls

    def add(self, name: str, cls: type[T]) -> None:
        """Register `cls` under `name` (for classes shared by several names)."""
        self._plugins[name] = cls

    def names(self) -> tuple[str, ...]:
        return tuple(self._plugins)

    def __contains__(self, name: object) -> bool:
        return name in self._plugins

    def __iter__(self):
        return iter(self._plugins)

    def __len__(self) -> int:
        return len(self._plugins)

    def get(self, name: str) -> type[T]:
        """The plugin class called `name`, or a `UserError` listing the allowed names."""
        if name not in self._plugins:
            raise UserError(f"unknown {self.kind} {name!r}; allowed: "
                            f"{', '.join(self._plugins)}")
        return self._plugins[name]

    def options(self, name: str, values: Mapping[str, Any] | None = None) -> Any:
        """`name`'s typed options from a spec mapping or parsed CLI assignments."""
        return build_options(self.get(name).Options, dict(values or {}),
                             f"{self.kind} {name!r}")

    def options_help(self) -> str:
        """One line per plugin with options: `name: key (type, default) help; ...`."""
        lines = []
        for name, cls in self._plugins.items():
            fields = dataclasses.fields(cls.Options)
            if not fields:
                continue
            hints = typing.get_type_hints(cls.Options)
            parts = [f"{f.name}={_default_text(f)} ({_describe(hints[f.name])})"
                     + (f" {f.metadata['help']}" if f.metadata.get("help") else "")
                     for f in fields]
            lines.append(f"{name}: " + "; ".join(parts))
        return "\n".join(lines)

    def build(self, name: str, *args: Any, options: Mapping[str, Any] | None = None,
              **kwargs: Any) -> T:
        """An instance of `name`: `cls(*args, options=cls.Options(...), **kwargs)`."""
        return self.get(name)(*args, options=self.options(name, options), **kwargs)


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not MISSING:
        return repr(f.default)
    if f.default_factory is not MISSING:
        return repr(f.default_factory())
    return "required"


def options_dict(options: Any) -> dict[str, Any]:
    """A typed options object as a plain mapping (for a spec, a recipe or a results row),
    without the fields at their default: the record of an unchanged plugin stays empty."""
    out = {}
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else MISSING)
        if value != default:
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out

