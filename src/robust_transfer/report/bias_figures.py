"""Bias transfer (Salman et al. 2022, arXiv 2207.02842): the figure and summary of the study
`studies.bias` runs, drawn from its results table (re-made without training; `report DIR`).

- Figure: prediction shift (towards the class the feature moves most predictions to) vs
  training images per class (log axis); one panel per fine-tuning mode (columns: fixed-feature,
  full-network) and target training set (rows: standard, de-biased); a line per source kind
  (biased, clean), bands = 95% t-intervals over seeds. The clean source is the baseline: the
  max over classes keeps it above 0 even for a model that does not react to the feature.
- Summary: per (target data, mode, images per class), the biased and clean sources' mean shift
  ± 95% t half-width, and their difference paired by seed (same seed, same k-shot subset and
  head), with target accuracy and the most common shift class.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from robust_transfer.atomic import atomic_path, atomic_write_text  # noqa: E402
from robust_transfer.report.common import save_figure  # noqa: E402
from robust_transfer.report.stats import summarise  # noqa: E402
from robust_transfer.report.study import _label_all_ticks  # noqa: E402
from robust_transfer.stats import t_interval  # noqa: E402
from robust_transfer.studies.bias import (  # noqa: E402
    SOURCE_KINDS,
    TARGET_DATA,
    read_bias_table,
)

MODE_TITLES = {"fixed": "fixed-feature (head only)", "full": "full-network fine-tuning"}
LINE_LABELS = {"biased": "biased source", "clean": "clean source (baseline)"}
STYLES = {"biased": dict(color="tab:red", ls="-"), "clean": dict(color="tab:blue", ls="--")}
FIGURE = "bias_shift.png"
SUMMARY_CSV, SUMMARY_MD = "bias_summary.csv", "bias_summary.md"


def _order(values, reference) -> list:
    return [v for v in reference if v in set(values)]


def _classes_text(row) -> str:
    """ "source class 0" or "source classes 0, 3" from a row's `bias_classes` text (tables
    written before several classes existed have `bias_class`)."""
    classes = str(row.bias_classes if "bias_classes" in row else row.bias_class).split(",")
    return f"source class{'es' if len(classes) > 1 else ''} {', '.join(classes)}"


def bias_shift_figure(table: pd.DataFrame, title: str | None = None):
    """The figure of the module docstring from a study table: (figure, axes (rows, cols))."""
    modes = _order(table["mode"], list(MODE_TITLES))
    datas = _order(table["target_data"], TARGET_DATA)
    fig, axes = plt.subplots(len(datas), len(modes), figsize=(5.0 * len(modes),
                             3.8 * len(datas)), squeeze=False, sharex=True, sharey=True)
    ns = set()
    for i, data in enumerate(datas):
        for j, mode in enumerate(modes):
            ax = axes[i, j]
            part = table[(table.target_data == data) & (table["mode"] == mode)]
            for kind in SOURCE_KINDS:
                stats = summarise(part[part.source_kind == kind], ["shots"], "prediction_shift")
                if stats.empty:
                    continue
                ns.update(stats["n"])
                ax.plot(stats.shots, stats["mean"], marker="o", ms=4, label=LINE_LABELS[kind],
                        **STYLES[kind])
                ax.fill_between(stats.shots, stats["mean"] - stats["ci"],
                                stats["mean"] + stats["ci"], alpha=0.2, linewidth=0,
                                color=STYLES[kind]["color"])
            ax.axhline(0.0, color="gray", lw=0.8, ls=":")
            ax.set_xscale("log")
            what = (f"de-biased target training set (feature on {part.debias_share.iloc[0]:.0%}"
                    " of each class)" if data == "de-biased" and "debias_share" in part
                    else f"{data} target training set")
            ax.set_title(f"{MODE_TITLES[mode]}\n{what}", fontsize=10)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel("prediction shift (max over classes)")
            if i == len(datas) - 1:
                ax.set_xlabel("training images per class (log scale)")
    _label_all_ticks(axes, table)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=9,
               bbox_to_anchor=(0.5, 0.0))
    r = table.iloc[0]
    title = title or (f"Bias transfer {r.source_task} → {r.target_task}: {r.feature} feature "
                      f"on {_classes_text(r)}")
    n = "n=" + "/".join(str(int(v)) for v in sorted(ns))
    fig.suptitle(f"{title}\nbands: 95% t-interval over seeds ({n} seeds)", fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig, axes


def _mean_ci(values) -> tuple[float, float]:
    values = pd.Series(values, dtype=float).dropna().to_numpy()
    if len(values) == 0:
        return float("nan"), float("nan")
    mean, half, _ = t_interval(values)
    return float(mean), float(half)


def bias_summary(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (target data, mode, images per class): mean ± 95% t half-width of the
    prediction shift per source kind and of their paired (by seed) difference, the flip
    rate (NaN for tables from before it was recorded) and target accuracy per source kind,
    the most common shift class of the biased source, n seeds."""
    if "flip_rate" not in table:
        table = table.assign(flip_rate=float("nan"))
    rows = []
    keys = ["target_data", "mode", "images_per_class"]
    order = {"target_data": TARGET_DATA, "mode": list(MODE_TITLES)}
    for key, part in table.groupby(keys, sort=False):
        row = dict(zip(keys, key, strict=True))
        row["shots"] = float(part.shots.iloc[0])
        by_kind = {k: part[part.source_kind == k].set_index("seed") for k in SOURCE_KINDS}
        for kind, rows_k in by_kind.items():
            row[f"{kind}_shift"], row[f"{kind}_shift_ci"] = _mean_ci(rows_k.prediction_shift)
            row[f"{kind}_flip"], row[f"{kind}_flip_ci"] = _mean_ci(rows_k.flip_rate)
            row[f"{kind}_accuracy"], row[f"{kind}_accuracy_ci"] = _mean_ci(
                rows_k.test_accuracy)
        paired = by_kind["biased"].prediction_shift - by_kind["clean"].prediction_shift
        row["difference"], row["difference_ci"] = _mean_ci(paired)
        classes = by_kind["biased"].shift_class
        row["biased_shift_class"] = int(classes.mode().iloc[0]) if len(classes) else -1
        row["n"] = int(paired.notna().sum())
        rows.append(row)
    summary = pd.DataFrame(rows)
    for k, ref in order.items():
        summary[k] = pd.Categorical(summary[k], _order(summary[k], ref), ordered=True)
    return summary.sort_values(["target_data", "mode", "shots"]).reset_index(drop=True)


def _pm(mean: float, ci: float) -> str:
    return "–" if pd.isna(mean) else f"{mean:.3f}" + ("" if pd.isna(ci) else f" ± {ci:.3f}")


def _debias_text(table: pd.DataFrame) -> str:
    """The de-biased target's share, from its runs (standard-target rows have none)."""
    shares = table.loc[table.target_data == "de-biased", "debias_share"].dropna()
    return ("" if shares.empty else f"; de-biased target: the feature on {shares.iloc[0]:g} "
            "of every class's training images")


def bias_summary_markdown(summary: pd.DataFrame, table: pd.DataFrame) -> str:
    """The summary as a markdown page."""
    r = table.iloc[0]
    lines = [f"# Bias transfer: {r.source_task} → {r.target_task}", "",
             f"Feature: {r.feature} on every training image of {_classes_text(r)} "
             f"(labels kept){_debias_text(table)}. Prediction shift = max over target "
             "classes c of P(pred(x+feature) = c) − P(pred(x) = c), over test images not of "
             "class c; "
             "flip rate = the share of those images whose prediction moves to that c when "
             "the feature is added (what Salman et al. plot as attack success rate). "
             "Mean ± 95% t half-width over seeds (n); the difference is paired by seed.", "",
             "| target data | mode | images/class | biased shift | clean shift | "
             "difference | biased flip rate | clean flip rate | biased acc | clean acc | "
             "shift class | n |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary.itertuples():
        lines.append(f"| {s.target_data} | {s.mode} | {s.images_per_class} | "
                     f"{_pm(s.biased_shift, s.biased_shift_ci)} | "
                     f"{_pm(s.clean_shift, s.clean_shift_ci)} | "
                     f"{_pm(s.difference, s.difference_ci)} | "
                     f"{_pm(s.biased_flip, s.biased_flip_ci)} | "
                     f"{_pm(s.clean_flip, s.clean_flip_ci)} | "
                     f"{_pm(s.biased_accuracy, s.biased_accuracy_ci)} | "
                     f"{_pm(s.clean_accuracy, s.clean_accuracy_ci)} | "
                     f"{s.biased_shift_class} | {s.n} |")
    return "\n".join(lines) + "\n"


def make_bias_report(folder: str | Path, out: str | Path) -> list[Path]:
    """Write the figure, bias_summary.csv and bias_summary.md into `out` from the study's
    table (`folder`: its results folder, or a table `read_bias_table` reads); return their
    paths."""
    table = read_bias_table(folder)
    out = Path(out)
    fig, _ = bias_shift_figure(table)
    figure = save_figure(fig, out / FIGURE)
    summary = bias_summary(table)
    with atomic_path(out / SUMMARY_CSV) as tmp:
        summary.to_csv(tmp, index=False)
    atomic_write_text(out / SUMMARY_MD, bias_summary_markdown(summary, table))
    return [figure, out / SUMMARY_CSV, out / SUMMARY_MD]
