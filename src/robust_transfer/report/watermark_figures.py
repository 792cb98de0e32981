"""Watermark removal figure (Adi et al. 2018): does the watermark survive each removal attack
and transfer, and what does each cost in accuracy? Drawn from the study's table
(`studies.watermark.study_table` of its results), so it can be re-made without retraining:
`watermark_report(folder, out)` writes `watermark_study.parquet` and `watermark_study.png`
(what `watermark remove` and `report DIR` write).

Top panel: per model, trigger-set accuracy (after transfer: the cross-fitted mapped accuracy)
and clean test accuracy (on the model's own task), means over seeds with 95% t-intervals
(n >= 2), the chance level of each trigger bar as a black tick (1/K; after transfer the
permutation null's mean), and the median p-value and the owned count written on the bar.
Bottom panel: every seed's p-value on a log axis down to 1e-12 (smaller ones as triangles at
the floor), with the ownership threshold alpha.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from robust_transfer.report.common import save_figure, save_table  # noqa: E402
from robust_transfer.report.stats import summarise  # noqa: E402
from robust_transfer.studies.watermark import WatermarkRemoval, study_table  # noqa: E402
from robust_transfer.transfer.results import read_results  # noqa: E402

TRIGGER, TEST, INDEPENDENT = "#2171b5", "#9ecae1", "#969696"
TABLE, FIGURE = "watermark_study.parquet", "watermark_study.png"
# The log axis stops here, so the region around alpha stays readable; smaller p-values are
# drawn as triangles at the floor (their value is written on the bars).
P_FLOOR = 1e-12


def _order(table: pd.DataFrame) -> list[str]:
    """Models in the table's order (baselines, removals, transfers), each once."""
    return list(dict.fromkeys(table["model"]))


def _p_text(p: float) -> str:
    return f"p={p:.2g}" if p >= 1e-3 else f"p={p:.0e}".replace("e-0", "e-")


def watermark_figure(table: pd.DataFrame, title: str = ""):
    """The two-panel figure (see the module docstring) from the study's table (`study_table`)."""
    models = _order(table)
    pos = np.arange(len(models))
    width = 0.38
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(1.05 * len(models) + 2.5, 7.2),
                                      sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    stats = {v: summarise(table, ["model"], v).set_index("model").loc[models]
             for v in ("trigger_accuracy", "test_accuracy", "chance")}
    independent = [bool((table[table.model == m].source == "independent").all()) for m in models]
    colours = [INDEPENDENT if ind else TRIGGER for ind in independent]
    for value, offset, colour, label in (
            ("trigger_accuracy", -0.5, colours, "trigger-set accuracy (after transfer: mapped)"),
            ("test_accuracy", 0.5, TEST, "clean test accuracy (model's own task)")):
        s = stats[value]
        mean = s["mean"].to_numpy()
        ci = np.where(s["n"] >= 2, s["ci"], np.nan)  # drawn clipped to [0, 1]
        err = np.vstack([np.minimum(ci, mean), np.minimum(ci, 1 - mean)])
        top.bar(pos + offset * width, mean, width, yerr=err, capsize=2, color=colour,
                label=label, edgecolor="white")
    if any(independent):
        top.bar([np.nan], [np.nan], color=INDEPENDENT, label="trigger-set accuracy, "
                "independent model")
    chance = stats["chance"]["mean"].to_numpy()
    top.hlines(chance, pos - width, pos, colors="k", linestyles="--", linewidth=1.2,
               label="chance (1/K; after transfer: permutation null mean)")
    for i, m in enumerate(models):
        rows = table[table.model == m]
        p = float(rows.p_value.median())
        owned = f"{int(rows.owned.sum())}/{len(rows)} owned"
        s = stats["trigger_accuracy"].iloc[i]
        above = min(1.0, s["mean"] + (s["ci"] if s["n"] >= 2 else 0.0))
        top.text(pos[i] - width / 2, above + 0.03,
                 f"{_p_text(p)}\n{owned}", ha="center", va="bottom", fontsize=6.5, rotation=90)
    top.set_ylim(0, 1.45)
    top.set_yticks(np.linspace(0, 1, 6))
    top.set_ylabel("accuracy")
    top.legend(fontsize=7, loc="upper center", ncol=2)
    top.grid(axis="y", alpha=0.3)
    n_seeds = int(table[table.stage != "baseline"].seed.nunique()) if (
        table.stage != "baseline").any() else 1
    top.set_title(title or f"watermark after removal attacks and transfer "
                  f"(bars: mean over n={n_seeds} seeds, 95% t-interval)", fontsize=10)
    for i, m in enumerate(models):
        p = table[table.model == m].p_value.to_numpy(dtype=float)
        low = p < P_FLOOR
        bottom.scatter(np.full(int((~low).sum()), pos[i]), p[~low], s=18, color=colours[i],
                       zorder=3, label="p-value of one seed" if i == 0 else None)
        bottom.scatter(np.full(int(low.sum()), pos[i]), np.full(int(low.sum()), P_FLOOR),
                       s=26, marker="v", color=colours[i], zorder=3)
    if (table.p_value < P_FLOOR).any():
        bottom.scatter([], [], s=26, marker="v", color="k",
                       label=f"p < {P_FLOOR:g} (value on the bar above)")
    alpha = float(table["alpha"].iloc[0]) if "alpha" in table else 0.01
    bottom.axhline(alpha, color="#cb181d", linestyle="--", linewidth=1,
                   label=f"alpha = {alpha:g} (owned below)")
    bottom.set_yscale("log")
    bottom.set_ylim(P_FLOOR / 5, 2)
    bottom.set_ylabel("p-value (log)")
    bottom.legend(fontsize=7, loc="lower right")
    bottom.grid(axis="y", alpha=0.3)
    bottom.set_xticks(pos, [m.replace(" (", "\n(") for m in models], fontsize=7, rotation=30,
                      ha="right")
    fig.tight_layout()
    return fig


def watermark_bars(table: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """`watermark_figure(table, title)` saved to `path`."""
    return save_figure(watermark_figure(table, title), path)


def watermark_bars_from_parquet(parquet: str | Path, path: str | Path) -> Path:
    """Re-make the figure from the study's Parquet table."""
    return watermark_bars(pd.read_parquet(parquet), path)


def watermark_summary(table: pd.DataFrame) -> pd.DataFrame:
    """One row per model of the study's table, in its order: mean test accuracy and its
    change, mean trigger accuracy and chance, median p-value, owned count of n seeds."""
    return (table.groupby("model", sort=False)
            .agg(test_acc=("test_accuracy", "mean"), change=("accuracy_change", "mean"),
                 trigger_acc=("trigger_accuracy", "mean"), chance=("chance", "mean"),
                 p_median=("p_value", "median"), owned=("owned", "sum"), n=("owned", "size"))
            .reset_index())


def watermark_report(folder: str | Path, out: str | Path) -> list[Path]:
    """The study's table (`study_table` of the finished runs in `folder`) and its figure,
    written into `out`: [watermark_study.parquet, watermark_study.png]."""
    table = study_table(read_results(folder, WatermarkRemoval.required))
    out = Path(out)
    # images per class is an int or "all": stored as text, as the results store does
    stored = table.assign(images_per_class=table.images_per_class.map(str))
    return [save_table(stored, out / TABLE), watermark_bars(table, out / FIGURE)]
