"""Figures for `explain`: saliency grid (Utrera et al. Fig. 4), most influential training images
(Fig. 5), class agreement of the top-k influential images (Fig. 6), leave-one-out validation
scatter (Koh & Liang Fig. 2) and unit vs random-direction top images (Szegedy et al. sec. 3).

Every figure is written atomically (temporary file in the same directory, then rename).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from robust_transfer.explain.loo import LeaveOneOutResult  # noqa: E402
from robust_transfer.explain.saliency import SaliencyComparison  # noqa: E402
from robust_transfer.explain.units import UnitAnalysis  # noqa: E402
from robust_transfer.report.common import save_figure  # noqa: E402

MATCH, MISMATCH = "#1a7f37", "#cf222e"
# What "top-k" means under each ranking of `explain.influence.rank_training_images`.
RANKING_WORDS = {"helpful": "most helpful", "harmful": "most harmful",
                 "abs": "most influential (largest |influence|)"}


@dataclass
class InfluenceExamples:
    """Fig. 5 data: one test image per class and its top-k training images per source."""

    test_images: torch.Tensor  # (C, ch, H, W)
    test_labels: torch.Tensor  # (C,)
    class_names: tuple[int, ...]
    top_images: dict[str, torch.Tensor]  # source label -> (C, k, ch, H, W)
    top_labels: dict[str, torch.Tensor]  # source label -> (C, k)
    top_scores: dict[str, torch.Tensor]  # source label -> (C, k)
    ranking: str = "helpful"  # how the top-k were chosen (see `rank_training_images`)


def _image(ax, x: torch.Tensor, **kwargs) -> None:
    """Show one (C, H, W) image in [0,1] (grey for one channel)."""
    x = x.detach().cpu()
    if x.shape[0] == 1:
        ax.imshow(x[0].numpy(), cmap="gray_r", vmin=0, vmax=1, **kwargs)
    else:
        ax.imshow(x.permute(1, 2, 0).clamp(0, 1).numpy(), **kwargs)
    ax.set_xticks([])
    ax.set_yticks([])


def _signed_map(ax, s: torch.Tensor) -> None:
    """Show a (C, H, W) saliency map summed over channels, red + / blue -, own scale."""
    m = s.detach().cpu().sum(0).numpy()
    bound = float(np.abs(m).max()) or 1.0
    ax.imshow(m, cmap="RdBu_r", vmin=-bound, vmax=bound)
    ax.set_xticks([])
    ax.set_yticks([])


def _row_label(ax, text: str) -> None:
    ax.set_ylabel(text, rotation=0, ha="right", va="center", fontsize=9, labelpad=8)


def saliency_grid(comparison: SaliencyComparison, path: str | Path,
                  max_images: int = 10, title: str | None = None) -> Path:
    """Fig. 4 analog: the images (top row), then each model's loss-gradient map per method."""
    n = min(max_images, len(comparison.images))
    # Spread the shown columns over the classes (images are ordered class by class).
    cols = np.unique(np.linspace(0, len(comparison.images) - 1, n).round().astype(int))
    keys = list(comparison.maps)
    fig, axes = plt.subplots(len(keys) + 1, len(cols), squeeze=False,
                             figsize=(1.1 * len(cols) + 2.2, 1.15 * (len(keys) + 1) + 0.9))
    names = comparison.class_names
    for j, i in enumerate(cols):
        _image(axes[0, j], comparison.images[i])
        label = int(comparison.labels[i])
        axes[0, j].set_title(f"digit {names[label] if names else label}", fontsize=8)
        for r, key in enumerate(keys, start=1):
            _signed_map(axes[r, j], comparison.maps[key][i])
    _row_label(axes[0, 0], "input")
    for r, (label, method) in enumerate(keys, start=1):
        frac = float(comparison.ink_fraction[(label, method)].mean())
        _row_label(axes[r, 0], f"{label}\n{method}\nink mass {frac:.2f}")
    chance = float(comparison.chance.mean())
    fig.suptitle(
        (title or "Loss gradient w.r.t. the input, natural vs robust")
        + f"\nred = +, blue = -, each map on its own scale; ink mass = share of |grad| on the "
        f"digit's pixels (chance {chance:.2f}, n = {len(comparison.images)} images)",
        fontsize=9,
    )
    return save_figure(fig, path)


def influence_examples_figure(examples: InfluenceExamples, path: str | Path) -> Path:
    """Fig. 5 analog: for one test image per class, the top-k most influential training images
    (by the study's ranking: helpful by default) under each source; titles green when the
    class matches the test image."""
    labels = list(examples.top_images)
    classes = len(examples.test_labels)
    k = next(iter(examples.top_images.values())).shape[1]
    rows = classes * len(labels)
    fig, axes = plt.subplots(rows, k + 1, squeeze=False,
                             figsize=(1.0 * (k + 1) + 2.0, 1.2 * rows + 0.8))
    names = examples.class_names

    def digit(c: int) -> str:
        return str(names[c] if names else c)

    for c in range(classes):
        y = int(examples.test_labels[c])
        for g, label in enumerate(labels):
            r = c * len(labels) + g
            _image(axes[r, 0], examples.test_images[c])
            axes[r, 0].set_title(f"test: {digit(y)}", fontsize=8)
            _row_label(axes[r, 0], label)
            for j in range(k):
                ax = axes[r, j + 1]
                _image(ax, examples.top_images[label][c, j])
                t = int(examples.top_labels[label][c, j])
                ax.set_title(digit(t), fontsize=8, color=MATCH if t == y else MISMATCH)
    fig.subplots_adjust(hspace=0.45, wspace=0.15, top=1 - 0.75 / fig.get_figheight())
    words = RANKING_WORDS.get(examples.ranking, examples.ranking)
    fig.suptitle(f"Top-{k} {words} training images (influence on the test loss) per "
                 "source\ncolumn 1: test image; titles: training image's class (green: same "
                 "as the test image)", fontsize=9, y=0.995)
    return save_figure(fig, path)


def class_match_figure(table: pd.DataFrame, path: str | Path,
                       chance: float | None = None, title: str | None = None) -> Path:
    """Fig. 6 analog from `report.influence.class_match_table`: fraction of the top-k
    influential training images sharing the target's class vs k, one panel per target kind,
    a t-interval band per source (n and what it is over in the legend)."""
    panels = list(dict.fromkeys(table["targets"]))
    fig, axes = plt.subplots(1, len(panels), squeeze=False, sharey=True,
                             figsize=(5.2 * len(panels), 4.0))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labels = list(dict.fromkeys(table["source_label"]))
    for ax, targets in zip(axes[0], panels, strict=True):
        for i, label in enumerate(labels):
            d = table[(table["targets"] == targets)
                      & (table["source_label"] == label)].sort_values("k")
            if d.empty:
                continue
            color = colors[i % len(colors)]
            n, over = int(d["n"].iloc[0]), d["over"].iloc[0]
            ax.plot(d["k"], d["mean"], color=color, label=f"{label} (n={n} {over})")
            ax.fill_between(d["k"], d["lower"], d["upper"], color=color, alpha=0.25, lw=0)
        if chance is not None:
            ax.axhline(chance, color="grey", ls="--", lw=1, label=f"chance ({chance:.2f})")
        ax.set_title(f"targets: {targets}", fontsize=10)
        ax.set_xlabel("k (top-k most influential training images)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[0, 0].set_ylabel("fraction of top-k with the target's class")
    method = table["influence_method"].iloc[0] if "influence_method" in table else ""
    ranking = table["ranking"].iloc[0] if "ranking" in table else "helpful"
    words = RANKING_WORDS.get(ranking, ranking)
    fig.suptitle(title or f"Class agreement of the {words} training images "
                 f"({method} influence; bands: 95% t-interval)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def loo_scatter(result: LeaveOneOutResult, path: str | Path) -> Path:
    """Predicted (influence) vs actual (retrained) change in test loss on removing each of
    the removed training images, with the y = x line and the Pearson correlation."""
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    ax.scatter(result.predicted, result.actual, s=16, alpha=0.8)
    lo = float(min(result.predicted.min(), result.actual.min()))
    hi = float(max(result.predicted.max(), result.actual.max()))
    pad = 0.05 * (hi - lo or 1.0)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="grey", ls="--", lw=1,
            label="y = x")
    ax.set_xlabel("predicted change in test loss\n(g_test^T H^-1 g_i / n)")
    ax.set_ylabel("actual change (leave-one-out retraining, L-BFGS)")
    ax.set_title(f"Influence vs leave-one-out: Pearson r = {result.pearson:.3f}\n"
                 f"{len(result.removed)} of {result.num_train} training images removed, "
                 f"L2 = {result.weight_decay:g}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def units_grid(analysis: UnitAnalysis, images: torch.Tensor, labels: torch.Tensor,
               path: str | Path, rows: int = 4, class_names: tuple[int, ...] = (),
               title: str | None = None) -> Path:
    """Top-k images of the first `rows` units and of `rows` random directions of a layer."""
    rows = min(rows, len(analysis.units))
    k = analysis.k
    fig, axes = plt.subplots(2 * rows, k, squeeze=False,
                             figsize=(0.95 * k + 2.4, 1.15 * 2 * rows + 0.9))
    fig.subplots_adjust(hspace=0.4, wspace=0.1, top=1 - 0.75 / fig.get_figheight())

    def draw(r: int, top: torch.Tensor, text: str) -> None:
        for j in range(k):
            ax = axes[r, j]
            _image(ax, images[top[j]])
            c = int(labels[top[j]])
            ax.set_title(str(class_names[c] if class_names else c), fontsize=7)
        _row_label(axes[r, 0], text)

    for r in range(rows):
        draw(r, analysis.unit_top[r],
             f"unit {int(analysis.units[r])}\npurity {float(analysis.unit_purity[r]):.2f}")
        draw(rows + r, analysis.direction_top[r],
             f"random dir {r + 1}\npurity {float(analysis.direction_purity[r]):.2f}")
    s = analysis.summary()
    fig.suptitle(
        (title or f"Layer {analysis.layer}: top-{k} images per unit vs per random direction")
        + f"\nmean purity (share of the top-{k} in their most common class) over "
        f"{s['units']} units: {s['unit purity']:.2f}; over {s['units']} random directions: "
        f"{s['random-direction purity']:.2f}",
        fontsize=9,
    )
    return save_figure(fig, path)
