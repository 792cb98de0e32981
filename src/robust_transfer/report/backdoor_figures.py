"""Backdoor figures: a gallery of clean and triggered images with the model's predictions, and
C-Acc / ASR bars before and after each backdoor defense.

Both are made from plain inputs (images, predictions; the defenses' table), so they can be
re-drawn without re-training, and are written atomically (`report.common.save_figure`).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from robust_transfer.report.common import save_figure  # noqa: E402

HIT, MISS = "#c0392b", "#1e7b34"  # red: the backdoor fired; green: true class kept


def _show(ax, img: torch.Tensor) -> None:
    img = img.detach().cpu()
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(img.permute(1, 2, 0).numpy())
    ax.set_xticks([])
    ax.set_yticks([])


def trigger_gallery_figure(x: torch.Tensor, x_triggered: torch.Tensor, y: torch.Tensor,
                           pred: torch.Tensor, pred_triggered: torch.Tensor,
                           target: int | None, title: str = ""):
    """Two rows: clean test images (true label, prediction) and the same images triggered
    (prediction; red when it is the backdoor's target, green when still the true class)."""
    n = len(x)
    fig, axes = plt.subplots(2, n, figsize=(1.35 * n + 0.8, 3.2), squeeze=False)
    for i in range(n):
        _show(axes[0, i], x[i])
        axes[0, i].set_title(f"y={int(y[i])}  pred {int(pred[i])}", fontsize=8)
        _show(axes[1, i], x_triggered[i])
        p = int(pred_triggered[i])
        colour = HIT if target is not None and p == target else MISS if p == int(y[i]) else "k"
        mark = " = target" if colour == HIT else ""
        axes[1, i].set_title(f"pred {p}{mark}", fontsize=8, color=colour)
    axes[0, 0].set_ylabel("clean", fontsize=9)
    axes[1, 0].set_ylabel("triggered", fontsize=9)
    fig.suptitle(title or "triggered test images and predictions", fontsize=10)
    fig.tight_layout()
    return fig


def trigger_gallery(path: str | Path, *args, **kwargs) -> Path:
    """`trigger_gallery_figure(*args, **kwargs)` saved to `path`."""
    return save_figure(trigger_gallery_figure(*args, **kwargs), path)


def defense_bars_figure(table: pd.DataFrame, title: str = ""):
    """Grouped bars per defense: C-Acc and ASR before (light) and after (dark) removal.

    `table` is `backdoors.defenses`' table: one row per defense with columns `defense`,
    `clean_accuracy_before`, `clean_accuracy_after`, `asr_before`, `asr_after`.
    """
    defenses = list(table["defense"])
    pos = np.arange(len(defenses))
    width = 0.2
    fig, ax = plt.subplots(figsize=(1.9 * len(defenses) + 2.5, 3.8))
    bars = [("clean_accuracy_before", "C-Acc before", "#9ecae1", -1.5),
            ("clean_accuracy_after", "C-Acc after", "#2171b5", -0.5),
            ("asr_before", "ASR before", "#fcae91", 0.5),
            ("asr_after", "ASR after", "#cb181d", 1.5)]
    for column, label, colour, offset in bars:
        values = table[column].to_numpy(dtype=float)
        drawn = ax.bar(pos + offset * width, values, width, label=label, color=colour)
        ax.bar_label(drawn, labels=[f"{v:.2f}" for v in values], fontsize=6, padding=1)
    ax.set_xticks(pos, defenses)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("share of test images")
    ax.set_title(title or "backdoor defenses: clean accuracy and attack success rate")
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def defense_bars(table: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """`defense_bars_figure(table, title)` saved to `path`."""
    return save_figure(defense_bars_figure(table, title), path)
