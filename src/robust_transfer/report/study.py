"""The robust-transfer study's figures and summary, from a results table.

Figure 1 (paper's Fig. 1 analog): final test accuracy vs training images per class (log
axis), one line per source eps, 95% t-band over seeds; below it the delta, robust minus
natural, paired by seed (same seed = same k-shot subset and head initialisation).
Figure 2: test accuracy vs fine-tuning epoch at a few-shot count, same layout.
One column per number of unfrozen blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from robust_transfer.atomic import atomic_write_text  # noqa: E402
from robust_transfer.report.common import save_figure  # noqa: E402
from robust_transfer.report.stats import summarise  # noqa: E402
from robust_transfer.transfer.results import read_results  # noqa: E402

# One set of figures (and one summary section) per facet: runs that differ only in source,
# shots, unfrozen blocks, seed and epoch are comparable within it.
FACETS = ["target_task", "lr", "epochs"]
PAIR_KEYS = [*FACETS, "unfrozen_blocks", "images_per_class", "seed", "epoch"]


def source_label(eps: float, norm: str) -> str:
    return "natural" if eps == 0 else f"{norm.upper()} ε={eps:g}"


def _blocks_title(blocks: str) -> str:
    return {"0": "head only (0 blocks)", "all": "all blocks"}.get(
        str(blocks), f"last {blocks} block(s)"
    )


def _blocks_order(values) -> list[str]:
    return sorted({str(v) for v in values}, key=lambda b: (b == "all", int(b) if b != "all" else 0))


def prepare(df: pd.DataFrame) -> pd.DataFrame:
    """Add `source` label and `shots` (numeric images per class; "all" = its mean count)."""
    df = df.copy()
    df["images_per_class"] = df["images_per_class"].astype(str)
    df["unfrozen_blocks"] = df["unfrozen_blocks"].astype(str)
    df["source"] = [source_label(e, n) for e, n in zip(df.source_eps, df.source_norm, strict=True)]
    df["shots"] = df["train_images"] / df["target_classes"]
    return df


def paired_delta(df: pd.DataFrame) -> pd.DataFrame:
    """Robust minus natural accuracy, matched on everything but the source (incl. seed)."""
    natural = df[df.source_eps == 0][PAIR_KEYS + ["test_accuracy"]]
    robust = df[df.source_eps > 0]
    if natural.empty or robust.empty:
        return robust.iloc[0:0].assign(delta=[])
    merged = robust.merge(natural, on=PAIR_KEYS, suffixes=("", "_natural"))
    return merged.assign(delta=merged.test_accuracy - merged.test_accuracy_natural)


def _sources_order(df: pd.DataFrame) -> list[str]:
    order = df.drop_duplicates("source").sort_values(["source_eps", "source_norm"])
    return list(order.source)


def _band(ax, x, stats: pd.DataFrame, label: str, color) -> None:
    ax.plot(x, stats["mean"], marker="o", ms=4, label=label, color=color)
    ax.fill_between(x, stats["mean"] - stats["ci"], stats["mean"] + stats["ci"],
                    alpha=0.2, color=color, linewidth=0)


def _n_text(stats: pd.DataFrame) -> str:
    lo, hi = int(stats["n"].min()), int(stats["n"].max())
    return f"n={lo} seeds" if lo == hi else f"n={lo}-{hi} seeds"


def _figure(df: pd.DataFrame, x: str, xlabel: str, title: str, log_x: bool):
    """Two rows (accuracy; delta vs natural) x one column per unfrozen-blocks value."""
    blocks = _blocks_order(df.unfrozen_blocks)
    sources = _sources_order(df)
    colors = {s: plt.cm.viridis(i / max(1, len(sources) - 1) * 0.85) for i, s in
              enumerate(sources)}
    delta = paired_delta(df)
    fig, axes = plt.subplots(2, len(blocks), figsize=(5.2 * len(blocks), 7.5), squeeze=False,
                             sharex=True)
    n_texts = set()
    for col, b in enumerate(blocks):
        ax, dax = axes[0, col], axes[1, col]
        part = df[df.unfrozen_blocks == b]
        for s in sources:
            stats = summarise(part[part.source == s], [x], "test_accuracy")
            if not stats.empty:
                _band(ax, stats[x], stats, s, colors[s])
                n_texts.add(_n_text(stats))
        ax.set_title(_blocks_title(b))
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        dpart = delta[delta.unfrozen_blocks == b]
        for s in sources:
            stats = summarise(dpart[dpart.source == s], [x], "delta")
            if not stats.empty:
                _band(dax, stats[x], stats, f"{s} − natural", colors[s])
        dax.axhline(0, color="black", lw=0.8)
        dax.set_ylabel("Δ accuracy (robust − natural)")
        dax.set_xlabel(xlabel)
        dax.grid(alpha=0.3)
        if dpart.empty:
            dax.text(0.5, 0.5, "no natural (eps=0) source to compare", ha="center",
                     transform=dax.transAxes)
        if log_x:
            ax.set_xscale("log")
        ax.legend(fontsize=9, loc="lower right")
        if not dpart.empty:
            dax.legend(fontsize=9, loc="upper right")
    fig.suptitle(f"{title}\nbands: 95% t-interval over seeds ({', '.join(sorted(n_texts))})",
                 fontsize=11)
    fig.tight_layout()
    return fig, axes


def _label_all_ticks(axes, df: pd.DataFrame) -> None:
    """Ticks at the grid's shot counts, the full set labelled "all (n)"."""
    ticks = df.drop_duplicates("images_per_class")[["images_per_class", "shots"]]
    ticks = ticks.sort_values("shots")
    labels = [f"all\n(~{s:.0f})" if k == "all" else k for k, s in zip(ticks.images_per_class,
                                                                         ticks.shots, strict=True)]
    for ax in axes.flat:
        ax.set_xticks(list(ticks.shots), labels)
        ax.minorticks_off()


@dataclass
class StudyReport:
    figures: list[Path]
    summary: Path


def _final_epoch(df: pd.DataFrame) -> pd.DataFrame:
    return df[df.epoch == df.epochs]


def summary_markdown(df: pd.DataFrame) -> str:
    """Final-epoch accuracy per source (mean ± 95% CI half-width, n) and paired deltas."""
    final = _final_epoch(df)
    delta = paired_delta(final)
    lines = ["# Robust transfer study: summary", "",
             "Final-epoch test accuracy, mean ± 95% t-interval half-width over seeds (n).", ""]
    for (target, lr, epochs), part in final.groupby(FACETS):
        sources = _sources_order(part)
        robust = [s for s in sources if s != "natural"] if "natural" in sources else []
        head = ["unfrozen blocks", "images/class", *sources, *(f"Δ {s}" for s in robust)]
        lines += [f"## {part.source_task.iloc[0]} → {target} (lr {lr:g}, {epochs} epochs)", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        dpart = delta[(delta.target_task == target) & (delta.lr == lr)
                      & (delta.epochs == epochs)]
        for b in _blocks_order(part.unfrozen_blocks):
            shots = part[part.unfrozen_blocks == b].sort_values("shots")
            for k in shots.images_per_class.unique():
                cells = [b, k]
                for s in sources:
                    v = summarise(part[(part.unfrozen_blocks == b) & (part.images_per_class == k)
                                       & (part.source == s)], ["source"], "test_accuracy")
                    cells.append(_cell(v))
                for s in robust:
                    v = summarise(dpart[(dpart.unfrozen_blocks == b)
                                        & (dpart.images_per_class == k)
                                        & (dpart.source == s)], ["source"], "delta")
                    cells.append(_cell(v, signed=True))
                lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def headline_rows(results: str | Path) -> list[dict]:
    """Final-epoch mean accuracy per (target, unfrozen blocks, images per class) and source."""
    final = _final_epoch(prepare(read_results(results)))
    varying = [f for f in FACETS if final[f].nunique() > 1 or f == "target_task"]
    rows = []
    for key, part in final.groupby([*varying, "unfrozen_blocks", "shots"], sort=True):
        row = dict(zip(varying, key[: len(varying)], strict=True))
        row |= {"unfrozen blocks": key[-2], "images/class": part.images_per_class.iloc[0]}
        for s in _sources_order(part):
            row[s] = float(part[part.source == s].test_accuracy.mean())
        rows.append(row)
    return rows


def _cell(stats: pd.DataFrame, signed: bool = False) -> str:
    if stats.empty:
        return "–"
    r = stats.iloc[0]
    sign = "+" if signed else ""
    ci = "" if pd.isna(r.ci) else f" ± {r.ci:.3f}"
    return f"{r['mean']:{sign}.3f}{ci} ({int(r.n)})"


def make_report(results: str | Path, out: str | Path, epoch_shots: list[str] | None = None
                ) -> StudyReport:
    """Write Figure 1, Figure 2 and summary.md for a results table into `out`.

    `epoch_shots`: images-per-class values for Figure 2 (default: the smallest in the table).
    """
    df = prepare(read_results(results))
    out = Path(out)
    figures = []
    for facet, part in df.groupby(FACETS):
        target, _lr, _epochs = facet
        suffix = _facet_suffix(df, facet)
        source_task = part.source_task.iloc[0]
        final = _final_epoch(part)
        fig, axes = _figure(final, "shots", "training images per class (log scale)",
                            f"Fig. 1 — fine-tuning {source_task} → {target}: accuracy vs data",
                            log_x=True)
        _label_all_ticks(axes, final)
        figures.append(save_figure(fig, out / f"fig1_accuracy_vs_images{suffix}.png"))
        shots = epoch_shots or [min(part.images_per_class.unique(), key=_shots_key)]
        for k in shots:
            sub = part[part.images_per_class == str(k)]
            if sub.empty:
                continue
            fig, _ = _figure(sub, "epoch", "fine-tuning epoch",
                             f"Fig. 2 — {source_task} → {target}, {k} image(s) per class: "
                             "accuracy vs epochs", log_x=False)
            figures.append(save_figure(fig, out / f"fig2_accuracy_vs_epochs_k{k}{suffix}.png"))
    summary = out / "summary.md"
    atomic_write_text(summary, summary_markdown(df))
    return StudyReport(figures, summary)


def _facet_suffix(df: pd.DataFrame, facet: tuple) -> str:
    """File-name suffix naming the facet values that vary in the table ("" if none do)."""
    labels = {"target_task": "", "lr": "lr", "epochs": "epochs"}
    return "".join(
        f"_{labels[name]}{value:g}" if isinstance(value, float) else f"_{labels[name]}{value}"
        for name, value in zip(FACETS, facet, strict=True) if df[name].nunique() > 1
    )


def _shots_key(k: str) -> float:
    return float("inf") if k == "all" else float(k)
