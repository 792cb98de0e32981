"""The `defend` study: naive vs adaptive (BPDA / EOT) robust accuracy of input defenses on one
checkpoint, and the feature-squeezing detector's rates (Athalye et al. 2018, arXiv
1802.00420; Xu et al. 2018, arXiv 1704.01155).

One run per defense (the undefended model, "none", first): its rows, one per eps, hold the
test, naive robust and adaptive robust accuracy (`defenses.evaluate_defense`). When a
defense names a deterministic squeezer, one more run fits the squeeze detector and measures
it on the undefended model's adversarial examples (`defenses.detection_rates`). The
checkpoint is an input, not an artifact: its content hash (meta.json "sha256") is in every
run id, so another checkpoint at the same path never reuses old runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from robust_transfer.attacks.adaptive import check_adaptive
from robust_transfer.attacks.registry import attack_class, check_norm, stages
from robust_transfer.attacks.threats import DEFAULT_EPS, make_threat
from robust_transfer.data import load_task
from robust_transfer.defenses import (
    detection_rates,
    evaluate_defense,
    parse_defenses,
    squeezers_of,
)
from robust_transfer.defenses.evaluation import UNDEFENDED
from robust_transfer.errors import UserError
from robust_transfer.models import SourceCard, load_checkpoint, read_card
from robust_transfer.models.checkpoint import checkpoint_sha256
from robust_transfer.studies import STUDIES, spec_record
from robust_transfer.transfer.grid import worker_device
from robust_transfer.transfer.runner import Artifact, Unit
from robust_transfer.transfer.spec import content_id

# Clean training images the squeeze detector's threshold is fitted on.
CALIBRATION_IMAGES = 500
DEFENSE, DETECTOR = "defense", "detector"  # the `kind` of a row


@STUDIES.register
@dataclass(frozen=True)
class DefendStudy:
    """Input defenses on `checkpoint`: every defense (`defenses.parse_defenses` text) under
    the worst case of `attacks` at each of `eps` (default: half, one and two times the
    norm's `DEFAULT_EPS`) on the first `n` test images of `task` (default: the
    checkpoint's). `eot_samples`: draws of a random defense per adaptive gradient; `fpr`:
    the detector's false-positive rate on clean data."""

    checkpoint: Path
    defenses: tuple[str, ...]
    attacks: tuple[str, ...] = ("pgd",)
    norm: str = "linf"
    eps: tuple[float, ...] = ()
    steps: int | None = None
    eot_samples: int = 30
    fpr: float = 0.05
    n: int = 200
    task: str | None = None
    seed: int = 0
    name = "defend"
    required = ("run_id", "kind", "defense", "eps")

    def __post_init__(self) -> None:
        names = [a.strip().lower() for v in self.attacks for a in str(v).split(",")
                 if a.strip()]
        if not names:
            raise UserError("no attack given")
        labels = tuple(d.label for d in parse_defenses(list(self.defenses)))
        eps = self.eps or tuple(DEFAULT_EPS.get(self.norm, 0.1) * f for f in (0.5, 1, 2))
        object.__setattr__(self, "attacks", tuple(names))
        object.__setattr__(self, "defenses", labels)
        object.__setattr__(self, "eps", tuple(float(e) for e in eps))
        object.__setattr__(self, "checkpoint", Path(self.checkpoint))
        check_norm(names, self.norm)  # unknown names, unsupported norms
        for e in self.eps:
            make_threat(self.norm, e)  # negative, NaN or infinite eps
        if self.n < 1:
            raise UserError(f"--n must be >= 1, got {self.n}")
        if self.eot_samples < 1:
            raise UserError(f"--eot-samples must be >= 1, got {self.eot_samples}")
        check_adaptive(False, self.eot_samples)
        stages(names, self.steps)
        if not 0 <= self.fpr < 1:
            raise UserError(f"--fpr must be in [0, 1), got {self.fpr}")
        random = [d.label for d in self._specs() if any(t.randomized for t in d.transforms())]
        if random and self.eot_samples > 1:
            for stage in stages(names):
                if not attack_class(stage.attack).supports_eot:
                    raise UserError(f"attack {stage.attack!r} cannot average gradients over "
                                    f"the randomness of {', '.join(random)} (EOT); use pgd, "
                                    "fgsm, bim or apgd-*, or --eot-samples 1")
        card = read_card(self.checkpoint)
        task = self.task_name(card)
        data = load_task(task)
        classes = card.model.num_classes
        if data.num_classes != classes:
            raise UserError(f"task {task!r} has {data.num_classes} classes but the model has "
                            f"{classes}; pick the task the model was trained on")
        for spec in self._specs():  # a bad canvas size for these images fails here
            x = data.test.x[:1]
            for t in spec.transforms(self.seed):
                x = t(x)

    def _specs(self):
        return parse_defenses(list(self.defenses))

    def task_name(self, card: SourceCard | None = None) -> str:
        """The task evaluated: `task`, else the one the checkpoint records (digits-0to4
        for metadata without the key); an imported checkpoint records none (`task: ""`)."""
        if self.task:
            return self.task
        recorded = (card or read_card(self.checkpoint)).task
        recorded = "digits-0to4" if recorded is None else recorded
        if not recorded:
            raise UserError(f"checkpoint {str(self.checkpoint)!r} records no task (an imported "
                            "checkpoint); pass --task")
        return recorded

    def record(self) -> dict:
        return spec_record(self)

    def _runs(self) -> list[tuple[str, str | None]]:
        """(run id, what it runs: a defense label, None for "none", or `DETECTOR`)."""
        common = {"study": self.name, "checkpoint_sha256": checkpoint_sha256(self.checkpoint),
                  "task": self.task_name(), "attacks": list(self.attacks), "norm": self.norm,
                  "eps": list(self.eps), "steps": self.steps, "n": self.n, "seed": self.seed}
        runs = [(content_id({**common, "defense": UNDEFENDED}), None)]
        runs += [(content_id({**common, "defense": d, "eot_samples": self.eot_samples}), d)
                 for d in self.defenses]
        squeezers = squeezers_of(self._specs())
        if squeezers:
            detector = {**common, "detector": [repr(s) for s in squeezers], "fpr": self.fpr,
                        "calibration_images": CALIBRATION_IMAGES}
            runs.append((content_id(detector), DETECTOR))
        return runs

    def run_ids(self) -> list[str]:
        return [run_id for run_id, _ in self._runs()]

    def artifacts(self, out: Path, device: str) -> list[list[Artifact]]:
        return []  # the checkpoint is an input

    def units(self, pending: list[str], out: Path, device: str) -> list[Unit]:
        what = dict(self._runs())
        return [Unit((run_id,), _defend_run, _DefendJob(self, what[run_id], device))
                for run_id in pending]


@dataclass(frozen=True)
class _DefendJob:
    study: DefendStudy
    defense: str | None  # a defense label; None: the undefended model; `DETECTOR`
    device: str = "cpu"


def _defend_run(job: _DefendJob) -> list[list[dict]]:
    """The rows of one run: a defense's (one per eps), or the detector's."""
    s = job.study
    model, card = load_checkpoint(s.checkpoint, worker_device(job.device))
    task = s.task_name(card)
    data = load_task(task)
    x, y = data.test.x[:s.n], data.test.y[:s.n]
    common = {"checkpoint": str(s.checkpoint), "checkpoint_sha256": checkpoint_sha256(
        s.checkpoint), "task": task, "seed": s.seed, "attacks": ",".join(s.attacks)}
    args = (s.attacks, s.eps, s.norm, s.steps, s.seed, s.eot_samples)
    if job.defense != DETECTOR:
        spec = None if job.defense is None else parse_defenses(job.defense)[0]
        rows = evaluate_defense(model, x, y, spec, *args)
        return [[{**common, "kind": DEFENSE, **row} for row in rows]]
    examples: dict = {}  # the undefended model's adversarial examples, per eps
    evaluate_defense(model, x, y, None, *args, examples=examples)
    table = detection_rates(model, squeezers_of(s._specs()), data.train.x[:CALIBRATION_IMAGES],
                            x, y, examples, s.fpr)
    return [[{**common, "kind": DETECTOR, "defense": UNDEFENDED, **row}
             for row in table.to_dict("records")]]
