"""Bad checkpoints and keys: a corrupt metadata field, a watermark key for other images, a
source without its task. Each is one `error:` line naming the problem, exit 2, nothing written."""

from __future__ import annotations

import json
import shutil

import pytest

from robust_transfer.attacks import NORMS
from robust_transfer.backdoors.watermark import make_key, save_key
from robust_transfer.models import ModelSpec, SourceCard, build_model, save_checkpoint
from robust_transfer.models.checkpoint import META, THREAT_NORMS


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """An untrained 8x8 synthetic-0to4 source checkpoint (what matters here is its sidecar)."""
    model = build_model(ModelSpec("cnn-small", 5, 1, (0.5,), (0.5,), input_size=8))
    card = SourceCard(role="source", task="synthetic-0to4", eps=0.5, norm="l2", seed=0)
    return save_checkpoint(model, tmp_path_factory.mktemp("good") / "ck", card)


def _mutated(good, tmp_path, path: str, value):
    """A copy of `good` whose meta.json has `path` (dotted) set to `value` (None: removed)."""
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    meta = json.loads((bad / META).read_text())
    *parents, last = path.split(".")
    node = meta
    for key in parents:
        node = node[key]
    if value is None:
        del node[last]
    else:
        node[last] = value
    (bad / META).write_text(json.dumps(meta))
    return bad


def _one_error(code, err, *needles):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_recorded_norms_are_the_attacks_norms():
    assert set(THREAT_NORMS) == set(NORMS)


@pytest.mark.parametrize("path,value,needles", [
    ("model.num_classes", -1, ("model.num_classes", "-1")),
    ("model.in_channels", 0, ("model.in_channels",)),
    ("model.std", [0.0], ("model.std",)),
    ("eps", "abc", ("eps", "'abc'")),
    ("eps", -0.5, ("eps",)),
    ("norm", "zzz", ("norm", "'zzz'", "linf")),
])
def test_evaluate_refuses_corrupt_metadata_naming_the_field(good, tmp_path, cli, monkeypatch,
                                                           path, value, needles):
    monkeypatch.chdir(tmp_path)
    bad = _mutated(good, tmp_path, path, value)
    code, _out, err = cli("evaluate", bad, "--out", tmp_path / "res")
    _one_error(code, err, "meta.json", *needles)
    assert not (tmp_path / "res").exists() and not (tmp_path / "attack-results").exists()


def test_watermark_verify_refuses_a_key_for_other_images(good, tmp_path, cli):
    key_dir = save_key(make_key(10, (3, 32, 32), n=20, seed=0), tmp_path / "key",
                       {"task": "cifar10"})
    before = sorted(p.name for p in key_dir.iterdir())
    for test in ("auto", "permutation", "binomial"):
        code, _out, err = cli("watermark", "verify", good, "--key", key_dir, "--test", test)
        _one_error(code, err, "(3, 32, 32)", "(1, 8, 8)")
    assert sorted(p.name for p in key_dir.iterdir()) == before


def test_finetune_refuses_a_source_without_its_task(good, tmp_path, cli):
    bad = _mutated(good, tmp_path, "task", None)
    code, _out, err = cli("finetune", bad, "--task", "synthetic-5to9", "--epochs", "1",
                          "--out", tmp_path / "ft")
    _one_error(code, err, "'task'")
    assert not (tmp_path / "ft").exists()


@pytest.mark.parametrize("value", ["x", -0.25, 0])
def test_finetune_refuses_a_bad_recorded_smoothing_sigma(good, tmp_path, cli, value):
    """recipe.sigma is every fine-tuned row's source_sigma: 'x' was a ValueError traceback
    after the fine-tune had run."""
    bad = _mutated(good, tmp_path, "recipe", {"method": "gaussian", "sigma": value})
    code, _out, err = cli("finetune", bad, "--task", "synthetic-5to9", "--epochs", "1",
                          "--out", tmp_path / "ft")
    _one_error(code, err, "meta.json", "recipe.sigma", repr(value))
    assert not (tmp_path / "ft").exists()
