"""The source card (`models.card`): the typed form of a checkpoint's `meta.json`.

The sidecars in tests/data/cards/ were written by the code before the card (commit 85d10d7:
`train`, `finetune`, `backdoor attack`, `backdoor-defend`, `watermark embed`, `import`,
`distill` on synthetic data); they must keep loading, round-trip unchanged, and the card's
writers must write what that code wrote for the same inputs."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from robust_transfer import __version__
from robust_transfer.errors import UserError
from robust_transfer.models import (
    ModelSpec,
    SourceCard,
    build_model,
    card_from_meta,
    load_checkpoint,
    read_card,
    save_checkpoint,
)
from robust_transfer.models.card import META, WEIGHTS
from robust_transfer.models.checkpoint import file_sha256
from robust_transfer.train import SourceConfig, TrainConfig, train_source
from robust_transfer.transfer import FinetuneConfig
from robust_transfer.transfer.run import finetune_from_checkpoint

CARDS = Path(__file__).parent / "data" / "cards"
WRITERS = ("source", "finetune", "backdoor", "defended", "watermark", "imported", "distill")
# Writers whose key order is the card's declaration order: their files are byte-identical.
SAME_ORDER = ("source", "backdoor", "watermark", "distill")


def _fixture(name: str) -> tuple[str, dict]:
    text = (CARDS / f"{name}.json").read_text()
    return text, json.loads(text)


def _json(value):
    """`value` as JSON gives it back (tuples become lists)."""
    return json.loads(json.dumps(value))


def _untimed(value):
    """`value` without wall-clock times (the only thing two identical runs differ in)."""
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if not k.endswith("_seconds")}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


@pytest.mark.parametrize("name", WRITERS)
def test_todays_sidecars_load_and_round_trip_unchanged(name):
    text, meta = _fixture(name)
    card = card_from_meta(meta)
    assert isinstance(card.model, ModelSpec) and card.model.num_classes == 5
    assert card.extra == {}  # every key today's writers use is a field
    assert _json(card.to_meta()) == meta
    if name in SAME_ORDER:
        assert json.dumps(card.to_meta(), indent=2) == text
    assert card.role == meta["role"] and card.task == meta["task"]
    assert card.sha256 == meta["sha256"] and card.package_version == meta["package_version"]


def test_fields_are_typed_attributes():
    source = card_from_meta(_fixture("source")[1])
    assert (source.eps, source.norm, source.method, source.seed) == (0.5, "l2", "pgd", 0)
    assert source.is_source and source.train_recipe["epochs"] == 1
    finetune = card_from_meta(_fixture("finetune")[1])
    assert not finetune.is_source and finetune.finetune["images_per_class"] == 2
    assert finetune.source["source_eps"] == 0.5 and len(finetune.history) == 1
    backdoor = card_from_meta(_fixture("backdoor")[1])
    assert backdoor.backdoor["poisoned_count"] == len(backdoor.backdoor["poisoned_indices"])
    defended = card_from_meta(_fixture("defended")[1])
    assert (defended.role, defended.defense) == ("defended", "ft")
    assert defended.backdoor == backdoor.backdoor and defended.recipe == backdoor.recipe
    assert card_from_meta(_fixture("watermark")[1]).watermark["trigger_size"] == 5
    distill = card_from_meta(_fixture("distill")[1])
    assert distill.distill["method"] == "kd" and distill.eval["attack"] == "pgd-20"
    assert [r["model"] for r in distill.comparison][0] == "teacher"
    imported = card_from_meta(_fixture("imported")[1])
    assert imported.imported_from["format"] == "state-dict" and imported.metrics is None


def test_a_checkpoint_written_by_todays_code_loads(tmp_path):
    """The imported fixture's weights are `build_model(spec, seed=0)`: rebuilt here, its
    sidecar copied verbatim (but for the weights' hash, should the init ever change)."""
    text, meta = _fixture("imported")
    model = build_model(ModelSpec.from_dict(meta["model"]), seed=0)
    directory = tmp_path / "old"
    directory.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, directory / WEIGHTS)
    (directory / META).write_text(text.replace(meta["sha256"],
                                               file_sha256(directory / WEIGHTS)))
    loaded, card = load_checkpoint(directory)
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    assert (card.role, card.task, card.eps, card.norm) == ("source", "", 0.5, "l2")
    assert card.model == ModelSpec("cnn-small", 5, 1, (0.5,), (0.5,))


def test_new_writers_write_what_the_old_code_wrote(tmp_path):
    """`train` and `finetune` through the card, on the fixtures' inputs: the same sidecar
    as the code before it wrote (timings aside; CPU training is deterministic at one
    thread, so even the weights' hash agrees); the source's file byte for byte."""
    old_source, old_finetune = _fixture("source")[1], _fixture("finetune")[1]
    cfg = SourceConfig(task="synthetic-0to4", eps=0.5, norm="l2", attack_steps=1,
                       train=TrainConfig(epochs=1))
    assert cfg.to_dict() == old_source["recipe"]
    model, card = train_source(cfg)
    source = save_checkpoint(model, tmp_path / "source", card)
    written = (source / META).read_text()
    assert _untimed(json.loads(written)) == _untimed(old_source)
    # the old writer, independently: {"model", **meta, "package_version", "sha256"}
    old_writer = {"model": model.spec.to_dict(), "role": "source", "recipe": cfg.to_dict(),
                  "eps": cfg.eps, "norm": cfg.norm, "method": cfg.method,
                  "seed": cfg.train.seed, "task": cfg.task, "metrics": card.metrics,
                  "torch_threads": torch.get_num_threads(), "amp": False,
                  "package_version": __version__, "sha256": file_sha256(source / WEIGHTS)}
    assert written == json.dumps(old_writer, indent=2, default=str)

    ft_cfg = FinetuneConfig(**old_finetune["finetune"])
    finetune_from_checkpoint(source, ft_cfg, tmp_path / "ft")
    new_finetune = json.loads((tmp_path / "ft" / META).read_text())
    new_finetune["source"]["path"] = old_finetune["source"]["path"]  # where each was run
    assert _untimed(new_finetune) == _untimed(old_finetune)


@pytest.mark.parametrize("path,value,needles", [
    ("model.num_classes", -1, ("model.num_classes", "-1")),
    ("model.std", [0.0], ("model.std",)),
    ("model", "cnn", ("model", "'cnn'")),
    ("eps", "abc", ("eps", "'abc'")),
    ("eps", -0.5, ("eps", "-0.5")),
    ("norm", "zzz", ("norm", "'zzz'", "linf")),
    ("recipe.sigma", 0, ("recipe.sigma", "0")),
    ("seed", "0", ("seed", "integer", "'0'")),
    ("seed", True, ("seed", "True")),
    ("task", 3, ("task", "string", "3")),
    ("role", ["source"], ("role", "string")),
    ("metrics", [0.9], ("metrics", "JSON object")),
    ("amp", "yes", ("amp", "boolean", "'yes'")),
    ("history", {}, ("history", "JSON list")),
])
def test_validation_errors_name_the_field(tmp_path, path, value, needles):
    meta = _fixture("source")[1]
    *parents, last = path.split(".")
    node = meta
    for key in parents:
        node = node[key]
    node[last] = value
    with pytest.raises(ValueError) as info:
        card_from_meta(meta)
    for needle in needles:
        assert needle in str(info.value), str(info.value)
    # from a checkpoint directory: one UserError naming the file and the field
    directory = tmp_path / "ck"
    directory.mkdir()
    (directory / WEIGHTS).write_bytes(b"")
    (directory / META).write_text(json.dumps(meta))
    with pytest.raises(UserError, match="corrupt checkpoint metadata") as info:
        read_card(directory)
    assert str(directory / META) in str(info.value) and needles[0] in str(info.value)


def test_a_sidecar_without_a_model_or_not_an_object_is_refused(tmp_path):
    directory = tmp_path / "ck"
    directory.mkdir()
    (directory / WEIGHTS).write_bytes(b"")
    for meta in ({"role": "source"}, [1, 2]):
        (directory / META).write_text(json.dumps(meta))
        with pytest.raises(UserError, match="corrupt checkpoint metadata"):
            read_card(directory)


def test_unknown_keys_are_kept_through_load_and_save(tmp_path):
    meta = {**_fixture("source")[1], "provenance": {"lab": "x", "run": 7}, "note": None}
    card = card_from_meta(meta)
    assert card.extra == {"provenance": {"lab": "x", "run": 7}, "note": None}
    assert _json(card.to_meta()) == meta
    model = build_model(card.model, seed=0)
    save_checkpoint(model, tmp_path / "ck", card)
    _, loaded = load_checkpoint(tmp_path / "ck")
    assert loaded.extra == card.extra
    assert replace(loaded, sha256=None) == replace(card, sha256=None)


def test_unset_fields_are_absent_from_the_file(tmp_path):
    save_checkpoint(build_model(ModelSpec(), seed=0), tmp_path / "ck", SourceCard(seed=3))
    assert list(json.loads((tmp_path / "ck" / META).read_text())) == [
        "model", "seed", "package_version", "sha256"]
    assert read_card(tmp_path / "ck").eps is None


def test_save_checkpoint_takes_a_card_not_a_dict(tmp_path):
    with pytest.raises(TypeError, match="card_from_meta"):
        save_checkpoint(build_model(ModelSpec()), tmp_path / "ck", {"seed": 0})



def test_a_card_is_read_by_attribute_only():
    """One way to read a card: its fields (the transitional dict-style access is gone)."""
    card = SourceCard(task="synthetic-0to4", eps=0.5, extra={"note": "x"})
    assert (card.task, card.eps, card.extra["note"]) == ("synthetic-0to4", 0.5, "x")
    for read in (lambda: card["eps"], lambda: "eps" in card):
        with pytest.raises(TypeError):
            read()
    assert not hasattr(card, "get")
    import robust_transfer.models.checkpoint as checkpoint
    assert not hasattr(checkpoint, "read_meta")
