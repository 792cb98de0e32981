"""The `influence` study's report (`studies.influence`): Fig. 6's class-match table with its
t-interval bands (class_match.parquet, influence_class_match.png), Fig. 5's most influential
training images (influence_examples.png), and the printed summary.

Sources are grouped by their robustness label (`source_label`), natural first then by eps;
a group's band is a t-interval over its fine-tunes (seeds) when it has several, else over
the lone fine-tune's target images (rebuilt from the run's mean, sd and count per k).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from robust_transfer.data import load_task
from robust_transfer.report.common import save_table
from robust_transfer.report.explain_figures import (
    InfluenceExamples,
    class_match_figure,
    influence_examples_figure,
)
from robust_transfer.stats import t_half_width, t_interval
from robust_transfer.studies.influence import CLASS_MATCH, EXAMPLE, TARGETS, InfluenceStudy
from robust_transfer.transfer.results import read_results


def _groups(results: pd.DataFrame) -> list[str]:
    """Source labels, natural first then by eps."""
    keys = results[["source_eps", "source_label"]].drop_duplicates()
    return list(keys.sort_values(["source_eps", "source_label"])["source_label"])


def _runs(group: pd.DataFrame) -> list[str]:
    """A group's run ids by fine-tune seed (then id)."""
    return list(group[["seed", "run_id"]].drop_duplicates().sort_values(["seed", "run_id"])
                ["run_id"])


def class_match_table(results: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """Tidy rows (source_label, targets, k, mean, lower, upper, n, over, ...): the mean
    fraction of top-k training images sharing the target's class, with a `level`
    t-interval over seeds when a source group has several fine-tunes, else over the target
    images."""
    cm = results[results["kind"] == CLASS_MATCH]
    rows = []
    for label in _groups(cm):
        group = cm[cm["source_label"] == label]
        runs = _runs(group)
        for name in TARGETS.values():
            d = group[group["targets"] == name]
            curves = [d[d["run_id"] == r].sort_values("k") for r in runs]
            k = min(len(c) for c in curves)
            if len(runs) > 1:
                values = np.stack([c["class_match"].to_numpy()[:k] for c in curves])
                mean, half, n = t_interval(values, level)
                over = "seeds"
            else:
                one = curves[0].iloc[:k]
                n, over = int(one["targets_n"].iloc[0]), name
                mean = one["class_match"].to_numpy()
                half = t_half_width(one["class_match_sd"].to_numpy(), n, level)
            half = np.nan_to_num(half)  # one value: a zero-width band
            first = d.iloc[0]
            for j in range(k):
                rows.append({"source_label": label, "targets": name, "k": j + 1,
                             "mean": float(mean[j]), "lower": float(mean[j] - half[j]),
                             "upper": float(mean[j] + half[j]), "n": n, "over": over,
                             "influence_method": first["influence_method"],
                             "ranking": first["ranking"],
                             "influence_blocks": int(first["influence_blocks"])})
    return pd.DataFrame(rows)


def influence_examples(results: pd.DataFrame) -> InfluenceExamples:
    """Fig. 5 data: the first evaluated test image of each class and, for the first
    fine-tune (lowest seed) of each source group, its most influential training images."""
    ex = results[results["kind"] == EXAMPLE]
    task = load_task(ex["target_task"].iloc[0])
    images, labels, scores = {}, {}, {}
    ref = None
    for label in _groups(ex):
        run = ex[ex["run_id"] == _runs(ex[ex["source_label"] == label])[0]]
        run = run.sort_values(["test_label", "rank"])
        classes, k = run["test_label"].nunique(), int(run["rank"].max())
        index = torch.tensor(run["train_image"].to_numpy(), dtype=torch.long)
        images[label] = task.train.x[index].reshape(classes, k, *task.train.x.shape[1:])
        labels[label] = torch.tensor(run["train_label"].to_numpy()).reshape(classes, k)
        scores[label] = torch.tensor(run["score"].to_numpy()).reshape(classes, k)
        ref = run if ref is None else ref
    tests = ref.drop_duplicates("test_label")
    index = torch.tensor(tests["test_image"].to_numpy(), dtype=torch.long)
    return InfluenceExamples(task.test.x[index], task.test.y[index], task.classes, images,
                             labels, scores, ref["ranking"].iloc[0])


def class_match_summary(table: pd.DataFrame, ks: Sequence[int] = (1, 10, 50, 100)
                        ) -> list[dict]:
    """One row per (source, targets) of `class_match_table`: mean ± 95% half-width at a few
    k, and what n counts."""
    rows = []
    short = {v: k for k, v in TARGETS.items()}
    for (label, targets), d in table.groupby(["source_label", "targets"], sort=False):
        d = d.set_index("k")
        over = "seeds" if d["over"].iloc[0] == "seeds" else "images"
        row = {"source": label, "targets": short.get(targets, targets),
               "n": f"{d['n'].iloc[0]} {over}"}
        for k in ks:
            if k in d.index:
                r = d.loc[k]
                row[f"k={k}"] = f"{r['mean']:.3f} ± {(r['upper'] - r['lower']) / 2:.3f}"
        rows.append(row)
    return rows


def influence_report(folder: str | Path, out: str | Path) -> list[Path]:
    """influence_examples.png (Fig. 5), influence_class_match.png (Fig. 6) and
    class_match.parquet of the `influence` study in `folder`, written into `out`."""
    out = Path(out)
    results = read_results(folder, InfluenceStudy.required)
    table = class_match_table(results)
    parquet = save_table(table, out / "class_match.parquet")
    chance = float(results["chance"].iloc[0])
    fig6 = class_match_figure(table, out / "influence_class_match.png", chance=chance)
    fig5 = influence_examples_figure(influence_examples(results), out / "influence_examples.png")
    return [fig5, fig6, parquet]
