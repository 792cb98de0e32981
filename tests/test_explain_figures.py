"""Explain figures: what they say matches what was computed, and legends stay readable."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import robust_transfer.report.explain_figures as figures
from explain_fixtures import checkpoints, study_results
from robust_transfer.report.influence import class_match_table, influence_examples


@pytest.fixture
def captured(monkeypatch):
    """Keep each figure open instead of writing it: {"fig": the last figure}."""
    store = {}

    def keep(fig, path):
        store["fig"] = fig
        return path

    monkeypatch.setattr(figures, "save_figure", keep)
    yield store
    if "fig" in store:
        figures.plt.close(store["fig"])


def _decaying_table() -> pd.DataFrame:
    """A Fig. 6 table shaped like real runs: 1 at k=1 decaying to chance (0.2) by k~50."""
    rows = []
    for label, shift in (("natural", 0.0), ("robust (l2 eps=1)", 0.05)):
        for targets in ("held-out test images", "training images"):
            for k in range(1, 101):
                m = 0.2 + 0.8 * np.exp(-(k - 1) / 12) - shift * np.exp(-(k - 1) / 30)
                rows.append({"source_label": label, "targets": targets, "k": k, "mean": m,
                             "lower": m - 0.03, "upper": m + 0.03, "n": 10, "over": "seeds",
                             "influence_method": "exact"})
    return pd.DataFrame(rows)


def test_class_match_legend_does_not_hide_the_curves(captured):
    figures.class_match_figure(_decaying_table(), "unused.png", chance=0.2)
    fig = captured["fig"]
    fig.canvas.draw()
    for ax in fig.axes:
        box = ax.get_legend().get_window_extent()
        for line in ax.get_lines():
            points = line.get_transform().transform(np.column_stack(line.get_data()))
            assert not box.count_contains(points), (ax.get_title(), line.get_label())
        assert "n=10 seeds" in " ".join(t.get_text() for t in ax.get_legend().get_texts())


def test_figure_titles_name_the_ranking_used(captured, tmp_path):
    results = study_results(tmp_path, checkpoints().ft_robust, top_k=10, ranking="harmful",
                            targets_per_class=1, examples=3)
    table = class_match_table(results)
    assert (table["ranking"] == "harmful").all()
    figures.class_match_figure(table, "unused.png")
    title = captured["fig"]._suptitle.get_text()
    assert "most harmful" in title and "helpful" not in title
    examples = influence_examples(results)
    assert examples.ranking == "harmful"
    figures.influence_examples_figure(examples, "unused.png")
    title = captured["fig"]._suptitle.get_text()
    assert "Top-3 most harmful" in title and "helpful" not in title
