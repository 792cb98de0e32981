"""The robust-transfer study's figures and summary, from a results table.

Figure 1 (paper's Fig. 1 analog, arXiv 2007.05869): final test accuracy vs training images per
class (log axis), one line per source, 95% t-band over seeds; below it the delta, robust minus
natural, paired by seed (same seed = same k-shot subset and head initialisation).
Figure 2: test accuracy vs fine-tuning epoch at a few-shot count, same layout.
One column per number of unfrozen blocks.

Pairing. A robust run is compared with the natural run that differs from it only in the source's
threat model: same source recipe (`SOURCE_GROUP`: task, arch and how it was trained — epochs,
lr, batch size, attack steps, seed), same fine-tune (`FINETUNE_FACETS` plus unfrozen blocks and
images per class), same seed and epoch. So n in every band is a number of seeds. A table with
several source recipes, targets, learning rates, epoch budgets or batch sizes is reported per
facet (`FACETS`): one figure set and one summary section each, never pooled.
The training method (`source_method`: pgd, fgsm, fast, free, trades) is part of a source's
treatment, like eps and norm: each (method, norm, eps) is its own line, labelled e.g.
"FAST L2 ε=0.5" (PGD-AT keeps the plain "L2 ε=0.5"), never pooled with another method's;
a source trained for randomized smoothing adds its noise level (`source_sigma`): "GAUSSIAN
σ=0.25" (eps 0, yet not natural), "SMOOTHADV L2 ε=0.5 σ=0.25". Fine-tuning noise
(`noise_sigma`) is a fine-tune facet like lr.
Natural means eps = 0 whatever the recorded norm (natural training ignores it), and not
distilled: a student distilled from a teacher (`source_distill`, e.g. "KD T=4 α=0.9 ← L2
ε=0.5") is its own source, labelled by that text, paired with the natural source of its
recipe like a robust one and never pooled with its teacher. Two eps=0
sources of one recipe are the same model trained twice: used once if their fine-tunes agree,
an error if they differ (the pairing would be ambiguous).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from robust_transfer.atomic import atomic_write_text  # noqa: E402
from robust_transfer.data.tasks import ALL, parse_shots  # noqa: E402
from robust_transfer.errors import UserError  # noqa: E402
from robust_transfer.report.common import save_figure  # noqa: E402
from robust_transfer.report.stats import summarise  # noqa: E402
from robust_transfer.transfer.finetune import FinetuneConfig  # noqa: E402
from robust_transfer.transfer.results import read_results  # noqa: E402
from robust_transfer.variables import columns, facets, names  # noqa: E402
from robust_transfer.variables import default as _default  # noqa: E402
from robust_transfer.variables import labels as variable_labels  # noqa: E402

# Which source model: runs of different recipes are never compared or pooled.
SOURCE_GROUP = ["source_task", "source_arch", "source_recipe"]
# Which fine-tuning protocol (besides blocks and shots, which are the figures' axes/columns).
# (`FinetuneConfig`'s variables declared as facets, in their declared order).
FINETUNE_FACETS = facets(FinetuneConfig)
# One set of figures (and one summary section) per facet.
FACETS = [*SOURCE_GROUP, *FINETUNE_FACETS]
# A natural and a robust run are a pair when they agree on all of these.
PAIR_KEYS = [*FACETS, "unfrozen_blocks", "images_per_class", "seed", "epoch"]
NATURAL = "natural"


def finetune_default(name: str):
    """A fine-tune variable's declared default."""
    return _default(FinetuneConfig.__dataclass_fields__[name])


def source_label(eps: float, norm: str, method: str = "pgd", distill: str = "",
                 backdoor: str = "", sigma: float = 0.0) -> str:
    """"natural", "L2 ε=0.5", "FAST L2 ε=0.5", "GAUSSIAN σ=0.25", "SMOOTHADV L2 ε=0.5
    σ=0.25", or a distilled student's own text (`source_distill`); plus " + badnets" for a
    source with a planted backdoor."""
    if distill:
        label = distill
    elif eps == 0 and method == NATURAL:
        label = NATURAL
    else:
        words = [] if method == "pgd" else [method.upper()]
        words += [f"{norm.upper()} ε={eps:g}"] if eps > 0 else []
        words += [f"σ={sigma:g}"] if sigma else []
        label = " ".join(words)
    return f"{label} + {backdoor}" if backdoor else label


def _with_method(df: pd.DataFrame) -> pd.DataFrame:
    """`source_method` filled in for rows stored before methods (natural or PGD-AT)."""
    legacy = np.where(df.source_eps == 0, NATURAL, "pgd")
    if "source_method" not in df.columns:
        return df.assign(source_method=legacy)
    return df.assign(source_method=df.source_method.where(df.source_method.notna(), legacy))


def is_natural(df: pd.DataFrame) -> pd.Series:
    """Rows of the clean natural source, the reference of every delta: eps 0, natural
    training (not e.g. gaussian), not distilled, no planted backdoor (tables from before these
    columns have none)."""
    distilled = df["source_distill"].fillna("") != "" if "source_distill" in df else False
    backdoored = df["source_backdoor"].fillna("") != "" if "source_backdoor" in df else False
    other = (df["source_method"].fillna(NATURAL) != NATURAL) if "source_method" in df else False
    return (df.source_eps == 0) & ~distilled & ~backdoored & ~other


def _blocks_title(blocks: str) -> str:
    return {"0": "head only (0 blocks)", "all": "all blocks"}.get(
        str(blocks), f"last {blocks} block(s)"
    )


def _blocks_order(values) -> list[str]:
    return sorted({str(v) for v in values}, key=lambda b: (b == "all", int(b) if b != "all" else 0))


def _shots_key(k) -> float:
    return float("inf") if k == ALL else float(k)


def _one_natural(df: pd.DataFrame) -> pd.DataFrame:
    """Keep one eps=0 source per recipe: two (e.g. recorded as l2 and linf) are the same model
    trained twice, so their fine-tunes must agree; if they differ, pairing is ambiguous."""
    natural = df[is_natural(df)]
    norms = natural.groupby(SOURCE_GROUP, dropna=False).source_norm.unique()
    twice = norms[norms.map(len) > 1]
    if twice.empty:
        return df
    drop = pd.Series(False, index=df.index)
    for group, found in twice.items():
        keep, *others = sorted(found)
        in_group = (df[SOURCE_GROUP] == pd.Series(group, index=SOURCE_GROUP)).all(axis=1)
        ref = df[in_group & is_natural(df) & (df.source_norm == keep)]
        for other in others:
            rows = df[in_group & is_natural(df) & (df.source_norm == other)]
            both = ref.merge(rows, on=PAIR_KEYS, suffixes=("", "_other"))
            if len(both) != len(rows) or not np.allclose(both.test_accuracy,
                                                         both.test_accuracy_other, atol=1e-9):
                raise UserError(
                    f"the results hold two natural (eps=0) sources of one recipe "
                    f"({group[0]}, {group[1]}, recipe {group[2]}), recorded with norms "
                    f"{keep!r} and {other!r}, whose fine-tunes differ; natural training "
                    "ignores the norm, so keep one eps=0 source per recipe"
                )
            drop |= in_group & is_natural(df) & (df.source_norm == other)
    return df[~drop]


def prepare(df: pd.DataFrame) -> pd.DataFrame:
    """Add `source` label and `shots` (numeric images per class; "all" = its mean count);
    one natural source per recipe; check that every (pair keys, source) is one row."""
    df = _with_method(df.copy())
    # Tables written before a fine-tune variable existed (augment, noise_sigma, ...): none of
    # their runs used it; nor did their sources train with noise.
    for name in names(FinetuneConfig, "finetune", id_at_default=False):
        column, value = columns(FinetuneConfig)[name], finetune_default(name)
        df[column] = (df[column].astype(object).where(df[column].notna(), value)
                      .astype(type(value)) if column in df else value)
    df["source_sigma"] = df["source_sigma"].fillna(0.0).astype(float) \
        if "source_sigma" in df else 0.0
    df["source_distill"] = (df["source_distill"].fillna("") if "source_distill" in df
                            else "")
    df["images_per_class"] = df["images_per_class"].map(parse_shots).astype(object)
    df["unfrozen_blocks"] = df["unfrozen_blocks"].astype(str)
    df["source_backdoor"] = (df["source_backdoor"].fillna("").astype(str)
                             if "source_backdoor" in df else "")
    df = _one_natural(df)
    df["source"] = [source_label(e, n, m, d, b, s) for e, n, m, d, b, s in
                    zip(df.source_eps, df.source_norm, df.source_method, df.source_distill,
                        df.source_backdoor, df.source_sigma, strict=True)]
    df["shots"] = df["train_images"] / df["target_classes"]
    dup = df.duplicated([*PAIR_KEYS, "source"], keep=False)
    if dup.any():
        r = df[dup].iloc[0]
        raise UserError(
            f"the results hold {int(dup.sum())} rows that no key tells apart (e.g. source "
            f"{r.source!r}, target {r.target_task!r}, {r.images_per_class} images/class, seed "
            f"{r.seed}, epoch {r.epoch}); cannot pair robust and natural runs"
        )
    return df


def paired_delta(df: pd.DataFrame) -> pd.DataFrame:
    """Robust minus natural accuracy, matched on `PAIR_KEYS` (source recipe, fine-tune, seed,
    epoch): one natural row per robust row, so n counts seeds. The natural reference is the
    clean natural source; a backdoored source (natural or robust) is compared with it too."""
    natural = df[is_natural(df)][PAIR_KEYS + ["test_accuracy"]]
    robust = df[~is_natural(df)]
    if natural.empty or robust.empty:
        return robust.iloc[0:0].assign(delta=[])
    merged = robust.merge(natural, on=PAIR_KEYS, suffixes=("", "_natural"),
                          validate="many_to_one")
    return merged.assign(delta=merged.test_accuracy - merged.test_accuracy_natural)


def _sources_order(df: pd.DataFrame) -> list[str]:
    """The natural source first, then by distillation, eps, norm, method, noise, backdoor."""
    first = df.drop_duplicates("source")
    order = first.assign(_treated=~is_natural(first)).sort_values(
        ["_treated", "source_distill", "source_eps", "source_norm", "source_method",
         "source_sigma", "source_backdoor"],
        key=lambda c: c.map({"pgd": ""}).fillna(c) if c.name == "source_method" else c)
    return list(order.source)


def _band(ax, x, stats: pd.DataFrame, label: str, color) -> None:
    ax.plot(x, stats["mean"], marker="o", ms=4, label=label, color=color)
    ax.fill_between(x, stats["mean"] - stats["ci"], stats["mean"] + stats["ci"],
                    alpha=0.2, color=color, linewidth=0)


def _n_text(stats: pd.DataFrame) -> str:
    lo, hi = int(stats["n"].min()), int(stats["n"].max())
    return f"n={lo} seeds" if lo == hi else f"n={lo}-{hi} seeds"


def _check_one_facet(df: pd.DataFrame) -> None:
    mixed = [f for f in FACETS if df[f].nunique(dropna=False) > 1]
    if mixed:
        raise UserError(f"one figure takes one facet; the rows mix {mixed[0]!r} "
                        f"({', '.join(map(str, df[mixed[0]].unique()))})")


def _figure(df: pd.DataFrame, x: str, xlabel: str, title: str, log_x: bool):
    """Two rows (accuracy; delta vs natural) x one column per unfrozen-blocks value."""
    _check_one_facet(df)
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
        dax.set_ylabel("Δ accuracy (source − natural)")
        dax.set_xlabel(xlabel)
        dax.grid(alpha=0.3)
        if dpart.empty:
            dax.text(0.5, 0.5, "no natural (eps=0) source to compare", ha="center",
                     transform=dax.transAxes)
        if log_x:
            ax.set_xscale("log")
        else:  # epochs: whole numbers only
            dax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=9, loc="lower right")
        if not dpart.empty:
            dax.legend(fontsize=9, loc="upper right")
    fig.suptitle(f"{title}\nbands: 95% t-interval over seeds ({', '.join(sorted(n_texts))})",
                 fontsize=11)
    fig.tight_layout()
    return fig, axes


def _label_all_ticks(axes, df: pd.DataFrame) -> None:
    """Ticks at the grid's shot counts, the full set labelled "all (n)"."""
    ticks = df.drop_duplicates("shots")[["images_per_class", "shots"]].sort_values("shots")
    labels = [f"all\n(~{s:.0f})" if k == ALL else str(k)
              for k, s in zip(ticks.images_per_class, ticks.shots, strict=True)]
    for ax in axes.flat:
        ax.set_xticks(list(ticks.shots), labels)
        ax.minorticks_off()


def recipe_text(part: pd.DataFrame) -> str:
    """How the facet's sources were trained, for titles and the summary."""
    r = part.iloc[0]
    bits = [str(r.source_arch)]
    if r.get("source_epochs", -1) >= 0:
        bits.append(f"{int(r.source_epochs)} epochs")
    if "source_lr" in r and pd.notna(r.source_lr):
        bits.append(f"lr {r.source_lr:g}")
    if r.get("source_attack_steps", -1) >= 0:
        bits.append(f"{int(r.source_attack_steps)} PGD steps")
    if "source_seed" in r and pd.notna(r.source_seed):
        bits.append(f"seed {int(r.source_seed)}")
    return f"{r.source_task} ({', '.join(bits)}; recipe {r.source_recipe})"


def _recipes_named(df: pd.DataFrame) -> bool:
    """Whether source task and arch alone do not tell the table's source recipes apart."""
    return bool(df.groupby(["source_task", "source_arch"]).source_recipe.nunique().max() > 1)


def _facet_title(part: pd.DataFrame, table: pd.DataFrame | None = None) -> str:
    """"source → target" for one facet, with the arch when the table's archs differ."""
    r = part.iloc[0]
    table = part if table is None else table
    source = str(r.source_task)
    if table.source_arch.nunique() > 1:
        source += f" ({r.source_arch})"
    # the labelled fine-tune variables away from their default, e.g. "noise σ=0.25"
    used = [f", fine-tuned with {label}={r[column]:g}" for column, label in
            variable_labels(FinetuneConfig).items() if column in r and r[column] != 0]
    return f"{source} → {r.target_task}{''.join(used)}"


def _recipe_note(part: pd.DataFrame, table: pd.DataFrame, sep: str) -> str:
    """`sep` + the facet's source recipe, when task and arch do not tell the table's recipes
    apart ("" otherwise)."""
    return f"{sep}[sources: {recipe_text(part)}]" if _recipes_named(table) else ""


def accuracy_vs_images_figure(final: pd.DataFrame, title: str | None = None):
    """Fig. 1 for one facet's final-epoch rows (prepared): returns (figure, axes)."""
    title = title or f"Fig. 1 — fine-tuning {_facet_title(final)}: accuracy vs data"
    fig, axes = _figure(final, "shots", "training images per class (log scale)", title,
                        log_x=True)
    _label_all_ticks(axes, final)
    return fig, axes


def accuracy_vs_epochs_figure(part: pd.DataFrame, shots, title: str | None = None):
    """Fig. 2 for one facet's rows (prepared) at `shots` images per class: (figure, axes)."""
    shots = parse_shots(shots)
    sub = part[part.images_per_class == shots]
    if sub.empty:
        present = sorted(part.images_per_class.unique(), key=_shots_key)
        raise UserError(f"no runs with {shots} images per class; the table has "
                        f"{', '.join(map(str, present))}")
    title = title or (f"Fig. 2 — {_facet_title(part)}, {shots} image(s) per class: "
                      "accuracy vs epochs")
    return _figure(sub, "epoch", "fine-tuning epoch", title, log_x=False)


@dataclass
class StudyReport:
    figures: list[Path]
    summary: Path
    runs: int = 0  # fine-tunes in the table


def _final_epoch(df: pd.DataFrame) -> pd.DataFrame:
    return df[df.epoch == df.epochs]


def _facets(df: pd.DataFrame):
    """(facet values, rows) per facet, in a stable order."""
    return df.groupby(FACETS, sort=True, dropna=False)


def summary_markdown(df: pd.DataFrame) -> str:
    """Final-epoch accuracy per source (mean ± 95% CI half-width, n) and paired deltas."""
    final = _final_epoch(df)
    delta = paired_delta(final)
    lines = ["# Robust transfer study: summary", "",
             "Final-epoch test accuracy, mean ± 95% t-interval half-width over seeds (n). "
             "Δ = source − clean natural source, paired by seed (same images, same new "
             "head) within one source recipe and fine-tune.", ""]
    for facet, part in _facets(final):
        values = dict(zip(FACETS, facet, strict=True))
        lr, epochs, batch_size = values["lr"], values["epochs"], values["batch_size"]
        sources = _sources_order(part)
        robust = [s for s in sources if s != NATURAL] if NATURAL in sources else []
        head = ["unfrozen blocks", "images/class", *sources, *(f"Δ {s}" for s in robust)]
        bs = f", batch {batch_size}" if df.batch_size.nunique() > 1 else ""
        if values["augment"]:
            bs += ", augmented"
        title = f"{_facet_title(part, df)}{_recipe_note(part, df, ' ')}"
        lines += [f"## {title} (lr {lr:g}, {epochs} epochs{bs})", "",
                  f"Sources: {recipe_text(part)}.", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        in_facet = (delta[FACETS] == pd.Series(facet, index=FACETS)).all(axis=1)
        dpart = delta[in_facet]
        for b in _blocks_order(part.unfrozen_blocks):
            shots = part[part.unfrozen_blocks == b].sort_values("shots")
            for k in shots.images_per_class.unique():
                cells = [b, str(k)]
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
    """Final-epoch mean accuracy per (facet, unfrozen blocks, images per class) and source."""
    final = _final_epoch(prepare(read_results(results)))
    varying = [f for f in FACETS if final[f].nunique() > 1 or f == "target_task"]
    if "source_recipe" in varying:
        varying = ["source_task", *(f for f in varying if f != "source_task")]
    rows = []
    for key, part in final.groupby([*varying, "unfrozen_blocks", "shots"], sort=True):
        row = dict(zip(varying, key[: len(varying)], strict=True))
        row |= {"unfrozen blocks": key[-2], "images/class": str(part.images_per_class.iloc[0])}
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


def make_report(results: str | Path, out: str | Path, epoch_shots: list | None = None
                ) -> StudyReport:
    """Write Figure 1, Figure 2 and summary.md for a results table into `out`.

    `epoch_shots`: images-per-class values for Figure 2 (default: the smallest in the table).
    """
    df = prepare(read_results(results))
    wanted = None if not epoch_shots else [parse_shots(k) for k in epoch_shots]
    out = Path(out)
    figures = []
    for facet, part in _facets(df):
        suffix = _facet_suffix(df, facet)
        name, note = _facet_title(part, df), _recipe_note(part, df, "\n")
        fig, _ = accuracy_vs_images_figure(
            _final_epoch(part), f"Fig. 1 — fine-tuning {name}: accuracy vs data{note}")
        figures.append(save_figure(fig, out / f"fig1_accuracy_vs_images{suffix}.png"))
        present = set(part.images_per_class)
        for k in wanted or [min(present, key=_shots_key)]:
            if k not in present:
                continue
            fig, _ = accuracy_vs_epochs_figure(
                part, k, f"Fig. 2 — {name}, {k} image(s) per class: accuracy vs epochs{note}")
            figures.append(save_figure(fig, out / f"fig2_accuracy_vs_epochs_k{k}{suffix}.png"))
    summary = out / "summary.md"
    atomic_write_text(summary, summary_markdown(df))
    return StudyReport(figures, summary, int(df.run_id.nunique()))


def _facet_suffix(df: pd.DataFrame, facet: tuple) -> str:
    """File-name suffix naming the facet values that vary in the table ("" if none do); a
    source recipe is named by its task and arch when those tell the recipes apart, else also
    by its id."""
    values = dict(zip(FACETS, facet, strict=True))
    labels = {"source_task": "", "source_arch": "", "target_task": "", "lr": "lr",
              "epochs": "epochs", "batch_size": "bs", "noise_sigma": "noise"}
    parts = []
    for name in FACETS:
        if name == "augment":
            if df[name].nunique() > 1:
                parts.append("_augment" if values[name] else "_noaugment")
            continue
        if name == "source_recipe":
            if _recipes_named(df):
                parts.append(f"_recipe{values[name]}")
            continue
        if df[name].nunique() > 1:
            value = values[name]
            text = f"{value:g}" if isinstance(value, float) else str(value)
            parts.append(f"_{labels.get(name, name)}{text}")
    return "".join(parts)
