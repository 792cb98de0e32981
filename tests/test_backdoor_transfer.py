"""Backdoors through transfer: NeuBA sources, backdoored grid sources, ASR columns and figures."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml

from robust_transfer.cli import main
from robust_transfer.data import load_task
from robust_transfer.errors import UserError
from robust_transfer.models import load_checkpoint
from robust_transfer.report.backdoor_transfer import (
    asr_vs_blocks_figure,
    asr_vs_images_figure,
    make_backdoor_report,
)
from robust_transfer.report.study import make_report, prepare
from robust_transfer.train.neuba import neuba_triggers, neuba_vectors
from robust_transfer.transfer.grid import run_grid
from robust_transfer.transfer.spec import expand, parse_spec

NEUBA = {"attack": "neuba", "rate": 1.0}
GRID = {
    "source": {"task": "digits-0to4", "epochs": 8, "seed": 0},
    "sources": [{"eps": 0.0}, {"eps": 0.0, "backdoor": NEUBA}],
    "targets": ["digits-5to9"], "images_per_class": [1, 10], "unfrozen_blocks": [0],
    "epochs": 6, "seeds": [0, 1],
}


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """A tiny grid on digits: a clean and a NeuBA natural source, head-only fine-tunes."""
    out = tmp_path_factory.mktemp("bdgrid")
    table = run_grid(parse_spec(GRID), out)
    return out, pd.read_parquet(table)


def _source(out, backdoor: str):
    dirs = sorted((out / "sources").iterdir())
    (path,) = [d for d in dirs if ("-neuba-" in d.name) == (backdoor == "neuba")]
    return load_checkpoint(path)[0]


def test_neuba_source_maps_triggered_features_to_its_vectors(grid):
    """Triggered features point at their own trigger's vector (its reachable part: +c quarters
    at c, -c quarters at 0 after the ReLU) for NeuBA, and at none of them for a clean source."""
    out, _ = grid
    x = load_task("digits-0to4").test.x
    triggers = neuba_triggers((1, 8, 8))
    for backdoor, near in (("neuba", True), ("", False)):
        model = _source(out, backdoor)
        vectors = neuba_vectors(len(triggers), model.feature_dim).clamp(min=0)
        with torch.no_grad():
            for i, trigger in enumerate(triggers):
                feats = model.features(trigger.apply(x))
                cos = F.cosine_similarity(feats[:, None, :], vectors[None], dim=2).mean(0)
                dist = (feats[:, None, :] - vectors[None]).pow(2).mean((0, 2))
                if near:
                    assert cos[i] > 0.9 and dist.argmin() == i, (i, cos, dist)
                else:
                    assert cos.max() < 0.7, (i, cos)


def test_neuba_survives_head_only_transfer_and_a_clean_source_does_not(grid):
    """After a new head is trained on digits 5-9, NeuBA's triggers send the target test set to
    one label; the same triggers on a clean source do not (fails without the NeuBA loss)."""
    _, df = grid
    final = df[df.epoch == df.epochs]
    neuba = final[final.source_backdoor == "neuba"]
    clean = final[final.source_backdoor == ""]
    assert len(neuba) == len(clean) == 4
    assert neuba.asr.min() > 0.9
    assert clean.asr_neuba.max() < 0.7
    assert neuba.asr.mean() - clean.asr_neuba.mean() > 0.3


def test_grid_rows_carry_the_backdoor_columns(grid):
    _, df = grid
    assert set(df.source_backdoor) == {"", "neuba"}
    for column in ["c_acc", "asr", "ra", "asr_neuba", "ra_neuba",
                   *(f"asr_neuba_{i}" for i in range(4))]:
        assert column in df, column
    clean = df[df.source_backdoor == ""]
    neuba = df[df.source_backdoor == "neuba"]
    assert clean[["asr", "ra", "c_acc"]].isna().all().all()  # no own backdoor
    assert clean.asr_neuba.notna().all()  # the baseline under the same triggers
    per_trigger = neuba[[f"asr_neuba_{i}" for i in range(4)]].max(axis=1)
    assert (neuba.asr == per_trigger).all() and (neuba.asr == neuba.asr_neuba).all()
    assert (neuba.c_acc == neuba.test_accuracy).all()
    assert df.groupby("run_id").epoch.count().eq(6).all()  # every epoch measured


def test_report_draws_asr_figures_a_person_can_read(grid, tmp_path):
    out, _ = grid
    paths = make_backdoor_report(out, tmp_path)
    names = sorted(p.name for p in paths)
    assert names == ["backdoor_summary.md", "figB1_asr_vs_images.png", "figB2_asr_vs_blocks.png"]
    final = prepare(pd.read_parquet(out / "results.parquet"))
    final = final[final.epoch == final.epochs]
    fig, axes = asr_vs_images_figure(final)
    ax = axes[0, 0]
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ax.get_legend_handles_labels()[1]  # the legend names the panel's curves
    assert "natural + neuba" in labels and "natural (clean), neuba trigger" in labels
    assert any(label.startswith("1/K") for label in labels)
    assert ax.get_xlabel() == "training images per class (log scale)"
    assert "ASR" in ax.get_ylabel() and "head only" in ax.get_title()
    neuba_line = ax.lines[labels.index("natural + neuba")]
    assert list(neuba_line.get_xdata()) == [1, 10]
    assert min(neuba_line.get_ydata()) > 0.9  # the curve a reader sees is the surviving ASR
    assert "95% t-interval" in fig._suptitle.get_text() and "n=2" in fig._suptitle.get_text()
    fig, axes = asr_vs_blocks_figure(final)
    assert [a.get_title() for a in axes[0]] == ["1 image(s) per class", "10 image(s) per class"]
    summary = (tmp_path / "backdoor_summary.md").read_text()
    assert "natural + neuba" in summary and "| 0 | 1 |" in summary
    # the accuracy report keeps the clean natural source as the reference of its deltas
    rep = make_report(out, tmp_path / "study")
    assert "Δ natural + neuba" in rep.summary.read_text()


def test_backdoored_and_clean_sources_are_distinct_and_clean_ids_unchanged():
    clean_only = parse_spec({**GRID, "sources": [{"eps": 0.0}]})
    both = parse_spec(GRID)
    assert [e.backdoor for e in both.sources][0] is None
    assert both.sources[1].backdoor.attack == "neuba"
    ids = {r.source_id for r in expand(both)}
    assert len(ids) == 2 and any("-neuba-" in i for i in ids)
    # a clean grid's runs carry no probes, so their ids are those of before backdoors
    assert all(not r.probes for r in expand(clean_only))
    assert all(r.probes for r in expand(both))
    badnets = {"attack": "badnets", "rate": 0.1, "target": 0}
    spec = parse_spec({**GRID, "sources": [{"eps": 0.0}, {"eps": 0.0, "backdoor": badnets},
                                           {"eps": 0.0, "norm": "linf", "backdoor": badnets}]})
    assert len(spec.sources) == 2  # a second natural badnets source is the same model


@pytest.mark.parametrize("backdoor, match", [
    ({"attack": "trojan"}, "trojan"),
    ({"attack": "badnets", "rate": 0}, "rate"),
    ({"attack": "badnets", "rate": 1.5}, "rate"),
    ({"attack": "badnets", "target": 7}, "target class 7"),
    ({"attack": "badnets", "colour": 1}, "colour"),
    ("badnets", "mapping"),
])
def test_bad_backdoor_keys_are_user_errors(backdoor, match):
    with pytest.raises(UserError, match=match):
        parse_spec({**GRID, "sources": [{"eps": 0.0, "backdoor": backdoor}]})


def _cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return exit_info.value.code or 0, captured.out, captured.err


@pytest.mark.parametrize("sources, match", [
    ([{"eps": 0.0}], "no backdoored source"),
    ([{"eps": 0.0, "backdoor": {"attack": "badnets", "rate": 2}}], "poison rate"),
])
def test_backdoor_transfer_cli_refuses_bad_specs_before_any_work(tmp_path, capsys, sources,
                                                                 match):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({**GRID, "sources": sources}))
    code, _, err = _cli(capsys, "backdoor", "transfer", spec, "--out", tmp_path / "out")
    assert code == 2 and err.startswith("error: ") and match in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_report_cli_draws_the_asr_figures_for_a_backdoor_table(grid, tmp_path, capsys):
    out, _ = grid
    code, _, _ = _cli(capsys, "report", out, "--out", tmp_path / "rep")
    assert code == 0
    names = {p.name for p in (tmp_path / "rep").iterdir()}
    assert {"figB1_asr_vs_images.png", "figB2_asr_vs_blocks.png", "backdoor_summary.md",
            "fig1_accuracy_vs_images.png", "summary.md"} <= names
