"""The distillation comparison's tables and summary, from the `distill` study's results
(`studies.distill`; never retraining): teacher and students under PGD-20 with the share of
the teacher's robust accuracy each keeps, and for defensive distillation the masking story
(PGD on cross-entropy fails at T = 1 where the margin loss and CW break the model)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from robust_transfer.atomic import atomic_write_text
from robust_transfer.studies.distill import (
    ALONE,
    ARD,
    CW_L2,
    CW_STEPS,
    DEFENSIVE,
    EVAL_STEPS,
    KD,
    PGD_CE,
    PGD_MARGIN,
    DistillStudy,
)
from robust_transfer.transfer.results import read_results

STUDENTS = (ALONE, KD, ARD, DEFENSIVE)  # the order of the comparison, after the teacher
ATTACKS = (PGD_CE, PGD_MARGIN, CW_L2)


def _ordered(df: pd.DataFrame) -> pd.DataFrame:
    """Teacher first, then the students in `STUDENTS` order, each model's attacks in
    `ATTACKS` order."""
    key = df.role.ne("teacher") * 10 + df.model.map(
        lambda m: STUDENTS.index(m) if m in STUDENTS else -1)
    return df.assign(_k=key, _a=df.attack.map(ATTACKS.index)).sort_values(
        ["_k", "_a"], kind="stable").drop(columns=["_k", "_a"])


def comparison_rows(df: pd.DataFrame) -> list[dict]:
    """Per model under PGD-20 on cross-entropy: clean and robust accuracy, the share of the
    teacher's robust accuracy it keeps (`robust_kept`; NaN when the teacher's is 0) and its
    KL to the teacher."""
    pgd = _ordered(df[df.attack == PGD_CE])
    teacher = float(pgd[pgd.role == "teacher"].robust_accuracy.iloc[0])
    return [{"model": r.model, "clean": r.test_accuracy, "robust": r.robust_accuracy,
             "robust_kept": r.robust_accuracy / teacher if teacher else float("nan"),
             "kl_to_teacher": r.kl_to_teacher} for r in pgd.itertuples()]


def story_rows(df: pd.DataFrame) -> list[dict]:
    """Defensive distillation at T = 1, defensive student then student alone, per attack:
    clean, robust, success rate and the masking warnings fired (none: not defensive)."""
    if DEFENSIVE not in set(df.model):
        return []
    part = df[df.model.isin((DEFENSIVE, ALONE))]
    part = part.assign(_m=part.model.map((DEFENSIVE, ALONE).index),
                       _a=part.attack.map(ATTACKS.index)).sort_values(["_m", "_a"])
    return [{"model": r.model, "attack": r.attack, "clean": r.test_accuracy,
             "robust": r.robust_accuracy, "success_rate": r.attack_success_rate,
             "warnings": [w for w in r.masking_warnings.split("\n") if w]}
            for r in part.itertuples()]


def comparison_title(df: pd.DataFrame) -> str:
    r = df.iloc[0]
    return (f"distillation (T={r.temperature:g}, alpha={r.alpha:g}) on {r.source_task} test "
            "set")


def robust_label(df: pd.DataFrame) -> str:
    r = df.iloc[0]
    return f"PGD-{EVAL_STEPS} {r.norm} eps={r.eps:g}"


def story_title(df: pd.DataFrame) -> str:
    r = df.iloc[0]
    return (f"defensive distillation at T = 1: attacks at {r.norm} eps={r.eps:g} (CW-L2: "
            f"{CW_STEPS} Adam steps per search step)")


def _markdown(rows: list[dict]) -> list[str]:
    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    return ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0]),
            *("| " + " | ".join(cell(v) for v in r.values()) + " |" for r in rows)]


def distill_summary_markdown(df: pd.DataFrame) -> str:
    """The comparison table, and for defensive distillation the masking story with the
    gradient-masking warnings that fired."""
    lines = ["# Distillation: summary", "", f"{comparison_title(df)}; robust: "
             f"{robust_label(df)}; robustness kept = robust / the teacher's robust accuracy.",
             "", *_markdown([{"model": r["model"], "clean accuracy": r["clean"],
                              "robust accuracy": r["robust"],
                              "robustness kept": r["robust_kept"],
                              "KL to teacher (T=1)": r["kl_to_teacher"]}
                             for r in comparison_rows(df)]), ""]
    story = story_rows(df)
    if story:
        lines += [f"## {story_title(df)}", "", *_markdown([
            {"model": r["model"], "attack": r["attack"], "clean": r["clean"],
             "robust": r["robust"], "success rate": r["success_rate"],
             "masking warnings": len(r["warnings"])} for r in story]), ""]
        lines += [f"- gradient-masking warning: {w}"
                  for w in sorted({w for r in story for w in r["warnings"]})]
    return "\n".join(lines) + "\n"


def make_distill_report(table: pd.DataFrame | str | Path, out: str | Path) -> list[Path]:
    """Write distill_summary.md into `out` from the study's table (or its folder); its
    path."""
    if not isinstance(table, pd.DataFrame):
        table = read_results(table, DistillStudy.required)
    summary = Path(out) / "distill_summary.md"
    atomic_write_text(summary, distill_summary_markdown(table))
    return [summary]
