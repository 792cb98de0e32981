"""Each experiment variable is declared once (`robust_transfer.variables`); what used to be
hand-written lists is derived from the declarations, and every content id stays the same.

The pinned ids (`data/content_ids_main.json`) were computed with the code before the
declarations existed (hand-written allowlists and `to_dict` rules): the demo, backdoor and
certify specs, and a spec that uses every source option and fine-tune variable."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

import robust_transfer
from robust_transfer.errors import UserError
from robust_transfer.models import SourceCard, build_model
from robust_transfer.models.base import ModelSpec
from robust_transfer.report.study import FINETUNE_FACETS
from robust_transfer.train import SourceConfig
from robust_transfer.train.source import build_source_model
from robust_transfer.transfer import batched, stacked
from robust_transfer.transfer.finetune import FinetuneConfig
from robust_transfer.transfer.grid import spec_text
from robust_transfer.transfer.run import THREAT_FIELDS, source_columns, source_recipe
from robust_transfer.transfer.spec import SourceEntry, content_id, expand, parse_spec
from robust_transfer.variables import first_non_default, names, omit_defaults, variable

PINNED = json.loads((Path(__file__).parent / "data" / "content_ids_main.json").read_text())
SPECS = Path(robust_transfer.__file__).parent / "specs"


def _spec(name: str) -> dict:
    every = PINNED["every_spec"]
    if name == "every":
        return every
    if name == "every_no_augment":
        return {**every, "augment": False}
    return yaml.safe_load((SPECS / f"{name}.yaml").read_text())


@pytest.mark.parametrize("name", ["demo", "backdoor", "certify", "every", "every_no_augment"])
def test_content_ids_are_the_ones_before_the_declarations(name):
    pinned = PINNED["ids"][name]
    runs = expand(parse_spec(_spec(name)))
    assert len(runs) == pinned["runs"]
    digest = hashlib.sha256("\n".join(r.run_id for r in runs).encode()).hexdigest()
    assert digest == pinned["run_ids_sha256"]
    first = {}  # each source's first run (a student's recipe is unhashable)
    for r in runs:
        first.setdefault(r.source_id, r.source)
    assert list(first) == pinned["source_ids"]
    assert [content_id(source_recipe(SourceCard(recipe=s.to_dict())), 8)
            for s in first.values()] == pinned["source_recipe"]
    finetunes = sorted({json.dumps(r.finetune.to_dict(), sort_keys=True, default=str)
                        for r in runs})
    assert finetunes == pinned["finetune_dicts"]


def test_recorded_spec_text_is_unchanged():
    every = PINNED["every_spec"]
    specs = {name: _spec(name) for name in ("demo", "backdoor", "certify", "every")}
    specs["every_noaug"] = {**every, "augment": False, "certify": {"sigma": 0.25}}
    specs["aug_cert"] = {**every, "augment": True, "certify": {"sigma": 0.25},
                         "noise_sigma": 0.25}
    for name, d in specs.items():
        text = spec_text(parse_spec(d))
        assert hashlib.sha256(text.encode()).hexdigest() == PINNED["spec_text_sha256"][name], name


def test_threat_fields_are_the_treatment_and_pair_sources_of_one_recipe():
    assert set(THREAT_FIELDS) == {
        "eps", "norm", "method", "trades_beta", "free_replays", "on_overfit", "distill",
        "backdoor", "sigma", "noise_samples", "attack_mode", "trades_attack"}
    natural = SourceConfig()
    trades = SourceConfig(eps=0.5, method="trades", trades_beta=3.0)
    assert source_recipe(SourceCard(recipe=natural.to_dict())) == \
        source_recipe(SourceCard(recipe=trades.to_dict()))
    other = SourceConfig(attack_steps=3)
    assert source_recipe(SourceCard(recipe=other.to_dict())) != \
        source_recipe(SourceCard(recipe=natural.to_dict()))


def test_every_source_option_is_a_sources_entry_key_parsed_as_its_type():
    options = names(SourceConfig, "treatment", option=True)
    assert set(options) == {"trades_beta", "free_replays", "on_overfit", "attack_mode",
                            "trades_attack", "sigma", "noise_samples"}
    entry = SourceEntry(0.5, "l2", "trades", options=(("trades_beta", 3.0), ("sigma", 0.5),
                                                        ("attack_mode", "train")))
    # recorded in the order the keys had as SourceEntry fields before the declarations
    assert list(entry.to_dict()) == ["eps", "norm", "method", "trades_beta", "sigma",
                                     "attack_mode"]
    base = {"targets": ["digits-5to9"], "images_per_class": [1], "unfrozen_blocks": [0],
            "epochs": 1, "seeds": [0]}
    spec = parse_spec({**base, "sources": [{"method": "smoothadv", "eps": 0.5, "sigma": 0.5,
                                            "noise_samples": 3}]})
    source = expand(spec)[0].source
    assert (source.sigma, source.noise_samples) == (0.5, 3)
    with pytest.raises(UserError, match="unknown key 'options' in sources entry"):
        parse_spec({**base, "sources": [{"eps": 0.5, "options": []}]})
    with pytest.raises(UserError, match="sources.noise_samples' must be an integer"):
        parse_spec({**base, "sources": [{"method": "smoothadv", "eps": 0.5,
                                         "noise_samples": 1.5}]})
    with pytest.raises(UserError, match="sources.trades_attack' must be text"):
        parse_spec({**base, "sources": [{"method": "trades", "eps": 0.5, "trades_attack": 1}]})


def test_method_options_default_only_for_their_methods():
    assert SourceConfig(eps=0.5, method="trades").trades_beta == 6.0
    assert SourceConfig(eps=0.5, method="trades").trades_attack == "reference"
    assert SourceConfig(method="gaussian").sigma == 0.25
    assert SourceConfig(eps=0.5).sigma is None
    with pytest.raises(UserError, match="noise_samples applies to method 'smoothadv' only"):
        SourceConfig(eps=0.5, noise_samples=2)


def test_columns_and_facets_come_from_the_declarations():
    assert FINETUNE_FACETS == ["target_task", "lr", "epochs", "batch_size", "augment",
                               "noise_sigma"]
    card = SourceCard(model=ModelSpec(), recipe=SourceConfig(method="gaussian").to_dict())
    assert source_columns(card)["source_sigma"] == 0.25
    assert source_columns(SourceCard(model=ModelSpec()))["source_sigma"] == 0.0


def test_shape_keys_name_what_the_engines_implement_but_the_seed():
    cfg = FinetuneConfig(images_per_class=2, unfrozen_blocks=None, epochs=3, lr=0.05,
                         batch_size=16, seed=4, augment=True, noise_sigma=0.25)
    assert stacked.shape_key(cfg) == ("digits-5to9", 2, None, 3, 0.05, 16, True)
    assert batched.shape_key(cfg) == ("digits-5to9", 2, None, 3, 0.05, 16)


def _card(cfg: SourceConfig) -> SourceCard:
    return SourceCard(role="source", recipe=cfg.to_dict(), eps=cfg.eps, norm=cfg.norm,
                      method=cfg.method, seed=0, task=cfg.task, metrics={})


@pytest.mark.parametrize("cfg", [
    SourceConfig(eps=0.5, method="trades", trades_attack="uniform"),
    SourceConfig(eps=0.5, method="pgd", attack_mode="train"),
    SourceConfig(method="gaussian", sigma=0.5),
    SourceConfig(eps=0.5, method="smoothadv", noise_samples=2),
    SourceConfig(eps=0.5, method="free", free_replays=4),
])
def test_both_engines_cover_every_training_treatment(cfg):
    """How a source was trained does not change how it is fine-tuned. (Before the
    declarations, `stacked`'s hand-written allowlist missed the options added by issues
    18-21, which silently sent these sources to the slow path.)"""
    model = build_source_model(cfg)
    run = FinetuneConfig(images_per_class=1, epochs=1)
    assert batched.applies(model, run, _card(cfg))
    assert stacked.why_not(model, run, _card(cfg)) is None


def test_engines_refuse_what_they_do_not_implement():
    backdoored = SourceConfig(backdoor={"attack": "badnets", "rate": 0.1, "target": 0})
    model = build_source_model(backdoored)
    run = FinetuneConfig(images_per_class=1, epochs=1)
    assert not batched.applies(model, run, _card(backdoored))
    assert "'backdoor'" in stacked.why_not(model, run, _card(backdoored))
    plain = build_model(ModelSpec("cnn-small", 5, 1, (0.5,), (0.5,), input_size=8))
    noisy = FinetuneConfig(images_per_class=1, epochs=1, noise_sigma=0.25)
    augmented = FinetuneConfig(images_per_class=1, epochs=1, augment=True)
    assert not batched.applies(plain, noisy) and not batched.applies(plain, augmented)
    assert "'noise_sigma'" in stacked.why_not(plain, noisy)
    assert stacked.why_not(plain, augmented) is None


@dataclass(frozen=True)
class _Toy:
    a: int = variable(1, role="finetune")
    b: float = variable(0.0, role="finetune", id_at_default=False)
    c: str | None = variable(None, role="finetune", omit=lambda cfg: cfg.c == "x")


def test_omit_defaults_and_first_non_default():
    assert omit_defaults(_Toy(), {"a": 1, "b": 0.0, "c": None}) == {"a": 1, "c": None}
    assert omit_defaults(_Toy(b=2.0, c="x"), {"a": 1, "b": 2.0, "c": "x"}) == {"a": 1, "b": 2.0}
    assert first_non_default({"a": 2, "b": 0.0}, _Toy, {"a"}) is None
    assert first_non_default({"a": 2, "b": 1.0}, _Toy, {"a"}) == "b"
    assert first_non_default({"z": 0}, _Toy, set()) == "z"
    with pytest.raises(ValueError, match="unknown variable role"):
        variable(0, role="other")
