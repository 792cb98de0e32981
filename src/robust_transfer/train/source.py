"""Train a source model on a source task, naturally (eps=0) or with PGD-AT, and evaluate it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from robust_transfer.attacks import PGD, evaluate, make_threat
from robust_transfer.data import check_task, load_task
from robust_transfer.errors import UserError, check_choice
from robust_transfer.models import ModelSpec, build_model
from robust_transfer.models.nets import ARCHS, BlockNet
from robust_transfer.models.runtime import accuracy
from robust_transfer.train.distill import DistillConfig, distill_objective
from robust_transfer.train.examples import PGDExamples
from robust_transfer.train.loop import TrainConfig, fit
from robust_transfer.train.objectives import ExampleLoss, natural_loss

EVAL_STEPS = 20


@dataclass(frozen=True)
class SourceConfig:
    """A source model's recipe. eps=0 is natural training; otherwise PGD-AT at (norm, eps).

    `distill` set: the source is a student distilled from a teacher (`train.distill`); eps/norm
    are then ARD's threat model (0 for plain KD and defensive distillation).
    """

    task: str = "digits-0to4"
    arch: str = "cnn-small"
    eps: float = 0.0
    norm: str = "l2"
    attack_steps: int = 7
    attack_alpha: float | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig | None = None

    def __post_init__(self) -> None:
        check_task(self.task)
        check_choice("arch", self.arch, ARCHS)
        make_threat(self.norm, self.eps)  # validates norm and eps
        if self.attack_steps < 1:
            raise UserError(f"attack steps must be >= 1, got {self.attack_steps}")

    def to_dict(self) -> dict:
        """The recipe as plain data; `distill` only when set, so that the content ids of
        sources that are not distilled stay what they were before the field existed."""
        d = asdict(self)
        if d["distill"] is None:
            del d["distill"]
        return d


def evaluate_source(model: BlockNet, task_name: str, eps: float, norm: str) -> dict:
    """Clean and PGD-20 robust test accuracy (robust = clean when eps is 0), through the one
    evaluation path (`attacks.evaluate`)."""
    test = load_task(task_name).test
    if eps == 0:
        clean = accuracy(model, test.x, test.y)
        return {"clean_accuracy": clean, "robust_accuracy": clean}

    def pgd(m, e):
        return PGD(m, e, steps=EVAL_STEPS, norm=norm, seed=0)

    pgd.__name__ = f"pgd-{EVAL_STEPS}"
    table = evaluate(model, test.x, test.y, [pgd], [eps], norm, check=False)
    worst = table[table["attack"] == "worst case"].iloc[0]
    return {"clean_accuracy": float(worst.clean_accuracy),
            "robust_accuracy": float(worst.robust_accuracy)}


def build_source_model(cfg: SourceConfig, device: torch.device | str = "cpu") -> BlockNet:
    """The untrained model of recipe `cfg` (its task's classes, channels and size, its seed)."""
    task = load_task(cfg.task)
    channels = task.input_shape[0]
    spec = ModelSpec(cfg.arch, task.num_classes, channels, (0.5,) * channels, (0.5,) * channels,
                     input_size=task.input_shape[-1])
    return build_model(spec, seed=cfg.train.seed).to(device)


def train_source(
    cfg: SourceConfig,
    device: torch.device | str = "cpu",
    on_epoch: Callable[[int], None] | None = None,
    teacher: torch.nn.Module | None = None,
) -> tuple[BlockNet, dict]:
    """Train the source model `cfg` describes; return (model, metadata for its checkpoint).

    A distilled source (`cfg.distill`) needs its trained `teacher`; its robust accuracy is
    measured at the teacher's eps/norm when its own eps is 0.
    """
    task = load_task(cfg.task)
    model = build_source_model(cfg, device)
    eval_eps, eval_norm = cfg.eps, cfg.norm
    if cfg.distill is not None:
        if teacher is None:
            raise UserError("a distilled source needs its teacher model")
        objective = distill_objective(cfg.distill, teacher, cfg.eps, cfg.norm, cfg.attack_steps,
                                      cfg.attack_alpha, cfg.train.seed)
        if cfg.eps == 0:
            eval_eps = float(cfg.distill.teacher.get("eps", 0.0))
            eval_norm = str(cfg.distill.teacher.get("norm", cfg.norm))
    elif cfg.eps == 0:
        objective = natural_loss
    else:
        objective = ExampleLoss(
            PGDExamples(cfg.eps, cfg.norm, cfg.attack_steps, cfg.attack_alpha, cfg.train.seed)
        )
    callback = None if on_epoch is None else (lambda _m, epoch: on_epoch(epoch) or {})
    history = fit(model, task.train, cfg.train, objective, callback)
    metrics = evaluate_source(model, cfg.task, eval_eps, eval_norm)
    metrics["final_train_loss"] = history[-1]["train_loss"]
    # CPU float sums differ with the number of intra-op threads, so the same recipe and seed
    # give bit-identical weights only at the same thread count: record it.
    meta = {"role": "source", "recipe": cfg.to_dict(), "eps": cfg.eps, "norm": cfg.norm,
            "seed": cfg.train.seed, "task": cfg.task, "metrics": metrics,
            "torch_threads": torch.get_num_threads()}
    if cfg.distill is not None:
        meta["distill"] = cfg.distill.to_dict()
        metrics |= {"robust_eps": eval_eps, "robust_norm": eval_norm}
    return model, meta
