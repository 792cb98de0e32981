"""Certified accuracy vs L2 radius (Cohen et al. 2019, Fig. 6 style): per sigma, the
approximate certified accuracy as a step curve (a lower bound on the smoothed classifier's
robust accuracy), and at the table radii the accuracy under PGD-L2 + EOT on the smoothed soft
classifier (an upper bound), dashed in the same colour. Made from `certify_dataset`'s tables,
so it can be re-made from the CSVs."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from robust_transfer.report.common import save_figure  # noqa: E402


def step_curve(radius: np.ndarray, correct: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Certified accuracy at every radius of `grid`: share of images correct with radius >= r."""
    ok = np.sort(np.asarray(radius, dtype=float)[np.asarray(correct, dtype=bool)])
    return (len(ok) - np.searchsorted(ok, grid, side="left")) / max(len(radius), 1)


def certified_accuracy_figure(images: pd.DataFrame, summary: pd.DataFrame, title: str = ""):
    """One step curve per sigma (solid) and its attack's upper bound (dashed, markers)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    top = max(float(images["radius"].max()), float(summary["radius"].max()), 1e-3) * 1.08
    grid = np.linspace(0, top, 600)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, sigma in enumerate(sorted(images["sigma"].unique())):
        color = colors[i % len(colors)]
        df = images[images["sigma"] == sigma]
        ax.step(grid, step_curve(df["radius"], df["correct"], grid), where="post", color=color,
                lw=2, label=f"σ = {sigma:g}: certified (lower bound)")
        emp = summary[summary["sigma"] == sigma].dropna(subset=["empirical_accuracy"])
        if len(emp):
            ax.plot(emp["radius"], emp["empirical_accuracy"], ls="--", marker="o", ms=4,
                    color=color, label=f"σ = {sigma:g}: PGD + EOT (upper bound)")
    ax.set_xlabel("L2 radius")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, top)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left", framealpha=0.85)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def certified_accuracy_plot(images: pd.DataFrame, summary: pd.DataFrame, path: str | Path,
                            title: str = "") -> Path:
    """`certified_accuracy_figure` saved to `path`."""
    return save_figure(certified_accuracy_figure(images, summary, title), path)
