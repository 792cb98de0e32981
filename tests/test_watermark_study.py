"""The watermark removal study's spec (`studies.watermark`): inputs hashed into the run ids,
checked before any work, the CLI's options and its --spec / --save-spec, `report DIR`.
Runs on the tiny watermarked synthetic checkpoint the resume harness uses; the study's rows
and figure are tested in test_watermark.py, its resume and Ray runs in test_studies_resume.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from robust_transfer.backdoors.watermark import make_key, save_key
from robust_transfer.errors import UserError
from robust_transfer.models import load_checkpoint, save_checkpoint
from robust_transfer.studies import load_study, study_from_dict
from robust_transfer.studies.watermark import WatermarkRemoval, study_table

DATA = Path(__file__).parent / "data" / "studies" / "watermark-removal"
WM, KEY = DATA / "wm", DATA / "key"


def study(checkpoint: Path = WM, key: Path = KEY, **kw) -> WatermarkRemoval:
    return WatermarkRemoval(checkpoint, key, target_task="synthetic-5to9", **kw)


def test_runs_and_ids_follow_the_inputs_content_not_their_paths(tmp_path):
    s = study(attacks=("RTAL", "FTLL", "RTAL"), unfrozen_blocks=(0, "all", "ALL"),
              seeds=(0, 1))
    runs = s.runs()
    # 2 baselines + (2 attacks + 2 block counts x 2 models) x 2 seeds
    assert len(runs) == len(set(s.run_ids())) == 2 + (2 + 4) * 2
    assert [r.model for r in runs[:6]] == ["watermarked", "independent", "RTAL", "FTLL",
                                           "transfer k=0", "transfer k=0 (independent)"]
    assert s.unfrozen_blocks == (0, "all")
    # the same files elsewhere: the same runs; other weights or another key: none shared
    shutil.copytree(WM, tmp_path / "copy")
    assert study(tmp_path / "copy", seeds=(0, 1)).run_ids() == study(seeds=(0, 1)).run_ids()
    model, card = load_checkpoint(WM)
    with torch.no_grad():
        model.head.bias.add_(1e-3)
    save_checkpoint(model, tmp_path / "other", card)
    save_key(make_key(5, (1, 8, 8), n=20, seed=1), tmp_path / "key2")
    ids = set(study().run_ids())
    assert not ids & set(study(tmp_path / "other").run_ids())
    assert not ids & set(study(key=tmp_path / "key2").run_ids())
    # a setting changes the runs it enters, only those
    fewer = set(study(permutations=50).run_ids())
    assert len(ids - fewer) == 2 * 3 * 3 and len(ids & fewer) == 2 + 4 * 3


@pytest.mark.parametrize("change, message", [
    ({"attacks": ["FTXX"]}, "removal attack"),
    ({"unfrozen_blocks": [-1]}, "unfrozen blocks"),
    ({"images_per_class": 0}, "images per class"),
    ({"seeds": []}, "seeds"),
    ({"alpha": 1.5}, "alpha"),
    ({"clean_fraction": 0.0}, "clean fraction"),
    ({"target_task": "digits-0to9x"}, "digits-0to9x"),
    ({"transfer_epochs": "3"}, "transfer_epochs must be int"),
    ({"checkpont": "x"}, "unknown key"),
    ({"checkpoint": "nowhere"}, "nowhere"),
    ({"key": "/no/such/key"}, "no watermark key"),
])
def test_a_bad_spec_is_one_user_error(change, message):
    data = {"study": "watermark-removal", "checkpoint": str(WM), "key": str(KEY), **change}
    with pytest.raises(UserError, match=message):
        study_from_dict(data)


def test_a_key_inside_the_checkpoint_or_for_other_images_is_refused(tmp_path):
    shutil.copytree(WM, tmp_path / "wm")
    shutil.copytree(KEY, tmp_path / "wm" / "key")
    with pytest.raises(UserError, match="must not be inside"):
        study(tmp_path / "wm", tmp_path / "wm" / "key")
    save_key(make_key(10, (1, 8, 8), n=20), tmp_path / "key10")
    with pytest.raises(UserError, match="10 classes"):
        study(key=tmp_path / "key10")


def test_cli_save_spec_builds_the_options_study_and_refuses_bad_input(cli, tmp_path):
    path = tmp_path / "wm.yaml"
    code, _, err = cli("watermark", "remove", WM, "--key", KEY, "--attack", "FTLL",
                       "--transfer-task", "none", "--seeds", "2", "--epochs", "4",
                       "--save-spec", path)
    assert code == 0, err
    saved = load_study(path)
    assert saved == WatermarkRemoval(WM, KEY, attacks=("FTLL",), removal_epochs=4,
                                     target_task=None, seeds=(0, 1))
    assert yaml.safe_load(path.read_text())["checkpoint"] == str(WM.absolute())
    out = tmp_path / "out"
    for args, message in [
        ((WM, "--spec", path, "--out", out), "not both"),
        (("--key", KEY, "--out", out), "missing CHECKPOINT"),
        ((WM, "--out", out), "missing --key"),
        ((WM, "--key", KEY, "--seeds", "0", "--out", out), "--seeds"),
        ((WM, "--key", KEY, "--transfer-blocks", "x", "--out", out), "unfrozen blocks"),
        (("--spec", DATA.parent / "grid.yaml", "--out", out), "grid spec"),
        ((WM, "--key", KEY), "missing --out"),
    ]:
        code, _, err = cli("watermark", "remove", *args)
        assert code == 2 and err.startswith("error:") and message in err, (args, err)
        assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_study_table_orders_and_references_from_the_rows_alone():
    """Reference accuracy: the watermarked baseline for removals, the independent model's
    transfer with the same blocks and seed for transfers (computed here by hand)."""
    rows = [("transfer k=all (independent)", "independent", "transfer", 0, "all", 0.7),
            ("transfer k=all", "watermarked", "transfer", 0, "all", 0.6),
            ("transfer k=0", "watermarked", "transfer", 0, "0", 0.5),
            ("RTAL", "watermarked", "removal", 0, "all", 0.8),
            ("FTLL", "watermarked", "removal", 1, "0", 0.95),
            ("FTLL", "watermarked", "removal", 0, "0", 0.9),
            ("independent", "independent", "baseline", -1, "all", 1.0),
            ("watermarked", "watermarked", "baseline", -1, "all", 0.97)]
    t = study_table(pd.DataFrame(rows, columns=["model", "source", "stage", "seed",
                                                "unfrozen_blocks", "test_accuracy"]))
    assert list(zip(t.model, t.seed, strict=True)) == [
        ("watermarked", -1), ("independent", -1), ("FTLL", 0), ("RTAL", 0),
        ("transfer k=0", 0), ("transfer k=all", 0), ("transfer k=all (independent)", 0),
        ("FTLL", 1)]
    ref = dict(zip(zip(t.model, t.seed, strict=True), t.reference_accuracy, strict=True))
    assert ref[("FTLL", 1)] == ref[("RTAL", 0)] == 0.97
    assert ref[("transfer k=all", 0)] == 0.7 and pd.isna(ref[("transfer k=0", 0)])
    assert t.accuracy_change.iloc[5] == pytest.approx(0.6 - 0.7)
    assert t.reference_accuracy.iloc[:2].isna().all()
