"""Does a certificate transfer? Figure and summary of a grid run with a `certify:` section.

From the results table (the final-epoch rows carry `certified_accuracy_r<radius>`, `acr`,
`abstain_rate`, `noise_accuracy`; `transfer.certify_eval`) and the source table
(`transfer.certify_study.certify_sources`: the sources certified on their own task):

- Figure C1: certified accuracy vs L2 radius; the first panel the sources on their own task,
  then one panel per (unfrozen blocks, fine-tuning noise): one colour per source treatment,
  one line style per images-per-class value, error bars the 95% t-interval over seeds.
- certify_summary.md: per setting, each source's certified accuracy at each radius and ACR
  (mean ± 95% CI half-width, n seeds) and ACR's paired difference to the natural source
  (same seed: same k-shot images, same head initialisation, same certification noise).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from robust_transfer.atomic import atomic_write_text  # noqa: E402
from robust_transfer.errors import UserError  # noqa: E402
from robust_transfer.report.common import legend_below, save_figure  # noqa: E402
from robust_transfer.report.stats import summarise  # noqa: E402
from robust_transfer.report.study import (  # noqa: E402
    PAIR_KEYS,
    _blocks_title,
    _cell,
    _shots_key,
    is_natural,
    prepare,
    source_label,
)
from robust_transfer.transfer.certify_eval import PREFIX  # noqa: E402

SETTING = ["unfrozen_blocks", "noise_sigma"]
STYLES = ["-", "--", ":", "-."]


def radius_columns(df: pd.DataFrame) -> list[tuple[float, str]]:
    """(radius, column) of the certified-accuracy columns, by radius."""
    cols = [c for c in df.columns if c.startswith(PREFIX)]
    return sorted((float(c[len(PREFIX):]), c) for c in cols)


def certified_final(results: pd.DataFrame) -> pd.DataFrame:
    """The prepared final-epoch rows that carry certificates (`report.study.prepare`)."""
    if "acr" not in results:
        raise UserError("the results hold no certification columns; run a grid spec with a "
                        "certify: section (e.g. robust-transfer certify-transfer)")
    df = prepare(results)
    final = df[(df.epoch == df.epochs) & df.acr.notna()]
    return final.assign(images_per_class=final.images_per_class.astype(str))


def label_sources(sources: pd.DataFrame) -> pd.DataFrame:
    """The source table with the report's `source` labels."""
    s = sources.copy()
    for col, default in (("source_distill", ""), ("source_backdoor", ""),
                         ("source_sigma", 0.0)):
        s[col] = s[col].fillna(default) if col in s else default
    s["source"] = [source_label(e, n, m, d, b, g) for e, n, m, d, b, g in zip(
        s.source_eps, s.source_norm, s.source_method, s.source_distill, s.source_backdoor,
        s.source_sigma, strict=True)]
    return s


def _order(labels) -> list[str]:
    return sorted(set(labels), key=lambda s: (s != "natural", s))


def paired_acr_delta(final: pd.DataFrame) -> pd.DataFrame:
    """ACR of each non-natural source minus the natural source's, paired on `PAIR_KEYS`."""
    natural = final[is_natural(final)][[*PAIR_KEYS, "acr"]]
    other = final[~is_natural(final)]
    merged = other.merge(natural, on=PAIR_KEYS, suffixes=("", "_natural"),
                         validate="many_to_one")
    return merged.assign(delta=merged.acr - merged.acr_natural)


def certify_transfer_figure(final: pd.DataFrame, sources: pd.DataFrame, title: str = ""):
    radii = radius_columns(final)
    settings = sorted(final.groupby(SETTING).groups, key=lambda s: (s[0] == "all", s[0], s[1]))
    names = _order([*final.source, *sources.source])
    colors = {s: plt.cm.tab10(i % 10) for i, s in enumerate(names)}
    shots = sorted(final.images_per_class.unique(), key=_shots_key)
    n = len(settings) + 1
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.7 * rows + 0.8),
                             squeeze=False, sharey=True)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    ax = axes.flat[0]
    rs = [r for r, _ in radii]
    for s in names:
        part = sources[sources.source == s]
        if len(part):
            ax.plot(rs, [part[c].mean() for _, c in radii], marker="o", ms=3, color=colors[s],
                    lw=2, label=s)
    ax.set_title(f"sources on {sources.source_task.iloc[0]} (before transfer)", fontsize=10)
    for ax, (blocks, noise) in zip(axes.flat[1:], settings, strict=False):
        part = final[(final.unfrozen_blocks == blocks) & (final.noise_sigma == noise)]
        for s in names:
            for style, k in zip(STYLES, shots, strict=False):
                cell = part[(part.source == s) & (part.images_per_class == k)]
                if cell.empty:
                    continue
                stats = [summarise(cell.assign(_g=0), ["_g"], c).iloc[0] for _, c in radii]
                ax.errorbar(rs, [t["mean"] for t in stats], yerr=[t["ci"] for t in stats],
                            ls=style, marker="o", ms=3, capsize=2, color=colors[s], lw=1.5)
        noise_text = "no noise" if not noise else f"noise σ={noise:g}"
        ax.set_title(f"{_blocks_title(blocks)}, {noise_text} in fine-tuning", fontsize=10)
    for ax in axes.flat[:n]:
        ax.set_xlabel("L2 radius")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("certified accuracy")
    for style, k in zip(STYLES, shots, strict=False):  # line-style key, once
        axes.flat[1].plot([], [], ls=style, color="grey", label=f"{k} images/class")
    entries = legend_below(fig, axes.flat[:n], ncol=4)
    bottom = 0.06 + 0.035 * -(-entries // 4)
    fig.suptitle(title or "Certified accuracy after transfer (95% CI over seeds)", fontsize=11)
    fig.tight_layout(rect=(0, bottom, 1, 0.97))
    return fig


def certify_summary_markdown(final: pd.DataFrame, sources: pd.DataFrame) -> str:
    radii = radius_columns(final)
    sigma = final.certify_sigma.iloc[0]
    head = " | ".join(f"r={r:g}" for r, _ in radii)
    lines = [f"# Does a certificate transfer? σ = {sigma:g} (randomized smoothing, Cohen et "
             "al. 2019)", "",
             "Approximate certified accuracy at each L2 radius and average certified radius "
             "(ACR) of the smoothed classifier; mean ± 95% t half-width (n seeds). "
             "Δ ACR = source − natural source, paired by seed.", "",
             f"## Sources on {sources.source_task.iloc[0]} (before transfer)", "",
             f"| source | {head} | ACR | abstain | acc. under noise |",
             "|" + "---|" * (len(radii) + 4)]
    for s in _order(sources.source):
        r = sources[sources.source == s].iloc[0]
        cells = " | ".join(f"{r[c]:.3f}" for _, c in radii)
        lines.append(f"| {s} | {cells} | {r.acr:.3f} | {r.abstain_rate:.3f} | "
                     f"{r.noise_accuracy:.3f} |")
    delta = paired_acr_delta(final)
    for (blocks, noise), part in sorted(final.groupby(SETTING), key=lambda g: (
            g[0][0] == "all", g[0][0], g[0][1])):
        noise_text = "no noise" if not noise else f"Gaussian noise σ={noise:g}"
        lines += ["", f"## {part.source_task.iloc[0]} → {part.target_task.iloc[0]}: "
                  f"{_blocks_title(blocks)}, {noise_text} in fine-tuning", "",
                  f"| images/class | source | {head} | ACR | Δ ACR vs natural | "
                  "clean acc. |", "|" + "---|" * (len(radii) + 5)]
        for k in sorted(part.images_per_class.unique(), key=_shots_key):
            for s in _order(part.source):
                cell = part[(part.images_per_class == k) & (part.source == s)].assign(_g=0)
                d = delta[(delta.unfrozen_blocks == blocks) & (delta.noise_sigma == noise) &
                          (delta.images_per_class == k) & (delta.source == s)].assign(_g=0)
                certs = " | ".join(_cell(summarise(cell, ["_g"], c)) for _, c in radii)
                dcell = "–" if d.empty else _cell(summarise(d, ["_g"], "delta"), signed=True)
                lines.append(f"| {k} | {s} | {certs} | {_cell(summarise(cell, ['_g'], 'acr'))}"
                             f" | {dcell} | {_cell(summarise(cell, ['_g'], 'test_accuracy'))} |")
    return "\n".join(lines) + "\n"


def make_certify_report(results: pd.DataFrame, sources: pd.DataFrame, out: str | Path
                        ) -> list[Path]:
    """Figure C1 and certify_summary.md into `out`; their paths."""
    final, sources = certified_final(results), label_sources(sources)
    out = Path(out)
    fig = certify_transfer_figure(final, sources)
    paths = [save_figure(fig, out / "figC1_certified_accuracy.png")]
    atomic_write_text(out / "certify_summary.md", certify_summary_markdown(final, sources))
    return [*paths, out / "certify_summary.md"]


def certify_headline_rows(results: pd.DataFrame) -> list[dict]:
    """Mean ACR per setting (unfrozen blocks, images per class, noise) and source."""
    final = certified_final(results)
    rows = []
    for (b, k, noise), part in sorted(final.groupby(["unfrozen_blocks", "images_per_class",
                                                     "noise_sigma"]),
                                      key=lambda g: (g[0][0] == "all", g[0][0],
                                                     _shots_key(g[0][1]), g[0][2])):
        row = {"blocks": b, "images/class": k, "noise": f"{noise:g}"}
        for s in _order(part.source):
            row[f"ACR {s}"] = float(part[part.source == s].acr.mean())
        rows.append(row)
    return rows
