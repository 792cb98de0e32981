"""Defense figure: clean, naive and adaptive robust accuracy vs eps, one panel per defense.

Made from `defenses.compare_defenses`' table, so it can be re-made from the CSV. The gap
between the naive and the adaptive curve is what gradient masking hid (Athalye et al. 2018);
the undefended model's robust accuracy is drawn in every panel for reference.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from robust_transfer.report.common import save_figure  # noqa: E402

UNDEFENDED = "none"


def defense_curves(table: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """`defense_figure` saved to `path`."""
    return save_figure(defense_figure(table, title), path)


def defense_figure(table: pd.DataFrame, title: str = ""):
    """One panel per defense (the undefended model first): clean accuracy (dashed), naive
    robust accuracy, adaptive robust accuracy (its attack in the legend) and, thin and grey,
    the undefended model's robust accuracy. A panel's title names the masking checks that
    fired on the naive attack."""
    defenses = list(dict.fromkeys(table["defense"]))
    base = table[table["defense"] == UNDEFENDED].sort_values("eps")
    cols = min(3, len(defenses))
    rows = -(-len(defenses) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat[len(defenses):]:
        ax.set_visible(False)
    norm = table["norm"].iloc[0]
    for ax, name in zip(axes.flat, defenses, strict=False):
        df = table[table["defense"] == name].sort_values("eps")
        ax.plot(df["eps"], df["clean_accuracy"], ls="--", color="grey", marker=".",
                label="clean")
        if name == UNDEFENDED:
            ax.plot(df["eps"], df["adaptive_robust_accuracy"], marker="o", color="black",
                    lw=2, label="robust (PGD-type attack)")
        elif df["adaptive_attack"].iloc[0] == "gradient":  # differentiable: naive is adaptive
            ax.plot(df["eps"], df["adaptive_robust_accuracy"], marker="s", color="tab:red",
                    lw=2, label="naive = adaptive (true gradient)")
        else:
            ax.plot(df["eps"], df["naive_robust_accuracy"], marker="o", color="tab:orange",
                    label="naive attack")
            ax.plot(df["eps"], df["adaptive_robust_accuracy"], marker="s", color="tab:red",
                    lw=2, label=f"adaptive ({df['adaptive_attack'].iloc[0]})")
        if name != UNDEFENDED and len(base):
            ax.plot(base["eps"], base["adaptive_robust_accuracy"], color="grey", lw=0.8,
                        ls=":", label="undefended robust")
        fired = df["naive_warnings"].iloc[0]
        ax.set_title(name if not fired else f"{name}\nnaive warnings: {fired}", fontsize=10)
        ax.set_xlabel(f"eps ({norm})")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best", framealpha=0.85)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
