"""Studies: each a spec, a per-run function and a report, run by `transfer.runner`'s one
planner, executor and results store.

A study is a frozen dataclass (its spec: validated at construction, loadable from YAML)
with the `runner.Study` methods (`run_ids`, `artifacts`, `units`, `record`), registered in
`STUDIES` under the name its YAML spec and its folder's `spec.yaml` carry (`study: NAME`; a
spec without the key is a grid, as every grid folder written before this layer is). One
module per study, reading top to bottom: spec type, run function. Their figures and
summaries are the report layer's (`report.studies`), which finds them by the same name.

Results use one column vocabulary across studies, the grid's: the same name for the same
thing (`run_id`, `seed`, `source_task`, `source_arch`, `target_task`, `images_per_class`,
`unfrozen_blocks`, `epochs`, `lr`, `batch_size`, `train_images`, `test_accuracy`, ...).
"""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from typing import Any

import yaml

from robust_transfer.errors import UserError
from robust_transfer.plugins import Registry, build_options
from robust_transfer.transfer.grid import GridStudy
from robust_transfer.transfer.runner import Study
from robust_transfer.transfer.spec import parse_spec, read_spec_file

STUDIES: Registry = Registry("study")
STUDIES.add(GridStudy.name, GridStudy)
GRID = GridStudy.name


def plain(value: Any) -> Any:
    """`value` as YAML-able data: dataclasses as mappings, tuples as lists, paths as text."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def spec_record(study: Any) -> dict:
    """A study's recorded spec: `study: NAME` then its fields (`Study.record` for the
    dataclass studies)."""
    return {"study": study.name, **plain(study)}


def study_from_dict(data: dict, where: str = "spec", base: Path | None = None) -> Study:
    """The study a spec mapping describes (`study:` names it; none: a grid). Unknown keys,
    wrong types and bad values are `UserError`s naming them. `base`: the folder relative
    paths (the checkpoints a study reads) are relative to (default: the working folder)."""
    if not isinstance(data, dict):
        raise UserError(f"{where} must be a YAML mapping, got {type(data).__name__}")
    data = dict(data)
    if data.get("study", GRID) == GRID:
        data.pop("study", None)
        return GridStudy(parse_spec(data))
    name = data.pop("study", GRID)
    cls = STUDIES.get(name)
    if base is not None:
        hints = typing.get_type_hints(cls)
        data = {k: _rebase(hints.get(k), v, base) for k, v in data.items()}
    return build_options(cls, data, f"{name} {where}", noun="key")


def _rebase(hint: Any, value: Any, base: Path) -> Any:
    """A spec value of a path field (or a tuple of paths) made relative to `base`."""
    if isinstance(value, str) and (hint is Path or Path in typing.get_args(hint)):
        return os.path.join(base, value)
    if isinstance(value, list) and typing.get_origin(hint) is tuple \
            and typing.get_args(hint)[:1] == (Path,):
        return [os.path.join(base, v) if isinstance(v, str) else v for v in value]
    return value


def load_study(path: str | Path) -> Study:
    """The study in a YAML spec file (a grid spec, or one with `study: NAME`); relative paths
    in it are relative to the file's folder."""
    return study_from_dict(read_spec_file(path), f"spec {str(Path(path))!r}",
                           Path(path).parent)


def absolute(path: str | Path) -> Path:
    """`path` made absolute (not resolving links), as a study records the checkpoints it
    reads: its spec, saved anywhere, then names them wherever it is run from."""
    return Path(os.path.abspath(path))


def recorded_study(folder: str | Path) -> str | None:
    """The study name a results folder's `spec.yaml` records (a grid's: `GRID`), or None
    when the folder has no readable spec."""
    path = Path(folder) / "spec.yaml"
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    return data.get("study", GRID) if isinstance(data, dict) else None


# Every study module registers its spec class in `STUDIES` when imported: imported here, so
# that a spec names any study wherever this package is imported (Python API, `run --help`).
from robust_transfer.studies import (  # noqa: E402,F401
    bias,
    defend,
    distill,
    influence,
    updates,
    watermark,
)
