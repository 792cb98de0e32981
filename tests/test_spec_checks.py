"""Every key and value of a spec is checked when it is parsed, before any work (issue 21):
a bad number, text or flag anywhere is one `UserError` naming the key, and `grid` with it
writes nothing at all (no sources/, no runs.json, no --out)."""

from __future__ import annotations

import copy

import pytest
import yaml

from robust_transfer.errors import UserError
from robust_transfer.transfer.spec import parse_spec

BASE = {
    "source": {"task": "synthetic-0to4", "epochs": 1, "attack_steps": 1},
    "sources": [{"eps": 0.0}, {"eps": 0.5}],
    "targets": ["synthetic-5to9"],
    "images_per_class": [1],
    "unfrozen_blocks": [0],
    "epochs": 1,
    "seeds": [0],
}


def _with(path: str, value) -> dict:
    """BASE with `path` (dotted; `sources.1.norm` is the second entry's norm) set."""
    d = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node = d
    for key in parents:
        node = node[int(key)] if key.isdigit() else node.setdefault(key, {})
    node[int(last) if last.isdigit() else last] = value
    return d


BAD = [
    # fine-tuning numbers: integers >= 1, learning rate > 0, seeds >= 0, all finite
    ("epochs", -3, r"'epochs' must be >= 1, got -3"),
    ("epochs", 0, r"'epochs' must be >= 1"),
    ("epochs", 1.5, r"'epochs' must be an integer"),
    ("epochs", "three", r"'epochs' must be a number"),
    ("epochs", True, r"'epochs' must be a number"),
    ("lr", -1, r"'lr' must be > 0, got -1"),
    ("lr", 0, r"'lr' must be > 0"),
    ("lr", float("inf"), r"'lr' must be finite"),
    ("lr", float("nan"), r"'lr' must be finite"),
    ("batch_size", 0, r"'batch_size' must be >= 1, got 0"),
    ("batch_size", 2.5, r"'batch_size' must be an integer"),
    ("seeds", [0, -1], r"'seeds' must be >= 0, got -1"),
    ("seeds", ["a"], r"'seeds' must be a number"),
    ("images_per_class", [-2], r"images per class must be a positive integer"),
    ("images_per_class", ["many"], r"images per class must be a positive integer"),
    ("images_per_class", [100], r"images per class 100 is more than class \d"),
    ("unfrozen_blocks", [-1], r"unfrozen blocks must be an integer >= 0"),
    ("unfrozen_blocks", [9], r"unfrozen blocks 9 is more than arch"),
    ("augment", "yes", r"'augment' must be true or false"),
    # text
    ("name", [1], r"'name' must be text"),
    ("targets", [5], r"'targets' must be text"),
    ("targets", ["nope"], r"unknown task 'nope'"),
    # the source recipe
    ("source.epochs", 0, r"'source.epochs' must be >= 1"),
    ("source.lr", -1, r"'source.lr' must be > 0"),
    ("source.batch_size", 0, r"'source.batch_size' must be >= 1"),
    ("source.attack_steps", 0, r"'source.attack_steps' must be >= 1"),
    ("source.seed", -1, r"'source.seed' must be >= 0"),
    ("source.seed", 0.5, r"'source.seed' must be an integer"),
    ("source.task", 5, r"'source.task' must be text"),
    ("source.arch", "cnn-huge", r"unknown arch 'cnn-huge'"),
    ("source.depth", 3, r"unknown key 'depth' in spec.source"),
    ("source", 3, r"spec.source must be a mapping"),
    # a sources entry
    ("sources.1.eps", "big", r"'sources.eps' must be a number"),
    ("sources.1.eps", -0.5, r"source eps must be >= 0"),
    ("sources.1.norm", 2, r"'sources.norm' must be text"),
    ("sources.1.norm", "l7", r"unknown norm 'l7'"),
    ("sources.1.method", 3, r"'sources.method' must be text"),
    ("sources.1.arch", 5, r"'sources.arch' must be text"),
    ("sources.1.on_overfit", 1, r"'sources.on_overfit' must be text"),
    ("sources.1.free_replays", 0.5, r"'sources.free_replays' must be an integer"),
    ("sources.1.backdoor", 3, r"sources.backdoor must be a mapping"),
    ("sources.1.distill", {"temperature": 4}, r"sources.distill needs a teacher"),
    ("sources.1.colour", "red", r"unknown key 'colour' in sources entry"),
    ("sources", [5], r"sources entry must be a mapping"),
    # the spec itself
    ("shots", [1], r"unknown key 'shots' in spec"),
    ("targets", [], r"'targets' must not be empty"),
]


@pytest.mark.parametrize("path,value,message", BAD, ids=[f"{p}={v!r}" for p, v, _ in BAD])
def test_every_key_and_value_is_checked_at_parse(path, value, message):
    with pytest.raises(UserError, match=message):
        parse_spec(_with(path, value))


def test_the_base_spec_is_valid():
    """The cases above fail for their own key, not for the base."""
    assert len(parse_spec(BASE).sources) == 2


@pytest.mark.parametrize("key,value", [("epochs", -3), ("lr", -1), ("batch_size", 0)])
def test_grid_with_a_bad_fine_tune_value_writes_nothing(cli, tmp_path, monkeypatch, key, value):
    """These used to fail only after the sources had trained, leaving sources/ and runs.json."""
    from robust_transfer.transfer import grid as grid_mod

    monkeypatch.setattr(grid_mod, "train_backdoor_source", lambda *a, **k: pytest.fail("trained"))
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({**BASE, key: value}))
    code, stdout, err = cli("grid", spec, "--out", tmp_path / "g", "--workers", "1")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and f"'{key}' must be" in lines[0], err
    assert not (tmp_path / "g").exists() and stdout == ""
