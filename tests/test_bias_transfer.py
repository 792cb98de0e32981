"""Bias transfer (Salman et al. 2022): the prediction-shift metric, the de-biasing transform,
the fine-tuning seam, the study (a biased source shifts target predictions, a clean one much
less), its CLI and its figure."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from torch import nn

from robust_transfer.backdoors.bias import (
    DebiasedFeature,
    bias_backdoor,
    prediction_shift,
    shift_from_predictions,
)
from robust_transfer.data import ImageSet, load_task
from robust_transfer.data.poison import BackdoorConfig, poison
from robust_transfer.data.triggers import make_trigger
from robust_transfer.errors import UserError
from robust_transfer.models import ModelSpec, build_model, load_checkpoint
from robust_transfer.report.bias_figures import bias_shift_figure, bias_summary
from robust_transfer.stats import t_interval
from robust_transfer.studies import load_study, study_from_dict
from robust_transfer.studies.bias import BiasStudy, read_bias_table
from robust_transfer.transfer import batched
from robust_transfer.transfer.engines import finetune
from robust_transfer.transfer.finetune import FinetuneConfig
from robust_transfer.transfer.runner import run_study

TINY = dict(source_task="synthetic-0to4", target_task="synthetic-5to9", seeds=(0,),
            images_per_class=(2, "all"), source_epochs=1, epochs=1)
TINY_SPEC = {k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()}


def run_bias_transfer(study: BiasStudy, out) -> pd.DataFrame:
    """The study's table, run into `out` by the one runner, in the order of its runs."""
    run_study(study, out)
    order = {run_id: i for i, run_id in enumerate(study.run_ids())}
    table = read_bias_table(out)
    return table.sort_values("run_id", key=lambda ids: ids.map(order)).reset_index(drop=True)


def test_shift_matches_a_hand_computation():
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    clean = torch.tensor([0, 1, 1, 1, 2, 0])
    triggered = torch.tensor([2, 2, 2, 1, 2, 2])
    m = shift_from_predictions(clean, triggered, y, 3)
    # Class 2, over images 0-3 (not of class 2): clean 0/4 predicted 2, triggered 3/4.
    # Class 0, over images 2-5: 1/4 -> 0/4; class 1, over images 0, 1, 4, 5: 1/4 -> 0/4.
    assert m["shifts"] == pytest.approx([-0.25, -0.25, 0.75])
    assert (m["prediction_shift"], m["shift_class"]) == (pytest.approx(0.75), 2)
    assert m["shift_clean_share"] == 0.0 and m["shift_triggered_share"] == pytest.approx(0.75)
    assert m["flip_rate"] == pytest.approx(0.75)  # nothing was predicted 2 before
    assert m["clean_accuracy"] == pytest.approx(4 / 6)


def test_flip_rate_counts_only_the_moves_to_the_shift_class():
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    clean = torch.tensor([0, 2, 0, 1, 2, 1, 2, 2])
    triggered = torch.tensor([2, 0, 2, 2, 1, 2, 2, 0])
    m = shift_from_predictions(clean, triggered, y, 3)
    # Class 2 over images 0-5 (not of class 2): clean 2/6 predicted 2, triggered 4/6, so the
    # shift is 2/6; four images move to 2 (0, 2, 3, 5) and two move away (1, 4): flips 4/6.
    assert m["shift_class"] == 2 and m["prediction_shift"] == pytest.approx(2 / 6)
    assert m["flip_rate"] == pytest.approx(4 / 6)
    flips = ((y != 2) & (clean != 2) & (triggered == 2)).sum() / (y != 2).sum()
    assert m["flip_rate"] == pytest.approx(float(flips))


class _Constant(nn.Module):
    def __init__(self):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor([0.0, 2.0, 1.0]))

    def forward(self, x):
        return self.logits.expand(len(x), -1)


class _MaskOut(nn.Module):
    """Zeros the pixels a trigger writes: the wrapped model never sees the feature."""

    def __init__(self, mask):
        super().__init__()
        self.register_buffer("keep", ~mask)

    def forward(self, x):
        return x * self.keep


def test_shift_is_zero_for_models_that_ignore_the_feature():
    x, y = torch.rand(40, 1, 8, 8), torch.arange(40) % 3
    square = make_trigger("badnets", (1, 8, 8))
    assert prediction_shift(_Constant(), x, y, square)["prediction_shift"] == 0.0
    net = build_model(ModelSpec("cnn-small", 3, 1, (0.5,), (0.5,), input_size=8), seed=0)
    blind = nn.Sequential(_MaskOut(square.mask), net).train()
    m = prediction_shift(blind, x, y, square)
    assert m["prediction_shift"] == 0.0 and m["shifts"] == [0.0] * 3
    assert blind.training  # eval mode only inside the measurement


def test_debiased_feature_puts_the_same_share_on_every_class():
    y = torch.tensor([0] * 5 + [1] * 4 + [2] * 1)
    data = ImageSet(torch.zeros(10, 1, 8, 8), y)
    square = make_trigger("badnets", (1, 8, 8))
    debias = DebiasedFeature(square, share=0.5, seed=3)
    out = debias(data)
    marked = out.x[:, 0, 7, 7] == 1.0
    assert torch.equal(marked, debias.chosen(y)) and torch.equal(out.y, y)
    # round half up: 2.5 -> 3 of class 0, 2 of class 1, 0.5 -> 1 of class 2
    assert torch.bincount(y[marked], minlength=3).tolist() == [3, 2, 1]
    assert torch.equal(DebiasedFeature(square, 0.5, seed=3).chosen(y), debias.chosen(y))
    assert not torch.equal(DebiasedFeature(square, 0.5, seed=4).chosen(y), debias.chosen(y))
    assert data.x.sum() == 0  # the input set is not modified
    with pytest.raises(UserError, match="share"):
        DebiasedFeature(square, share=0.0)


def test_finetune_applies_train_transform_on_the_per_run_path(source_dir):
    source, _ = load_checkpoint(source_dir)
    cfg = FinetuneConfig(target_task="synthetic-5to9", images_per_class=3, epochs=2, seed=1)
    assert batched.applies(source, cfg)  # without a transform the batched engine would run
    seen = []

    def blank(data: ImageSet) -> ImageSet:
        seen.append(len(data))
        return ImageSet(torch.zeros_like(data.x), data.y)

    plain = finetune(copy.deepcopy(source), cfg)
    blanked = finetune(copy.deepcopy(source), cfg, train_transform=blank)
    assert seen == [15]  # once, on the k-shot training set (3 images x 5 classes)
    assert blanked[-1]["train_loss"] != pytest.approx(plain[-1]["train_loss"])
    with pytest.raises(UserError, match="train_transform"):
        finetune(copy.deepcopy(source), cfg, train_transform=lambda d: d.subset(torch.arange(2)))


def test_biased_source_shifts_fixed_feature_predictions_more_than_clean(tmp_path):
    # Per seed the paired difference is ~0.2 (0.02-0.28 over 8 seeds on one CPU); five seeds
    # and a margin of half of it keep the test about the mechanism, not one trajectory (float
    # rounding differs between CPUs, and training amplifies it).
    cfg = BiasStudy(seeds=(0, 1, 2, 3, 4), images_per_class=(5,), modes=("fixed",),
                    target_data=("standard",))
    table = run_bias_transfer(cfg, tmp_path)
    shift = table.pivot(index="seed", columns="source_kind", values="prediction_shift")
    assert (shift.biased > shift.clean).sum() >= 4
    assert shift.biased.mean() > shift.clean.mean() + 0.1
    assert (table.test_accuracy > 0.4).all()  # both sources transfer (chance is 0.2)


def test_same_config_same_table(tmp_path):
    cfg = BiasStudy(**TINY, modes=("fixed",))
    pd.testing.assert_frame_equal(run_bias_transfer(cfg, tmp_path / "a"),
                                  run_bias_transfer(cfg, tmp_path / "b"))


@pytest.mark.parametrize("bad, match", [
    (dict(bias_classes=(7,)), "bias class 7"),
    (dict(bias_classes=(1, 1)), "must not repeat"),
    (dict(images_per_class=(0,)), "images per class"),
    (dict(images_per_class=(5, 5)), "must not repeat"),
    (dict(modes=("partial",)), "mode"),
    (dict(seeds=()), "at least one seed"),
    (dict(debias_share=1.5), "share"),
    (dict(feature="badnets", patch_size=9), "does not fit"),
])
def test_config_rejects_bad_values(bad, match):
    with pytest.raises(UserError, match=match):
        BiasStudy(**{**TINY, **bad})


def test_cli_writes_table_summary_and_figure(cli, tmp_path):
    out = tmp_path / "bias"
    code, stdout, stderr = cli("bias-transfer", "--out", out, "--source-task", "synthetic-0to4",
                               "--target-task", "synthetic-5to9", "--seeds", "2",
                               "--images-per-class", "2,all", "--source-epochs", "1",
                               "--epochs", "1", "--device", "cpu")
    assert code == 0, stderr
    assert {p.name for p in out.iterdir()} == {
        "sources", "results", "results.parquet", "spec.yaml", "runs.json",  # the runner's
        "bias_summary.csv", "bias_summary.md", "bias_shift.png"}
    assert len(list((out / "sources").iterdir())) == 2 * 2  # seeds x (biased, clean)
    table = read_bias_table(out)
    assert len(table) == 2 * 2 * 2 * 2 * 2  # seeds x sources x modes x target data x shots
    assert set(table.images_per_class) == {2, "all"}
    assert set(table.target_data) == {"standard", "de-biased"}
    assert "prediction shift" in stdout and "fixed" in stdout and "full" in stdout
    summary = pd.read_csv(out / "bias_summary.csv")
    assert len(summary) == 8 and (summary.n == 2).all()
    assert (table.flip_rate >= table.prediction_shift - 1e-12).all()  # shift = in - out
    assert summary.biased_flip.notna().all() and "flip rate" in stdout
    assert "biased flip rate" in (out / "bias_summary.md").read_text()

    fig, axes = bias_shift_figure(table)
    assert axes.shape == (2, 2)
    titles = [ax.get_title() for ax in axes.flat]
    assert "fixed-feature (head only)\nstandard target training set" in titles
    assert ("full-network fine-tuning\nde-biased target training set (feature on 50% of each "
            "class)") in titles
    for ax in axes.flat:
        assert [line.get_label() for line in ax.get_lines()][:2] == [
            "biased source", "clean source (baseline)"]
        assert ax.get_xscale() == "log"
    assert axes[0, 0].get_ylabel() == "prediction shift (max over classes)"
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "biased source", "clean source (baseline)"]
    assert "n=2 seeds" in fig._suptitle.get_text()
    assert [t.get_text() for t in axes[1, 0].get_xticklabels()] == ["2", "all\n(~42)"]

    # `report DIR` recognises the folder (its spec.yaml) and draws the same report
    code, _, stderr = cli("report", out, "--out", tmp_path / "again")
    assert code == 0, stderr
    assert (tmp_path / "again" / "bias_summary.csv").read_text() == \
        (out / "bias_summary.csv").read_text()
    assert (tmp_path / "again" / "bias_shift.png").is_file()


def test_save_spec_then_spec_runs_the_study_the_options_build(cli, tmp_path):
    options = ["--source-task", "synthetic-0to4", "--target-task", "synthetic-5to9", "--seeds",
               "3", "--images-per-class", "2,all", "--mode", "full", "--bias-class", "1",
               "--bias-class", "2", "--debias-share", "0.25", "--epochs", "2"]
    spec = tmp_path / "bias.yaml"
    code, _, stderr = cli("bias-transfer", *options, "--save-spec", spec)
    assert code == 0, stderr
    study = load_study(spec)
    assert study == BiasStudy(source_task="synthetic-0to4", target_task="synthetic-5to9",
                              seeds=(0, 1, 2), images_per_class=(2, "all"), modes=("full",),
                              bias_classes=(1, 2), debias_share=0.25, epochs=2)
    assert len(study.run_ids()) == len(set(study.run_ids())) == 3 * 2 * 1 * 2 * 2
    assert study_from_dict(yaml.safe_load(spec.read_text())) == study  # round trip
    grid = Path(__file__).parent / "data" / "studies" / "grid.yaml"
    code, _, stderr = cli("bias-transfer", "--spec", grid, "--out", tmp_path / "o")
    assert code == 2 and "is a grid spec, not a bias-transfer spec" in stderr
    code, _, stderr = cli("run", spec, "--out", tmp_path / "o", "--seeds", "2")
    assert code == 2 and not (tmp_path / "o").exists()


@pytest.mark.parametrize("bad, match", [
    ({"seeds": 2}, "key seeds must be tuple"),
    ({"arch": "cnn-small"}, "unknown key(s) arch"),
    ({"modes": ["partial"]}, "unknown mode 'partial'"),
])
def test_spec_errors_name_the_key(bad, match):
    with pytest.raises(UserError, match=re.escape(match)):
        study_from_dict({"study": "bias-transfer", **TINY_SPEC, **bad})


def test_run_ids_change_exactly_with_what_the_row_depends_on():
    def ids(**kw) -> dict:
        study = BiasStudy(**{**TINY, "seeds": (0, 1), **kw})
        return {(r.source_kind, r.mode, r.target_data, r.finetune.images_per_class,
                 r.finetune.seed): r.run_id for r in study.runs()}

    base = ids()
    assert len(set(base.values())) == len(base) == 2 * 2 * 2 * 2 * 2
    # the de-biased share: only the de-biased runs
    share = ids(debias_share=0.25)
    assert {k for k in base if base[k] != share[k]} == {k for k in base if k[2] == "de-biased"}
    # the feature: every run, the clean source's too (its shift is measured with it)
    feature = ids(feature="badnets")
    assert all(base[k] != feature[k] for k in base)
    # fewer seeds or modes: the same ids for the runs that stay
    fewer = ids(seeds=(1,), modes=("full",))
    assert fewer == {k: base[k] for k in fewer}


def test_reads_a_table_of_the_previous_version(tmp_path):
    rows = [dict(seed=s, source=k, mode="fixed", images_per_class="5", target_data="standard",
                 shots=5.0, prediction_shift=0.1 * s, shift_class=1, target_accuracy=0.5,
                 arch="cnn-small", source_accuracy=0.9)
            for s in range(2) for k in ("biased", "clean")]
    pd.DataFrame(rows).to_parquet(tmp_path / "bias_transfer.parquet")
    table = read_bias_table(tmp_path / "bias_transfer.parquet")
    assert {"source_kind", "test_accuracy", "source_arch", "source_clean_accuracy"} <= \
        set(table.columns)
    assert set(table.images_per_class) == {5} and len(bias_summary(table)) == 1
    pd.DataFrame(rows).drop(columns="shots").to_parquet(tmp_path / "other.parquet")
    with pytest.raises(UserError, match="not a bias-transfer table: missing column 'shots'"):
        read_bias_table(tmp_path / "other.parquet")


@pytest.mark.parametrize("args, match", [
    (["--bias-class", "7"], "bias class 7"),
    (["--images-per-class", "0"], "images per class"),
    (["--seeds", "0"], "--seeds"),
    (["--feature", "hat"], "unknown bias feature"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(cli, tmp_path, args, match):
    out = tmp_path / "bias"
    code, _, stderr = cli("bias-transfer", "--out", out, *args)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0]
    assert not out.exists()


def test_summary_pairs_seeds():
    rows = [dict(seed=s, source_kind=k, mode="fixed", images_per_class=5,
                 target_data="standard", shots=5.0, prediction_shift=v, shift_class=1,
                 test_accuracy=0.5)
            for s, (b, c) in enumerate([(0.3, 0.1), (0.5, 0.2), (0.4, 0.2)])
            for k, v in (("biased", b), ("clean", c))]
    s = bias_summary(pd.DataFrame(rows)).iloc[0]
    # paired by seed: the differences 0.2, 0.3, 0.2 (not the two means' separate spreads)
    assert s.difference == pytest.approx(0.7 / 3) and s.n == 3
    assert s.difference_ci == pytest.approx(t_interval([0.2, 0.3, 0.2])[1])
    assert s.biased_shift == pytest.approx(0.4) and s.clean_shift == pytest.approx(0.5 / 3)


def test_bias_backdoor_is_clean_label_at_rate_one():
    b = bias_backdoor(2, "badnets")
    assert (b.rate, b.target, b.clean_label, b.labels) == (1.0, 2, True, "all-to-one")


def test_several_bias_classes_get_the_feature_on_every_image_and_nowhere_else(tmp_path):
    b = bias_backdoor((0, 3), "badnets")
    assert (b.target, b.also_classes, b.classes) == (0, (3,), (0, 3))
    task = load_task("digits-0to4")
    poisoned, index = poison(task.train, b, task.num_classes)
    expected = torch.nonzero((task.train.y == 0) | (task.train.y == 3)).flatten()
    assert torch.equal(index, expected)  # rate 1: every image of both classes
    assert torch.equal(poisoned.y, task.train.y)  # clean label
    changed = (poisoned.x != task.train.x).flatten(1).any(1)
    assert not changed[~torch.isin(task.train.y, torch.tensor([0, 3]))].any()
    # the record round-trips through JSON, and a one-class config keeps its old form and id
    assert BackdoorConfig.from_dict(json.loads(json.dumps(b.to_dict()))) == b
    assert "also_classes" not in bias_backdoor(0).to_dict()
    table = run_bias_transfer(BiasStudy(**{**TINY, "bias_classes": (0, 3)}, modes=("fixed",),
                                        target_data=("standard",)), tmp_path)
    assert set(table.bias_classes) == {"0,3"}
    fig, _ = bias_shift_figure(table)
    assert "on source classes 0, 3" in fig._suptitle.get_text()


@pytest.mark.parametrize("kwargs,match", [
    (dict(also_classes=(1,)), "need clean-label"),
    (dict(also_classes=(0,), clean_label=True), "other than the target"),
    (dict(also_classes=(2, 2), clean_label=True), "distinct"),
])
def test_also_classes_are_checked(kwargs, match):
    with pytest.raises(UserError, match=match):
        BackdoorConfig("badnets", rate=1.0, target=0, **kwargs)
