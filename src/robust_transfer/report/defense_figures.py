"""The `defend` study's report: defenses.csv, detector.csv and the defense figure (clean,
naive and adaptive robust accuracy vs eps, one panel per defense).

Made from the study's results table (`studies.defend`), so it can be re-made from the folder
(`robust-transfer report DIR`) or the CSV. The gap between the naive and the adaptive curve
is what gradient masking hid (Athalye et al. 2018); the undefended model's robust accuracy
is drawn in every panel for reference.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from robust_transfer.atomic import atomic_write_text  # noqa: E402
from robust_transfer.defenses.evaluation import UNDEFENDED  # noqa: E402
from robust_transfer.report.common import save_figure  # noqa: E402
from robust_transfer.studies.defend import DEFENSE, DETECTOR, DefendStudy  # noqa: E402
from robust_transfer.transfer.results import read_results  # noqa: E402

# The columns of defenses.csv and detector.csv, in order (the run's identity last).
IDENTITY = ["attacks", "task", "seed", "checkpoint", "checkpoint_sha256", "run_id"]
DEFENSE_COLUMNS = ["defense", "eps", "norm", "test_accuracy", "naive_robust_accuracy",
                   "adaptive_robust_accuracy", "adaptive_attack", "naive_warnings",
                   "adaptive_warnings", *IDENTITY]
DETECTOR_COLUMNS = ["eps", "squeezers", "target_fpr", "threshold", "fpr_calibration",
                    "fpr_test", "n_adversarial", "detection_rate", *IDENTITY]


def defend_tables(folder: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(defense rows, detector rows) of a `defend` study's folder: defenses in the spec's
    order (the undefended model first), eps ascending; no detector: an empty table."""
    df = read_results(folder, DefendStudy.required)
    spec = yaml.safe_load((Path(folder) / "spec.yaml").read_text()) or {}
    order = {d: i for i, d in enumerate([UNDEFENDED, *spec.get("defenses", [])])}
    defense = df[df["kind"] == DEFENSE].copy()
    defense["_order"] = defense["defense"].map(order)
    defense = defense.sort_values(["_order", "eps"], kind="stable")[DEFENSE_COLUMNS]
    detector = df[df["kind"] == DETECTOR]
    detector = (detector.sort_values("eps", kind="stable")[DETECTOR_COLUMNS] if len(detector)
                else pd.DataFrame(columns=DETECTOR_COLUMNS))
    detector = detector.astype({"n_adversarial": int})  # null in the defense rows: floats
    return defense.reset_index(drop=True), detector.reset_index(drop=True)


def defend_report(folder: str | Path, out: str | Path) -> list[Path]:
    """defenses.csv, detector.csv (when the study fitted the detector) and
    defenses_vs_eps.png of the `defend` study in `folder`, written into `out`."""
    out = Path(out)
    defense, detector = defend_tables(folder)
    written = [out / "defenses.csv"]
    atomic_write_text(written[0], defense.to_csv(index=False))
    if len(detector):
        written.append(out / "detector.csv")
        atomic_write_text(written[-1], detector.to_csv(index=False))
    first = defense.iloc[0]
    title = f"{Path(first['checkpoint']).name} on {first['task']}: " + \
        ", ".join(first["attacks"].split(","))
    written.append(defense_curves(defense, out / "defenses_vs_eps.png", title=title))
    return written


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
        ax.plot(df["eps"], df["test_accuracy"], ls="--", color="grey", marker=".",
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
