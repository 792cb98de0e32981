"""Train a source model on a source task, naturally (eps=0) or with PGD-AT, and evaluate it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from robust_transfer.attacks import PGD, evaluate, make_threat
from robust_transfer.data import TASKS, load_task
from robust_transfer.data.poison import OBJECTIVE_ATTACKS, BackdoorConfig, poison
from robust_transfer.errors import UserError, check_choice
from robust_transfer.models import ModelSpec, build_model
from robust_transfer.models.nets import ARCHS, ConvNet
from robust_transfer.models.runtime import accuracy
from robust_transfer.train.examples import PGDExamples
from robust_transfer.train.loop import TrainConfig, fit
from robust_transfer.train.neuba import neuba_objective
from robust_transfer.train.objectives import ExampleLoss, natural_loss

EVAL_STEPS = 20


@dataclass(frozen=True)
class SourceConfig:
    """A source model's recipe. eps=0 is natural training; otherwise PGD-AT at (norm, eps)."""

    task: str = "digits-0to4"
    arch: str = "cnn-small"
    eps: float = 0.0
    norm: str = "l2"
    attack_steps: int = 7
    attack_alpha: float | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    # A backdoor planted while training (data poisoning, see `data.poison`); None: clean.
    backdoor: BackdoorConfig | None = None

    def __post_init__(self) -> None:
        check_choice("task", self.task, TASKS)
        check_choice("arch", self.arch, ARCHS)
        make_threat(self.norm, self.eps)  # validates norm and eps
        if self.attack_steps < 1:
            raise UserError(f"attack steps must be >= 1, got {self.attack_steps}")
        if isinstance(self.backdoor, dict):  # from YAML / a checkpoint's recipe
            object.__setattr__(self, "backdoor", BackdoorConfig.from_dict(self.backdoor))
        if self.backdoor is not None:
            self.backdoor.check(len(TASKS[self.task][1]))

    def to_dict(self) -> dict:
        """The recipe as a dict; `backdoor` only when set, so a clean recipe (and its hash,
        the source's identity in the grid) is what it was before backdoors existed."""
        d = asdict(self)
        if self.backdoor is None:
            d.pop("backdoor")
        return d


def evaluate_source(model: ConvNet, task_name: str, eps: float, norm: str) -> dict:
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


def train_source(
    cfg: SourceConfig,
    device: torch.device | str = "cpu",
    on_epoch: Callable[[int], None] | None = None,
) -> tuple[ConvNet, dict]:
    """Train the source model `cfg` describes; return (model, metadata for its checkpoint)."""
    task = load_task(cfg.task)
    channels = task.input_shape[0]
    spec = ModelSpec(cfg.arch, task.num_classes, channels, (0.5,) * channels, (0.5,) * channels)
    model = build_model(spec, seed=cfg.train.seed).to(device)
    objective = (
        natural_loss
        if cfg.eps == 0
        else ExampleLoss(
            PGDExamples(cfg.eps, cfg.norm, cfg.attack_steps, cfg.attack_alpha, cfg.train.seed)
        )
    )
    train_set, backdoor = task.train, {}
    if cfg.backdoor is not None:
        if cfg.backdoor.attack in OBJECTIVE_ATTACKS:  # planted by the loss, on clean data
            objective = neuba_objective(cfg.backdoor, task.input_shape, model.feature_dim,
                                        objective)
            backdoor = {"poisoned_count": 0}
        else:
            train_set, index = poison(task.train, cfg.backdoor, task.num_classes)
            backdoor = {"poisoned_count": len(index), "poisoned_indices": index.tolist()}
    callback = None if on_epoch is None else (lambda _m, epoch: on_epoch(epoch) or {})
    history = fit(model, train_set, cfg.train, objective, callback)
    metrics = evaluate_source(model, cfg.task, cfg.eps, cfg.norm)
    metrics["final_train_loss"] = history[-1]["train_loss"]
    if backdoor:
        metrics["poisoned_count"] = backdoor["poisoned_count"]
    # CPU float sums differ with the number of intra-op threads, so the same recipe and seed
    # give bit-identical weights only at the same thread count: record it.
    meta = {"role": "source", "recipe": cfg.to_dict(), "eps": cfg.eps, "norm": cfg.norm,
            "seed": cfg.train.seed, "task": cfg.task, "metrics": metrics,
            "torch_threads": torch.get_num_threads()}
    if backdoor:
        meta["backdoor"] = {**cfg.backdoor.to_dict(), **backdoor}
    return model, meta
