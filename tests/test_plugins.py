"""The one plugin shape (`robust_transfer.plugins`): a registry maps names to classes, checks
options against each class's typed `Options` and derives help text from them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from robust_transfer.errors import UserError
from robust_transfer.plugins import Registry, option, options_dict, parse_assignments

THINGS: Registry = Registry("thing")


@THINGS.register
class Plain:
    name = "plain"

    def __init__(self, options) -> None:
        self.options = options


@THINGS.register
class Tuned:
    name = "tuned"

    @dataclass(frozen=True)
    class Options:
        alpha: float = option(0.2, "blend weight")
        size: int | None = option(None, "side in pixels")
        corner: Literal["left", "right"] = option("right", "where")

    def __init__(self, width: int, options: Options) -> None:
        self.width, self.options = width, options


def test_names_and_unknown_name():
    assert THINGS.names() == ("plain", "tuned")
    with pytest.raises(UserError, match=r"unknown thing 'nope'; allowed: plain, tuned"):
        THINGS.get("nope")


def test_options_are_typed_and_checked():
    opts = THINGS.options("tuned", {"alpha": 1, "corner": "left"})
    assert opts.alpha == 1.0 and isinstance(opts.alpha, float) and opts.corner == "left"
    assert opts.size is None
    with pytest.raises(UserError, match=r"unknown option\(s\) beta for thing 'tuned'; "
                                        r"allowed: alpha, size, corner"):
        THINGS.options("tuned", {"beta": 1})
    with pytest.raises(UserError, match="option size must be"):
        THINGS.options("tuned", {"size": 1.5})
    with pytest.raises(UserError, match="option corner must be left | right"):
        THINGS.options("tuned", {"corner": "up"})
    with pytest.raises(UserError, match="option alpha must be float"):
        THINGS.options("tuned", {"alpha": True})
    with pytest.raises(UserError, match="allowed: none"):
        THINGS.options("plain", {"alpha": 0.1})


def test_build_and_options_dict_keep_only_changed_fields():
    thing = THINGS.build("tuned", 8, options={"alpha": 0.5})
    assert thing.width == 8 and thing.options.alpha == 0.5
    assert options_dict(thing.options) == {"alpha": 0.5}
    assert options_dict(THINGS.options("tuned")) == {}


def test_parse_assignments_reads_yaml_values():
    assert parse_assignments(["alpha=0.3", "corner=top-left", "size=null", "cross-ratio=2"],
                             "--x") == {"alpha": 0.3, "corner": "top-left", "size": None,
                                        "cross_ratio": 2}
    with pytest.raises(UserError, match="--x takes KEY=VALUE"):
        parse_assignments(["alpha"], "--x")
    with pytest.raises(UserError, match="given twice"):
        parse_assignments(["a=1", "a=2"], "--x")


def test_options_help_lists_each_plugin_with_options():
    text = THINGS.options_help()
    assert text.startswith("tuned: alpha=0.2 (float) blend weight; size=None")
    assert "plain" not in text
    with pytest.raises(ValueError, match="registered twice"):
        THINGS.register(Plain)
