"""`robust-transfer explain saliency|influence|units`: happy paths write PNGs; bad input is
one line on stderr and exit code 2."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from explain_fixtures import checkpoints
from robust_transfer.cli import main
from robust_transfer.models import load_checkpoint, save_checkpoint
from robust_transfer.studies import load_study
from robust_transfer.studies.influence import InfluenceStudy


def run(capsys, *args):
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return info.value.code or 0, out.out, out.err


def test_explain_help_lists_the_commands(capsys):
    code, out, _ = run(capsys, "explain", "--help")
    assert code == 0
    for command in ("saliency", "influence", "units"):
        assert command in out


def test_saliency_and_units_write_pngs(capsys, tmp_path):
    c = checkpoints()
    code, out, err = run(capsys, "explain", "saliency", c.natural, c.robust, "--per-class", "2",
                         "--samples", "4", "--out", tmp_path)
    assert code == 0, err
    assert (tmp_path / "saliency.png").stat().st_size > 0 and "ink mass" in out
    code, out, err = run(capsys, "explain", "units", c.robust, "--layer", "block2",
                         "--top-k", "5", "--rows", "2", "--out", tmp_path)
    assert code == 0, err
    assert (tmp_path / "units_block2.png").stat().st_size > 0 and "unit purity" in out


def test_influence_from_finetunes_and_from_a_source(capsys, tmp_path):
    c = checkpoints()
    # one fine-tune dir and one source checkpoint that the command fine-tunes first
    code, out, err = run(capsys, "explain", "influence", c.ft_natural, c.robust,
                         "--images-per-class", "10", "--epochs", "3", "--top-k", "20",
                         "--seeds", "2", "--out", tmp_path)
    assert code == 0, err
    for name in ("influence_examples.png", "influence_class_match.png", "class_match.parquet"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert len(list((tmp_path / "finetunes").iterdir())) == 2  # the source, seeds 0 and 1
    assert "natural" in out and "robust" in out and "k=10" in out
    table = pd.read_parquet(tmp_path / "class_match.parquet")
    assert table["k"].max() == 20
    robust = table[table["source_label"].str.startswith("robust")]
    natural = table[table["source_label"] == "natural"]
    assert (robust["over"] == "seeds").all() and (robust["n"] == 2).all()  # band over seeds
    assert (natural["over"] != "seeds").all() and (natural["n"] > 2).all()  # over images


def test_influence_spec_from_the_options_and_run_ids_follow_content(capsys, tmp_path):
    """--save-spec writes the study the options make (one run per fine-tune: the given one,
    and the source fine-tuned with 2 seeds, its artifacts); another checkpoint at the same
    path (other weights: another sha256) gets another run id."""
    c = checkpoints()
    spec = tmp_path / "influence.yaml"
    code, _, err = run(capsys, "explain", "influence", c.ft_natural, c.robust, "--seeds", "2",
                       "--epochs", "3", "--save-spec", spec)
    assert code == 0, err
    study = load_study(spec)
    assert (study.name, study.seeds, study.epochs) == ("influence", (0, 1), 3)
    assert study.checkpoints == (c.ft_natural.resolve(), c.robust.resolve())
    assert len(study.run_ids()) == 3
    (built,) = study.artifacts(tmp_path / "out", "cpu")
    assert [a.directory.parent for a in built] == [tmp_path / "out" / "finetunes"] * 2
    model, card = load_checkpoint(c.ft_natural)
    copy = save_checkpoint(model, tmp_path / "ft", card)
    before = InfluenceStudy((copy,)).run_ids()
    with torch.no_grad():
        model.head.bias.add_(1.0)
    save_checkpoint(model, copy, card)
    assert InfluenceStudy((copy,)).run_ids() != before


def test_influence_validate(capsys, tmp_path):
    code, out, err = run(capsys, "explain", "influence", "--validate", "--removed", "30",
                         "--out", tmp_path)
    assert code == 0, err
    assert (tmp_path / "influence_validation.png").stat().st_size > 0
    assert "Pearson" in out


@pytest.mark.parametrize("args,message", [
    (["saliency", "{tmp}/missing"], "no checkpoint"),
    (["saliency", "{nat}", "--method", "lrp"], "unknown saliency method 'lrp'"),
    (["saliency", "{nat}", "{ft}"], "explain models of one task together"),
    (["units", "{nat}", "--layer", "block7"], "unknown layer 'block7'"),
    (["units", "{nat}", "--split", "val"], "unknown split 'val'"),
    (["influence"], "or use --validate"),
    (["influence", "{ft}", "--validate"], "give no checkpoints"),
    (["influence", "{ft}", "--method", "newton"], "unknown influence method 'newton'"),
    (["influence", "{ft}", "--blocks", "3"], "not allowed"),
    (["influence", "{ft}", "--ranking", "best"], "unknown ranking 'best'"),
    (["influence", "{ft}", "--targets-per-class", "0"], "targets per class"),
    (["influence", "{ft}", "--seeds", "0"], "seeds must be >= 1"),
    (["influence", "--spec", "{tmp}/missing.yaml"], "missing.yaml"),
])
def test_bad_input_is_exit_code_2(capsys, tmp_path, args, message):
    c = checkpoints()
    subs = {"{tmp}": str(tmp_path), "{nat}": str(c.natural), "{ft}": str(c.ft_natural)}
    args = [subs.get(a, a.replace("{tmp}", str(tmp_path))) for a in args]
    code, _, err = run(capsys, "explain", *args, "--out", tmp_path / "out")
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.glob("out/*.png"))
