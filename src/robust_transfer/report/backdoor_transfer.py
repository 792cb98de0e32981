"""Does a source's backdoor survive transfer? Figures and a summary from a results table.

For grids whose sources carry backdoors (BadNets poisoning, NeuBA; `transfer.backdoor_eval`
adds the columns), after the final fine-tuning epoch:

- Figure B1: task-agnostic ASR vs training images per class (log axis), one column per number
  of unfrozen blocks;
- Figure B2: ASR vs unfrozen blocks, one column per images-per-class value.

One line per backdoored source (its own backdoor's ASR; NeuBA: the max over its triggers)
and, as the baseline, one per clean source and probed trigger (the same triggers on a
source that never saw them). Bands: 95% t-intervals over seeds (`report.stats.summarise`).
The dotted line is 1/K: a task-agnostic ASR never falls below it (the most common predicted
label takes at least that share), so a clean source sits near it, not at 0.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from robust_transfer.atomic import atomic_write_text  # noqa: E402
from robust_transfer.data.tasks import ALL  # noqa: E402
from robust_transfer.report.common import legend_below, save_figure  # noqa: E402
from robust_transfer.report.stats import summarise  # noqa: E402
from robust_transfer.report.study import FACETS, _blocks_order, _blocks_title, prepare  # noqa: E402
from robust_transfer.transfer.results import read_results  # noqa: E402

VALUE = "value"


def has_backdoor_columns(df: pd.DataFrame) -> bool:
    """Whether the table holds backdoor-transfer columns (some source probed by a trigger)."""
    return "source_backdoor" in df and any(c.startswith("asr_") for c in df.columns)


def _probes(df: pd.DataFrame) -> list[str]:
    """Probed backdoors (column stems P of `asr_P`), without per-trigger columns."""
    stems = [c[4:] for c in df.columns if c.startswith("asr_")]
    return [p for p in stems if not any(p.startswith(f"{q}_") and p[len(q) + 1:].isdigit()
                                        for q in stems)]


def asr_lines(final: pd.DataFrame, metric: str = "asr") -> pd.DataFrame:
    """Long table of `metric` ("asr" or "ra"), one row per final-epoch run and line: a
    backdoored source's own backdoor, or a clean source under each probed trigger."""
    backdoored = final[(final.source_backdoor != "") & final[metric].notna()]
    parts = [backdoored.assign(line=backdoored.source, **{VALUE: backdoored[metric]})]
    clean = final[final.source_backdoor == ""]
    for probe in _probes(final) if not clean.empty else []:
        parts.append(clean.assign(line=clean.source + f" (clean), {probe} trigger",
                                  **{VALUE: clean[f"{metric}_{probe}"]}))
    long = pd.concat(parts, ignore_index=True)
    return long[long[VALUE].notna()]


def _shots_ticks(ax, df: pd.DataFrame) -> None:
    ticks = df.drop_duplicates("shots")[["images_per_class", "shots"]].sort_values("shots")
    labels = [f"all\n(~{s:.0f})" if k == ALL else str(k)
              for k, s in zip(ticks.images_per_class, ticks.shots, strict=True)]
    ax.set_xticks(list(ticks.shots), labels)
    ax.minorticks_off()


def _n_text(stats: pd.DataFrame) -> str:
    lo, hi = int(stats["n"].min()), int(stats["n"].max())
    return f"n={lo}" if lo == hi else f"n={lo}-{hi}"


def _panels(long: pd.DataFrame, panel: str, x: str, titles, xlabel: str, title: str,
            ticks=None):
    """One panel per value of `panel`, one band per line, ASR on y."""
    panels = (_blocks_order(long[panel]) if panel == "unfrozen_blocks"
              else list(long.sort_values("shots")[panel].unique()))
    lines = sorted(long.line.unique(), key=lambda s: ("(clean)" in s, s))
    colors = {s: plt.cm.tab10(i % 10) for i, s in enumerate(lines)}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False,
                             sharey=True)
    chance = 1 / float(long.target_classes.iloc[0])
    ns = set()
    for ax, value in zip(axes[0], panels, strict=True):
        part = long[long[panel] == value]
        for line in lines:
            stats = summarise(part[part.line == line], [x], VALUE)
            if stats.empty:
                continue
            style = "--" if "(clean)" in line else "-"
            ax.plot(stats[x], stats["mean"], style, marker="o", ms=4, color=colors[line],
                    label=line)
            ax.fill_between(stats[x], stats["mean"] - stats["ci"], stats["mean"] + stats["ci"],
                            alpha=0.2, color=colors[line], linewidth=0)
            ns.add(_n_text(stats))
        ax.axhline(chance, color="gray", ls=":", lw=1, label=f"1/K = {chance:.2f}")
        ax.set_title(titles(value))
        ax.set_xlabel(xlabel)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if ticks:
            ticks(ax, part)
    axes[0, 0].set_ylabel("task-agnostic ASR (final epoch)")
    entries = legend_below(fig, axes[0], ncol=3)
    fig.suptitle(f"{title}\nbands: 95% t-interval over seeds ({', '.join(sorted(ns))} seeds)",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0.06 + 0.035 * ((entries - 1) // 3), 1, 1))
    return fig, axes


def asr_vs_images_figure(final: pd.DataFrame, title: str = "ASR vs images per class"):
    """Figure B1 for one facet's final-epoch rows (prepared): (figure, axes)."""
    long = asr_lines(final)
    return _panels(long, "unfrozen_blocks", "shots", _blocks_title,
                   "training images per class (log scale)", title,
                   ticks=lambda ax, part: (ax.set_xscale("log"), _shots_ticks(ax, part)))


def asr_vs_blocks_figure(final: pd.DataFrame, title: str = "ASR vs unfrozen blocks"):
    """Figure B2 for one facet's final-epoch rows (prepared): (figure, axes)."""
    long = asr_lines(final)
    order = _blocks_order(long.unfrozen_blocks)
    long = long.assign(block_pos=long.unfrozen_blocks.map({b: i for i, b in enumerate(order)}))

    def ticks(ax, _part):
        ax.set_xticks(range(len(order)), [("all" if b == "all" else b) for b in order])

    return _panels(long, "images_per_class", "block_pos",
                   lambda k: f"{k} image(s) per class" if k != ALL else "all images",
                   "unfrozen blocks (0 = head only)", title, ticks=ticks)


def _cell(stats: pd.DataFrame) -> str:
    if stats.empty:
        return "–"
    r = stats.iloc[0]
    ci = "" if pd.isna(r.ci) else f" ± {r.ci:.3f}"
    return f"{r['mean']:.3f}{ci} ({int(r.n)})"


def backdoor_summary_markdown(df: pd.DataFrame) -> str:
    """Final-epoch ASR (and RA) per line, mean ± 95% t half-width (n seeds), per facet."""
    final = df[df.epoch == df.epochs]
    lines = ["# Backdoor transfer: summary", "",
             "Task-agnostic ASR after the final fine-tuning epoch (share of triggered target "
             "test images sent to the most common predicted label; NeuBA: max over its "
             "triggers), mean ± 95% t-interval half-width over seeds (n). Clean sources under "
             "the same triggers are the baseline; 1/K is the floor.", ""]
    for facet, part in final.groupby(FACETS, sort=True, dropna=False):
        values = dict(zip(FACETS, facet, strict=True))
        for metric, name in (("asr", "ASR"), ("ra", "RA (triggered images still correct)")):
            long = asr_lines(part, metric)
            if long.empty:
                continue
            cols = sorted(long.line.unique(), key=lambda s: ("(clean)" in s, s))
            lines += [f"## {values['source_task']} → {values['target_task']}: {name} "
                      f"(lr {values['lr']:g}, {values['epochs']} epochs, 1/K = "
                      f"{1 / part.target_classes.iloc[0]:.2f})", "",
                      "| unfrozen blocks | images/class | " + " | ".join(cols) + " |",
                      "|" + "---|" * (len(cols) + 2)]
            for b in _blocks_order(long.unfrozen_blocks):
                in_b = long[long.unfrozen_blocks == b]
                for k in in_b.sort_values("shots").images_per_class.unique():
                    cell = in_b[in_b.images_per_class == k]
                    row = [_cell(summarise(cell[cell.line == c], ["line"], VALUE)) for c in cols]
                    lines.append(f"| {b} | {k} | " + " | ".join(row) + " |")
            lines.append("")
    return "\n".join(lines)


def make_backdoor_report(results: str | Path, out: str | Path) -> list[Path]:
    """Write Figures B1, B2 (per facet) and backdoor_summary.md into `out`; return paths
    (nothing when the table has no backdoor columns)."""
    df = prepare(read_results(results))
    if not has_backdoor_columns(df):
        return []
    out = Path(out)
    paths = []
    final = df[df.epoch == df.epochs]
    groups = list(final.groupby(FACETS, sort=True, dropna=False))
    for i, (_facet, part) in enumerate(groups):
        if asr_lines(part).empty:
            continue
        suffix = f"_{i + 1}" if len(groups) > 1 else ""
        name = f"{part.source_task.iloc[0]} → {part.target_task.iloc[0]}"
        fig, _ = asr_vs_images_figure(part, f"Fig. B1 — backdoor after transfer {name}: "
                                             "ASR vs data")
        paths.append(save_figure(fig, out / f"figB1_asr_vs_images{suffix}.png"))
        fig, _ = asr_vs_blocks_figure(part, f"Fig. B2 — backdoor after transfer {name}: "
                                            "ASR vs unfrozen blocks")
        paths.append(save_figure(fig, out / f"figB2_asr_vs_blocks{suffix}.png"))
    summary = out / "backdoor_summary.md"
    atomic_write_text(summary, backdoor_summary_markdown(df))
    return [*paths, summary]


def backdoor_headline_rows(results: str | Path) -> list[dict]:
    """Final-epoch mean ASR per (facet, unfrozen blocks, images per class) and line."""
    df = prepare(read_results(results))
    final = df[df.epoch == df.epochs]
    long = asr_lines(final)
    rows = []
    for (b, _shots), part in long.groupby(["unfrozen_blocks", "shots"], sort=True):
        row = {"unfrozen blocks": b, "images/class": str(part.images_per_class.iloc[0])}
        for line in sorted(part.line.unique(), key=lambda s: ("(clean)" in s, s)):
            row[f"ASR {line}"] = float(part[part.line == line][VALUE].mean())
        rows.append(row)
    return rows
