"""Backdoor survival under model updates: the figure, summary and headline rows, from the
table of the `backdoor-updates` study (`studies.updates`; never retraining).

Figure U1: one column per drift kind (and update schedule, when several), three rows — ASR of
the trigger, C-Acc on the original test set, C-Acc under the current drift — against the
update index (0 = the poisoned model before any update). One colour per drift strength, one
line style per LR schedule; bands are 95% t-intervals over seeds (`report.stats.summarise`).
The dotted line is chance, 1/K.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from robust_transfer.atomic import atomic_write_text  # noqa: E402
from robust_transfer.report.common import legend_below, save_figure  # noqa: E402
from robust_transfer.report.stats import summarise  # noqa: E402
from robust_transfer.studies.updates import SurvivalStudy  # noqa: E402
from robust_transfer.transfer.results import read_results  # noqa: E402

ROWS = (("asr", "ASR (triggered test images → target)"),
        ("drift_asr", "ASR, current distribution"),
        ("test_accuracy", "C-Acc, original test set"),
        ("drift_accuracy", "C-Acc, current distribution"))


def _rows(df: pd.DataFrame) -> list[tuple[str, str]]:
    """The metrics the table holds (tables written before `drift_asr` existed lack it)."""
    return [(metric, name) for metric, name in ROWS if metric in df]


# The columns of tables written before the study ran on the one runner (`survival.parquet`),
# by their names in the grid's vocabulary.
OLD_NAMES = {"task": "source_task", "attack": "source_backdoor",
             "images_per_update": "train_images", "epochs_per_update": "epochs",
             "peak_lr": "lr", "clean_accuracy": "test_accuracy"}


def current_names(df: pd.DataFrame) -> pd.DataFrame:
    """A survival table with today's column names (an old one's renamed by `OLD_NAMES`)."""
    return df.rename(columns={k: v for k, v in OLD_NAMES.items() if k in df})


STYLES = {"constant": "-", "triangular": "--"}
ASR_THRESHOLD = 0.5  # "survives" while the mean ASR is at least this (Li et al.'s survivability)


def strength_label(strength: float) -> str:
    return "strength 0 (no drift)" if strength == 0 else f"strength {strength:g}"


def lr_label(part: pd.DataFrame) -> str:
    """'constant LR 0.01' or 'triangular LR, peak 0.1', from a run's rows."""
    schedule, lr = part.lr_schedule.iloc[0], float(part.lr.iloc[0])
    return f"constant LR {lr:g}" if schedule == "constant" else f"triangular LR, peak {lr:g}"


def line_label(strength: float, part: pd.DataFrame) -> str:
    return f"{strength_label(strength)}, {lr_label(part)}"


def _columns(df: pd.DataFrame) -> list[tuple[str, str]]:
    schedules = list(df.sort_values("train_images").schedule.unique())
    return [(d, s) for d in df.drift.unique() for s in schedules]


def _title(df: pd.DataFrame, n_text: str) -> str:
    r = df.iloc[0]
    return (f"Fig. U1 — does a one-shot {r.source_backdoor} backdoor survive model updates? "
            f"({r.source_task}, poison rate {r.poison_rate:g}, target {r.target}, "
            f"{int(r.updates)} updates)\nbands: 95% t-interval over seeds ({n_text})")


def survival_figure(df: pd.DataFrame):
    """Figure U1 from a survival table: (figure, axes of shape (rows, columns)), one row per
    metric of `ROWS` the table holds."""
    df = current_names(df)
    columns, rows = _columns(df), _rows(df)
    strengths = sorted(df.strength.unique())
    colors = {s: plt.cm.viridis(0.85 * i / max(1, len(strengths) - 1))
              for i, s in enumerate(strengths)}
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(5.2 * len(columns), 3.2 * len(rows)),
                             squeeze=False, sharex=True, sharey="row")
    chance = 1 / float(df.num_classes.iloc[0])
    ns = set()
    for j, (drift, schedule) in enumerate(columns):
        col = df[(df.drift == drift) & (df.schedule == schedule)]
        for (strength, lr_schedule), part in col.groupby(["strength", "lr_schedule"], sort=True):
            for i, (metric, _name) in enumerate(rows):
                stats = summarise(part, ["update"], metric)
                ax = axes[i, j]
                ax.plot(stats["update"], stats["mean"], STYLES.get(lr_schedule, ":"), marker="o",
                        ms=3.5, color=colors[strength], label=line_label(strength, part))
                ax.fill_between(stats["update"], (stats["mean"] - stats["ci"]).clip(0, 1),
                                (stats["mean"] + stats["ci"]).clip(0, 1), color=colors[strength],
                                alpha=0.15, linewidth=0)
                lo, hi = int(stats.n.min()), int(stats.n.max())
                ns.add(f"n={lo}" if lo == hi else f"n={lo}-{hi}")
        extra = f", {schedule}" if len(set(s for _, s in columns)) > 1 else ""
        axes[0, j].set_title(f"drift: {drift}{extra}")
        axes[-1, j].set_xlabel("model update (0 = poisoned model, no update)")
        axes[-1, j].set_xticks(sorted(df["update"].unique()))
    for i, (_metric, name) in enumerate(rows):
        axes[i, 0].set_ylabel(name)
        for ax in axes[i]:
            ax.axhline(chance, color="gray", ls=":", lw=1, label=f"chance 1/K = {chance:.2f}")
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
    entries = legend_below(fig, axes[0], ncol=2)
    fig.suptitle(_title(df, ", ".join(sorted(ns))), fontsize=11)
    height = fig.get_figheight()  # the legend and the two-line title, in inches
    fig.tight_layout(rect=(0, (0.35 + 0.22 * ((entries + 1) // 2)) / height, 1,
                           1 - 0.15 / height))
    return fig, axes


def _arms(df: pd.DataFrame):
    keys = ["drift", "schedule", "strength", "lr_schedule"]
    order = df.sort_values(["drift", "train_images", "strength", "lr_schedule"])
    for key, part in order.groupby(keys, sort=False):
        yield dict(zip(keys, key, strict=True)), part


def _first_below(part: pd.DataFrame, threshold: float = ASR_THRESHOLD) -> str:
    means = part.groupby("update").asr.mean()
    below = means[means < threshold]
    return str(int(below.index.min())) if len(below) else f"> {int(means.index.max())}"


def headline_rows(df: pd.DataFrame) -> list[dict]:
    """Per arm (drift kind and strength in one column; no drift once), means over seeds after
    the last update, two decimals and short headers so that the table fits an 80-column
    terminal: ASR and C-Acc on the original test set and under the current drift ("now"), and
    "gone at": the first update whose mean ASR is below `ASR_THRESHOLD`. The update schedule
    is a column only when the table holds several."""
    df = current_names(df)
    last = int(df["update"].max())
    several = df.schedule.nunique() > 1
    rows, seen = [], set()
    for arm, part in _arms(df):
        if arm["strength"] == 0:  # no drift: the same run is listed under every drift kind
            key = (arm["schedule"], arm["lr_schedule"])
            if key in seen:
                continue
            seen.add(key)
        end = part[part["update"] == last]
        schedule, lr = part.lr_schedule.iloc[0], float(part.lr.iloc[0])
        row = {"drift": "none" if arm["strength"] == 0
               else f"{arm['drift']} {arm['strength']:g}"}
        if several:
            row["update"] = f"{int(part.train_images.iloc[0])} img x "\
                            f"{int(part.epochs.iloc[0])} ep"
        row |= {"LR": f"{'const' if schedule == 'constant' else 'tri'} {lr:g}",
                "ASR": f"{end.asr.mean():.2f}"}
        if "drift_asr" in end:
            row["ASR now"] = f"{end.drift_asr.mean():.2f}"
        row |= {"C-Acc": f"{end.test_accuracy.mean():.2f}",
                "C-Acc now": f"{end.drift_accuracy.mean():.2f}",
                "gone at": _first_below(part)}
        rows.append(row)
    return rows


def _cell(part: pd.DataFrame, metric: str) -> str:
    s = summarise(part, ["update"], metric).iloc[0]
    ci = "" if pd.isna(s.ci) else f" ± {s.ci:.3f}"
    return f"{s['mean']:.3f}{ci}"


def survival_summary_markdown(df: pd.DataFrame) -> str:
    """ASR after every update per arm (mean ± 95% t half-width over n seeds), then C-Acc."""
    df = current_names(df)
    updates = sorted(df["update"].unique())
    n = int(df.groupby(["drift", "schedule", "strength", "lr_schedule", "update"]).seed
            .nunique().min())
    lines = ["# Backdoor survival under model updates: summary", "",
             f"Mean ± 95% t-interval half-width over {n} seeds. Update 0 is the poisoned model "
             "before any update. ASR on the original test set, and on the current distribution "
             "(the trigger stamped on drifted test images); a backdoor 'survives' while the "
             f"mean ASR is at least {ASR_THRESHOLD:g}.", ""]
    for metric, name in _rows(df):
        lines += [f"## {name}", "",
                  "| drift | update schedule | strength | LR | "
                  + " | ".join(f"@{u}" for u in updates) + " |",
                  "|" + "---|" * (4 + len(updates))]
        for arm, part in _arms(df):
            cells = [_cell(part[part["update"] == u], metric) for u in updates]
            lines.append(f"| {arm['drift']} | {arm['schedule']} | {arm['strength']:g} | "
                         f"{lr_label(part)} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def make_survival_report(table: pd.DataFrame | str | Path, out: str | Path) -> list[Path]:
    """Write figU1_survival.png and survival_summary.md into `out` from a survival table (a
    study's folder, its results.parquet, or an older version's survival.parquet); return
    their paths."""
    out = Path(out)
    if not isinstance(table, pd.DataFrame):
        table = read_results(table, SurvivalStudy.required) if Path(table).is_dir() \
            else pd.read_parquet(table)
    fig, _ = survival_figure(table)
    figure = save_figure(fig, out / "figU1_survival.png")
    summary = out / "survival_summary.md"
    atomic_write_text(summary, survival_summary_markdown(table))
    return [figure, summary]
