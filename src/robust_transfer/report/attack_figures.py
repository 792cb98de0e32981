"""Attack figures: robust accuracy vs eps, a Szegedy-style gallery, a transfer heatmap.

Every figure is made from a results table (or from inputs and their adversarial versions)
and written atomically: saved under a temporary name in the target directory, then renamed.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from robust_transfer.models.runtime import predict_logits  # noqa: E402
from robust_transfer.report.common import save_figure  # noqa: E402


def robust_accuracy_curves(results: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """`robust_accuracy_figure` saved to `path`."""
    return save_figure(robust_accuracy_figure(results, title), path)


def robust_accuracy_figure(results: pd.DataFrame, title: str = ""):
    """Robust accuracy vs eps: one line per attack stage and the worst case (thick), with the
    clean accuracy as a dashed line. `results` is `attacks.evaluate`'s table; an optional
    `model` column gives one panel per model."""
    models = list(dict.fromkeys(results["model"])) if "model" in results else [None]
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        df = results if model is None else results[results["model"] == model]
        norm = df["norm"].iloc[0]
        for attack in dict.fromkeys(df["attack"]):
            part = df[df["attack"] == attack].sort_values("eps")
            worst = attack == "worst case"
            label = attack if worst else f"after {attack}"
            ax.plot(part["eps"], part["robust_accuracy"], marker="o", lw=2.5 if worst else 1.2,
                    color="black" if worst else None, label=label, zorder=3 if worst else 2)
        ax.axhline(df["clean_accuracy"].iloc[0], ls="--", color="grey", lw=1,
                   label=f"clean ({df['clean_accuracy'].iloc[0]:.2f})")
        ax.set_xlabel(f"eps ({norm})")
        ax.set_ylabel("robust accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.set_title(model or title or "robust accuracy vs eps")
        ax.legend(fontsize=8, loc="lower left")
    if title and models != [None]:
        fig.suptitle(title)
    return fig


def _show(ax, img: torch.Tensor, **kwargs) -> None:
    img = img.detach().cpu()
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap="gray", **kwargs)
    else:
        ax.imshow(img.permute(1, 2, 0).numpy(), **kwargs)
    ax.set_xticks([])
    ax.set_yticks([])


def adversarial_gallery(
    model: nn.Module,
    x: torch.Tensor,
    x_adv: torch.Tensor,
    path: str | Path,
    class_names: list[str] | None = None,
    title: str = "",
) -> Path:
    """`gallery_figure` saved to `path`."""
    return save_figure(gallery_figure(model, x, x_adv, class_names, title), path)


def gallery_figure(
    model: nn.Module,
    x: torch.Tensor,
    x_adv: torch.Tensor,
    class_names: list[str] | None = None,
    title: str = "",
):
    """Szegedy et al. (2014) style: per row, clean image | perturbation amplified to the full
    grey range | adversarial image, with predicted labels and confidences."""
    device = next(model.parameters()).device
    p_clean = predict_logits(model, x.to(device)).softmax(1).cpu()
    p_adv = predict_logits(model, x_adv.to(device)).softmax(1).cpu()
    names = class_names or [str(i) for i in range(p_clean.shape[1])]
    n = len(x)
    fig, axes = plt.subplots(n, 3, figsize=(6.3, 2.1 * n + 0.4), squeeze=False)
    for i in range(n):
        delta = (x_adv[i] - x[i]).detach().cpu()
        scale = delta.abs().max().item()
        amplified = 0.5 + 0.5 * delta / scale if scale > 0 else torch.full_like(delta, 0.5)
        c, a = p_clean[i].argmax().item(), p_adv[i].argmax().item()
        _show(axes[i, 0], x[i], vmin=0, vmax=1)
        axes[i, 0].set_title(f"clean: {names[c]} ({p_clean[i, c]:.0%})", fontsize=9)
        _show(axes[i, 1], amplified, vmin=0, vmax=1)
        axes[i, 1].set_title(f"perturbation (amplified x{0.5 / scale if scale else 0:.1f})\n"
                             f"L2={delta.norm():.2f}  Linf={scale:.2f}", fontsize=8)
        _show(axes[i, 2], x_adv[i], vmin=0, vmax=1)
        axes[i, 2].set_title(f"adversarial: {names[a]} ({p_adv[i, a]:.0%})", fontsize=9,
                             color="firebrick" if a != c else "black")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def transfer_heatmap(table: pd.DataFrame, path: str | Path,
                     value: str = "adversarial_accuracy") -> Path:
    """`transfer_figure` saved to `path`."""
    return save_figure(transfer_figure(table, value), path)


def transfer_figure(table: pd.DataFrame, value: str = "adversarial_accuracy"):
    """Heatmap of `value` (rows: model the examples were crafted on; columns: model they are
    evaluated on), one panel per eps, cells annotated."""
    eps_values = list(dict.fromkeys(table["eps"]))
    k = len(eps_values)
    n_models = table["source"].nunique()
    size = 1.1 * n_models + 2
    fig, axes = plt.subplots(1, k, figsize=(size * k + 1.5, size), squeeze=False,
                             layout="constrained")
    for col, (ax, e) in enumerate(zip(axes[0], eps_values, strict=True)):
        part = table[table["eps"] == e]
        order = list(dict.fromkeys(part["source"]))
        mat = part.pivot(index="source", columns="target", values=value).loc[order, order]
        im = ax.imshow(mat.to_numpy(), vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(order)), order, rotation=30, ha="right")
        ax.set_yticks(range(len(order)), order)
        ax.set_xlabel("evaluated on (target model)")
        if col == 0:
            ax.set_ylabel("crafted on (source model)")
        ax.set_title(f"{part['attack'].iloc[0]} {part['norm'].iloc[0]} eps={e}")
        for (i, j), v in np.ndenumerate(mat.to_numpy()):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center",
                    color="black" if v > 0.5 else "white", fontsize=9)
    fig.colorbar(im, ax=list(axes[0]), label=value.replace("_", " "), shrink=0.85)
    return fig
