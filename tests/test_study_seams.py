"""The study pipeline's seams: pairing in the report, one type for images per class from spec
to Parquet and back, validation before training, a results store that is never stale, the
executor and device parameters of run_grid, a changed spec in the same directory, file modes,
and what a person sees in Figures 1 and 2."""

from __future__ import annotations

import itertools
import os
import signal
import stat

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from robust_transfer.atomic import atomic_write_text
from robust_transfer.data.tasks import parse_shots
from robust_transfer.errors import UserError
from robust_transfer.report.stats import summarise
from robust_transfer.report.study import (
    FACETS,
    _facet_suffix,
    accuracy_vs_epochs_figure,
    accuracy_vs_images_figure,
    headline_rows,
    make_report,
    paired_delta,
    prepare,
    summary_markdown,
)
from robust_transfer.transfer import executors
from robust_transfer.transfer.grid import run_grid
from robust_transfer.transfer.results import (
    TABLE,
    append_run,
    consolidate,
    done_run_ids,
    read_results,
)
from robust_transfer.transfer.runner import SPEC
from robust_transfer.transfer.spec import SourceEntry, expand, load_spec, parse_spec

# ---------------------------------------------------------------- synthetic results tables

BASE = {"rA": 0.50, "rB": 0.70}  # natural accuracy per source recipe
GAIN = {"rA": 0.10, "rB": 0.05}  # robust - natural, per recipe: the true paired delta


def results_table(recipes=("rA", "rB"), tasks=None, sources=((0.0, "l2"), (0.5, "l2")),
                  seeds=(0, 1, 2), shots=(1, 5, "all"), blocks=("0", "all"), epochs=2,
                  natural_shift: dict | None = None) -> pd.DataFrame:
    """Rows as the grid writes them; accuracy = base + gain (if robust) + seed/epoch terms, so
    every correctly paired delta equals GAIN[recipe] exactly."""
    tasks = tasks or {r: "synthetic-0to4" for r in recipes}
    natural_shift = natural_shift or {}
    rows = []
    for recipe, (eps, norm), seed, k, b, epoch in itertools.product(
        recipes, sources, seeds, shots, blocks, range(1, epochs + 1)
    ):
        acc = BASE[recipe] + (GAIN[recipe] if eps > 0 else natural_shift.get(norm, 0.0))
        acc += 0.02 * seed + 0.01 * epoch + (0.05 if b == "all" else 0.0)
        rows.append({
            "run_id": f"{recipe}-{eps}-{norm}-{seed}-{k}-{b}", "source_task": tasks[recipe],
            "source_arch": "cnn-small", "source_recipe": recipe, "source_eps": eps,
            "source_norm": norm, "source_seed": 0, "source_epochs": 2, "source_lr": 0.1,
            "source_attack_steps": 2, "target_task": "synthetic-5to9", "target_classes": 5,
            "images_per_class": k, "unfrozen_blocks": b, "epochs": epochs, "lr": 0.1,
            "batch_size": 32, "seed": seed, "epoch": epoch,
            "train_images": 5 * (40 if k == "all" else k), "test_accuracy": acc,
        })
    return pd.DataFrame(rows)


def test_delta_pairs_within_a_source_recipe_and_n_counts_seeds():
    df = prepare(results_table())
    delta = paired_delta(df)
    assert len(delta) == len(df[df.source_eps > 0])  # one natural partner per robust row
    for recipe, gain in GAIN.items():
        np.testing.assert_allclose(delta[delta.source_recipe == recipe].delta, gain, atol=1e-12)
    stats = summarise(delta[delta.epoch == 2], ["source_recipe", "unfrozen_blocks", "shots"],
                      "delta")
    assert set(stats.n) == {3}  # three seeds, not rows of several recipes


def test_two_natural_sources_of_one_recipe_are_one_natural_model():
    sources = ((0.0, "l2"), (0.0, "linf"), (0.5, "l2"), (0.03, "linf"))
    df = prepare(results_table(recipes=("rA",), sources=sources))
    assert set(df[df.source_eps == 0].source_norm) == {"l2"}
    delta = paired_delta(df)
    assert len(delta) == len(df[df.source_eps > 0])
    np.testing.assert_allclose(delta.delta, GAIN["rA"], atol=1e-12)
    summary = summary_markdown(df)
    header = next(line for line in summary.splitlines() if line.startswith("| unfrozen"))
    assert "| natural | LINF ε=0.03 | L2 ε=0.5 |" in header and header.count("natural") == 1
    assert "(3) |" in summary and "(6)" not in summary


def test_two_natural_sources_of_one_recipe_that_differ_are_an_error():
    sources = ((0.0, "l2"), (0.0, "linf"), (0.5, "l2"))
    table = results_table(recipes=("rA",), sources=sources, natural_shift={"linf": 0.01})
    with pytest.raises(UserError, match="two natural .*differ"):
        prepare(table)


def test_each_source_task_gets_its_own_section_and_figures(tmp_path):
    df = results_table(tasks={"rA": "synthetic-0to4", "rB": "digits-0to4"})
    df.assign(images_per_class=df.images_per_class.map(str)).to_parquet(tmp_path / TABLE)
    report = make_report(tmp_path / TABLE, tmp_path / "rep")
    summary = report.summary.read_text()
    assert summary.count("\n## ") == 2
    assert "## synthetic-0to4 → synthetic-5to9 (lr 0.1, 2 epochs)" in summary
    assert "## digits-0to4 → synthetic-5to9 (lr 0.1, 2 epochs)" in summary
    assert "(6)" not in summary and "(3)" in summary
    names = sorted(p.name for p in report.figures)
    assert names == ["fig1_accuracy_vs_images_digits-0to4.png",
                     "fig1_accuracy_vs_images_synthetic-0to4.png",
                     "fig2_accuracy_vs_epochs_k1_digits-0to4.png",
                     "fig2_accuracy_vs_epochs_k1_synthetic-0to4.png"]
    rows = headline_rows(tmp_path / TABLE)
    assert {r["source_task"] for r in rows} == {"synthetic-0to4", "digits-0to4"}
    assert len(rows) == 2 * 2 * 3  # tasks x blocks x shot counts, never pooled


def test_two_recipes_of_one_task_are_named_by_recipe():
    df = prepare(results_table())
    summary = summary_markdown(df)
    assert summary.count("\n## ") == 2
    for recipe in BASE:
        assert f"## synthetic-0to4 → synthetic-5to9 [sources: synthetic-0to4 (cnn-small, " \
               f"2 epochs, lr 0.1, 2 PGD steps, seed 0; recipe {recipe})]" in summary
        facet = df[df.source_recipe == recipe].iloc[0][FACETS]
        assert _facet_suffix(df, tuple(facet)) == f"_recipe{recipe}"


# ---------------------------------------------------------------- Figures 1 and 2 content

def _legend(ax) -> list[str]:
    legend = ax.get_legend()
    return [] if legend is None else [t.get_text() for t in legend.get_texts()]


def test_figure_1_shows_one_curve_per_source_and_one_delta_per_robust_source():
    sources = ((0.0, "l2"), (0.0, "linf"), (0.5, "l2"), (1.0, "l2"))
    df = prepare(results_table(recipes=("rA",), sources=sources))
    fig, axes = accuracy_vs_images_figure(df[df.epoch == df.epochs])
    assert axes.shape == (2, 2)  # accuracy / delta rows x head-only / all-blocks columns
    assert [ax.get_title() for ax in axes[0]] == ["head only (0 blocks)", "all blocks"]
    for ax, dax in axes.T:
        assert _legend(ax) == ["natural", "L2 ε=0.5", "L2 ε=1"]
        assert len(ax.get_lines()) == 3
        assert _legend(dax) == ["L2 ε=0.5 − natural", "L2 ε=1 − natural"]
        assert len(dax.get_lines()) == 3  # two deltas + the zero line
        assert ax.get_ylabel() == "test accuracy"
        assert dax.get_ylabel() == "Δ accuracy (source − natural)"
        assert dax.get_xlabel() == "training images per class (log scale)"
        assert ax.get_xscale() == "log"
        np.testing.assert_allclose(ax.get_lines()[0].get_xdata(), [1, 5, 40])
        robust_delta = dax.get_lines()[0].get_ydata()
        np.testing.assert_allclose(robust_delta, GAIN["rA"], atol=1e-12)
    labels = [t.get_text() for t in axes[1, 0].get_xticklabels()]
    assert labels == ["1", "5", "all\n(~40)"]
    assert "n=3 seeds" in fig.get_suptitle()


def test_figure_2_is_accuracy_per_epoch_at_the_given_shots():
    df = prepare(results_table(recipes=("rB",), epochs=4, blocks=("0",)))
    fig, axes = accuracy_vs_epochs_figure(df, "5")
    assert axes.shape == (2, 1)
    ax, dax = axes[:, 0]
    assert _legend(ax) == ["natural", "L2 ε=0.5"]
    assert dax.get_xlabel() == "fine-tuning epoch"
    natural = ax.get_lines()[0]
    np.testing.assert_allclose(natural.get_xdata(), [1, 2, 3, 4])
    np.testing.assert_allclose(natural.get_ydata(), BASE["rB"] + 0.02 + 0.01 * np.arange(1, 5))
    assert "5 image(s) per class" in fig.get_suptitle()
    with pytest.raises(UserError, match="no runs with 2 images per class"):
        accuracy_vs_epochs_figure(df, 2)


def test_a_figure_never_mixes_facets():
    df = prepare(results_table())
    with pytest.raises(UserError, match="mix 'source_recipe'"):
        accuracy_vs_images_figure(df[df.epoch == df.epochs])


# ---------------------------------------------------------------- images_per_class: one type

def test_parse_shots_is_the_one_parse():
    assert parse_shots(None) == "all" and parse_shots(" ALL ") == "all"
    assert parse_shots("7") == 7 and parse_shots(np.int64(7)) == 7 and parse_shots(7.0) == 7
    for bad in (0, -1, "x", 1.5, True):
        with pytest.raises(UserError, match="positive integer or 'all'"):
            parse_shots(bad)


def test_images_per_class_round_trips_through_parquet(tmp_path):
    df = results_table(recipes=("rA",), seeds=(0,), blocks=("0",), epochs=1)
    for run_id, rows in df.groupby("run_id"):
        append_run(tmp_path, run_id, rows.to_dict("records"))
    copy = tmp_path / "copy" / "table.parquet"
    copy.parent.mkdir()
    copy.write_bytes(consolidate(tmp_path).read_bytes())
    for source in (tmp_path, copy):  # the parts, and a results.parquet as a file
        back = read_results(source)
        assert sorted(map(str, back.images_per_class.unique())) == ["1", "5", "all"]
        assert {type(v) for v in back.images_per_class} == {int, str}
        assert set(back[back.images_per_class != "all"].images_per_class) == {1, 5}


# ---------------------------------------------------------------- spec validation up front

SPEC_DICT = {
    "source": {"task": "synthetic-0to4", "epochs": 1, "attack_steps": 1},
    "sources": [{"eps": 0.0, "norm": "l2"}, {"eps": 0.5, "norm": "l2"}],
    "targets": ["synthetic-5to9"],
    "images_per_class": [1],
    "unfrozen_blocks": [0],
    "epochs": 1,
    "seeds": [0, 1],
}


@pytest.mark.parametrize("bad,match", [
    ({"unfrozen_blocks": [0, 4]}, r"unfrozen blocks 4 is more than arch 'cnn-small' has \(3\)"),
    ({"images_per_class": [1, 1000]}, r"images per class 1000 is more than class \d+ of task"),
    ({"targets": ["synthetic-5to9", "cifar10-5to9"]}, "CIFAR-10 not found"),
    ({"seeds": [0, 0]}, "lists 0 twice"),
])
def test_spec_is_checked_against_arch_and_data_before_training(bad, match, monkeypatch,
                                                                 tmp_path):
    monkeypatch.setenv("ROBUST_TRANSFER_DATA", str(tmp_path / "nodata"))
    from robust_transfer.data.tasks import clear_caches

    clear_caches()
    try:
        with pytest.raises(UserError, match=match):
            parse_spec({**SPEC_DICT, **bad})
    finally:
        clear_caches()


def test_unfrozen_blocks_are_checked_against_the_spec_arch():
    medium = {**SPEC_DICT["source"], "arch": "cnn-medium"}  # four blocks
    assert parse_spec({**SPEC_DICT, "unfrozen_blocks": [4], "source": medium})
    with pytest.raises(UserError, match=r"more than arch 'cnn-medium' has \(4\)"):
        parse_spec({**SPEC_DICT, "unfrozen_blocks": [5], "source": medium})


def test_a_natural_source_is_listed_once_whatever_its_norm():
    spec = parse_spec({**SPEC_DICT, "sources": [{"eps": 0.0, "norm": "l2"},
                                                 {"eps": 0.0, "norm": "linf"},
                                                 {"eps": 0.5, "norm": "l2"}]})
    assert spec.sources == (SourceEntry(0.0, "l2"), SourceEntry(0.5, "l2"))


def test_spec_yaml_written_by_a_grid_parses_back_to_the_same_runs(tmp_path):
    spec = parse_spec({**SPEC_DICT, "images_per_class": [1, "all"], "unfrozen_blocks": [0, "all"]})
    from robust_transfer.transfer.grid import spec_text

    (tmp_path / "s.yaml").write_text(spec_text(spec))
    again = load_spec(tmp_path / "s.yaml")
    assert again.images_per_class == (1, "all")
    assert [r.run_id for r in expand(again)] == [r.run_id for r in expand(spec)]


# ---------------------------------------------------------------- the results store

def _part_rows(run_id: str, acc: float) -> list[dict]:
    row = results_table(recipes=("rA",), sources=((0.0, "l2"),), seeds=(0,), shots=(1,),
                        blocks=("0",), epochs=1).iloc[0].to_dict()
    return [{**row, "run_id": run_id, "test_accuracy": acc}]


def test_read_results_never_returns_a_stale_table(tmp_path):
    append_run(tmp_path, "a", _part_rows("a", 0.1))
    append_run(tmp_path, "b", _part_rows("b", 0.2))
    consolidate(tmp_path)
    append_run(tmp_path, "c", _part_rows("c", 0.3))  # a later, interrupted grid's run
    for source in (tmp_path, tmp_path / TABLE):
        assert sorted(read_results(source).run_id) == ["a", "b", "c"]


def test_a_part_of_an_older_format_is_not_done(tmp_path):
    append_run(tmp_path, "new", _part_rows("new", 0.1))
    pd.DataFrame({"run_id": ["old"], "epoch": [1]}).to_parquet(tmp_path / "results" /
                                                               "old.parquet")
    assert done_run_ids(tmp_path) == {"new"}
    assert list(read_results(tmp_path).run_id) == ["new"]


# ---------------------------------------------------------------- run_grid's seams

class RecordingExecutor:
    """The executor interface, in this process, recording what it was given."""

    def __init__(self):
        self.entered = self.exited = False
        self.jobs = []

    def __enter__(self):
        self.entered = True
        return self

    def __exit__(self, *exc):
        self.exited = True

    def map_unordered(self, fn, items):
        for item in items:
            self.jobs.append(getattr(item, "job", item))  # a runner unit: the job it ships
            yield item, fn(item)


@pytest.fixture(scope="module")
def grid_dir(tmp_path_factory):
    """A tiny grid (2 sources x 2 seeds) run through a recording executor."""
    out = tmp_path_factory.mktemp("grid") / "g"
    executor = RecordingExecutor()
    table = run_grid(parse_spec(SPEC_DICT), out, executor=executor, device="cpu")
    return out, table, executor


def test_run_grid_runs_through_the_given_executor_on_the_given_device(grid_dir):
    out, table, executor = grid_dir
    assert executor.entered and executor.exited
    assert len(executor.jobs) == 2 + 4  # two sources, then four fine-tunes
    assert {job.device for job in executor.jobs} == {"cpu"}
    df = read_results(table)
    assert df.run_id.nunique() == 4 and set(df.images_per_class) == {1}
    assert df.groupby("source_recipe").ngroups == 1  # natural and robust: one recipe


def test_a_changed_spec_keeps_old_runs_but_reports_only_the_new_spec(grid_dir, tmp_path):
    out, _, _ = grid_dir
    fewer = parse_spec({**SPEC_DICT, "seeds": [1]})
    calls = []
    table = run_grid(fewer, out, executor=RecordingExecutor(), on_run_done=calls.append)
    assert calls == []  # both runs were done under the first spec
    expected = {r.run_id for r in expand(fewer)}
    assert set(pd.read_parquet(table).run_id) == expected
    assert set(read_results(out).run_id) == expected
    assert len(list((out / "results").glob("*.parquet"))) == 4  # the others stay on disk
    assert yaml.safe_load((out / SPEC).read_text())["seeds"] == [1]
    report = make_report(out, tmp_path / "rep")
    assert report.runs == 2 and "(1)" in report.summary.read_text()
    run_grid(parse_spec(SPEC_DICT), out, executor=RecordingExecutor())  # back, for others


def test_local_executor_workers_leave_ctrl_c_to_the_main_process(monkeypatch):
    """The worker initialiser (run here, its watchdog thread stubbed) ignores SIGINT."""
    started = []
    monkeypatch.setattr(executors.threading, "Thread",
                        lambda **kw: type("T", (), {"start": lambda self: started.append(kw)})())
    handler, threads = signal.getsignal(signal.SIGINT), torch.get_num_threads()
    try:
        executors._init_worker(1, os.getpid())
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, handler)
        torch.set_num_threads(threads)
    assert started and started[0]["daemon"]


# ---------------------------------------------------------------- file modes

@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_atomic_writes_get_the_usual_permissions(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        append_run(tmp_path, "r", _part_rows("r", 0.5))
    finally:
        os.umask(old)
    for path in (tmp_path / "a.txt", tmp_path / "results" / "r.parquet"):
        assert stat.S_IMODE(path.stat().st_mode) == mode
