"""Each study's report, by the name its folder's `spec.yaml` records (`studies.STUDIES`):
`robust-transfer report DIR` recognises the study and draws its figures and summary. A
report function takes the study's folder and the output folder and returns the files it
wrote. The grid's (robust transfer, backdoor transfer, certify-transfer) is `report.study`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from robust_transfer.errors import UserError
from robust_transfer.report.bias_figures import make_bias_report
from robust_transfer.report.defense_figures import defend_report
from robust_transfer.report.distill import make_distill_report
from robust_transfer.report.influence import influence_report
from robust_transfer.report.updates_figures import make_survival_report
from robust_transfer.report.watermark_figures import watermark_report
from robust_transfer.studies import GRID, STUDIES, recorded_study

Report = Callable[[Path, Path], list[Path]]
REPORTS: dict[str, Report] = {
    "bias-transfer": make_bias_report,
    "defend": defend_report,
    "influence": influence_report,
    "backdoor-updates": make_survival_report,
    "distill": make_distill_report,
    "watermark-removal": watermark_report,
}


def study_of(folder: str | Path) -> str:
    """The study a results folder holds (`GRID` for a grid, and for a bare table)."""
    name = recorded_study(folder) if Path(folder).is_dir() else None
    return GRID if name is None else name


def make_study_report(folder: str | Path, out: str | Path) -> list[Path]:
    """The figures and summary of the (non-grid) study in `folder`, written into `out`."""
    name = study_of(folder)
    STUDIES.get(name)  # a folder of an unknown study: the error lists the known ones
    if name not in REPORTS:
        raise UserError(f"study {name!r} has no report")
    return REPORTS[name](Path(folder), Path(out))
