"""Training methods, input defenses, executors and distillation objectives as plugins
(`robust_transfer.plugins`): names from each registry, unknown names and options as one-line
`UserError`s (exit 2 from the CLI), input defenses honouring their seed, executors by name."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from robust_transfer.cli import main
from robust_transfer.defenses import INPUT_DEFENSES, RandomResizePad, parse_defenses
from robust_transfer.defenses.parse import build_defense
from robust_transfer.errors import UserError
from robust_transfer.plugins import option
from robust_transfer.train import SourceConfig
from robust_transfer.train.distill import (
    DISTILL_OBJECTIVES,
    ARDLoss,
    DistillConfig,
    KDLoss,
    SoftLabelLoss,
    distill_objective,
)
from robust_transfer.train.methods import (
    ATTACK_MODE,
    METHODS,
    NOISE_METHODS,
    ROBUST_METHODS,
    TRAINING_METHODS,
    FreeLoss,
    TRADESLoss,
    make_objective,
)
from robust_transfer.transfer.executors import EXECUTORS, LocalExecutor, make_executor
from robust_transfer.transfer.ray_executor import RayExecutor
from robust_transfer.variables import method_options

X = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))


# ---- input defenses ---------------------------------------------------------------------

def test_input_defense_names_and_typed_parameters():
    assert INPUT_DEFENSES.names() == ("squeeze-bits", "median", "random-resize")
    spec, = parse_defenses("squeeze-bits:3+median+random-resize:12")
    assert [(n, o) for n, o in spec.parts] == [
        ("squeeze-bits", INPUT_DEFENSES.options("squeeze-bits", {"bits": 3})),
        ("median", INPUT_DEFENSES.options("median", {"size": 2})),
        ("random-resize", INPUT_DEFENSES.options("random-resize", {"size": 12}))]
    assert spec.label == "squeeze-bits:3+median:2+random-resize:12"
    bits, median, resize = spec.transforms(seed=1)
    assert (bits.bits, median.size, resize.size, resize.seed) == (3, 2, 12, 1)
    with pytest.raises(UserError, match=r"unknown option\(s\) levels for input defense "
                                        r"'squeeze-bits'; allowed: bits"):
        INPUT_DEFENSES.options("squeeze-bits", {"levels": 3})
    with pytest.raises(UserError, match="option bits must be int, got 2.5"):
        INPUT_DEFENSES.options("squeeze-bits", {"bits": 2.5})


@pytest.mark.parametrize("name", [n for n in INPUT_DEFENSES if INPUT_DEFENSES.get(n).randomized])
def test_every_random_defense_draws_from_the_seed_it_is_given(name):
    options = INPUT_DEFENSES.options(name)
    first = build_defense(name, options, seed=7)(X)
    assert torch.equal(build_defense(name, options, seed=7)(X), first)  # same seed, same draws
    assert not torch.equal(build_defense(name, options, seed=8)(X), first)


def test_defense_spec_seeds_every_random_transform_of_its_chain():
    spec, = parse_defenses("random-resize+random-resize")
    out = spec.build(nn.Identity(), seed=5)(X)
    assert torch.equal(spec.build(nn.Identity(), seed=5)(X), out)
    assert not torch.equal(spec.build(nn.Identity(), seed=6)(X), out)
    # the first random transform draws from the seed itself (the numbers of a one-transform
    # defense are those of before), the second from its own stream: not a repeat of the first
    first, second = spec.transforms(seed=5)
    assert torch.equal(first(X), RandomResizePad(seed=5)(X))
    middle = RandomResizePad(seed=5)(X)  # 10 x 10
    assert not torch.equal(second(middle), RandomResizePad(seed=5)(middle))
    # reseeding the defended model restarts the streams `build` gave it
    defended = spec.build(nn.Identity(), seed=5)
    defended(X)
    defended.reseed(5)
    assert torch.equal(defended(X), out)


def test_unknown_input_defense_is_one_line_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["defend", str(tmp_path / "missing"), "--defense", "blur"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("error: unknown defense 'blur'; defenses: squeeze-bits[:N]")


# ---- executors ----------------------------------------------------------------------------

class LabelledExecutor(LocalExecutor):
    """Runs here, and carries a label (an executor plugin with an option of its own)."""

    name = "labelled"
    used: list = []

    @dataclass(frozen=True)
    class Options:
        workers: int = option(1, "parallel runs")
        label: str = option("", "a label")

    def __init__(self, workers: int = 1, label: str = "") -> None:
        super().__init__(workers)
        self.label = label
        LabelledExecutor.used.append(self)


@pytest.fixture
def labelled(monkeypatch):
    """`labelled` registered for one test: no other file changes for a new executor."""
    monkeypatch.setitem(EXECUTORS._plugins, "labelled", LabelledExecutor)
    LabelledExecutor.used.clear()
    return LabelledExecutor


def test_executors_by_name_with_their_options(labelled):
    assert EXECUTORS.get("ray") is RayExecutor
    local = make_executor("local", workers=3, tasks_per_gpu=2, use_gpus=False)
    assert isinstance(local, LocalExecutor) and local.workers == 3
    assert [f for f in EXECUTORS.options("ray").__dataclass_fields__] == [
        "workers", "address", "tasks_per_gpu", "use_gpus"]
    pool = make_executor("labelled", workers=2, options={"label": "x"})
    assert isinstance(pool, LabelledExecutor) and (pool.workers, pool.label) == (2, "x")
    with pytest.raises(UserError, match="unknown executor 'dask'; allowed: local, ray"):
        make_executor("dask")
    with pytest.raises(UserError, match="executor 'local' option workers must be int"):
        make_executor("local", workers="2")
    with pytest.raises(UserError, match=r"unknown option\(s\) label for executor 'local'; "
                                        "allowed: workers"):
        make_executor("local", options={"label": "x"})
    with pytest.raises(UserError, match=r"executor option workers has a setting of its own "
                                        r"\(--workers\)"):
        make_executor("labelled", options={"workers": 4})
    with pytest.raises(UserError, match="--address is for the Ray executor"):
        make_executor("labelled", address="auto")


SPEC = ("source: {task: synthetic-0to4, epochs: 1}\nsources: [{eps: 0.0}]\n"
        "targets: [synthetic-5to9]\nimages_per_class: [1]\nunfrozen_blocks: [0]\n"
        "epochs: 1\nseeds: [0]\n")


def test_grid_runs_on_an_executor_plugin_with_its_option(labelled, tmp_path):
    (tmp_path / "spec.yaml").write_text(SPEC)
    main_args = ["grid", str(tmp_path / "spec.yaml"), "--out", str(tmp_path / "g"),
                 "--workers", "1", "--executor", "labelled", "--executor-option", "label=x"]
    with pytest.raises(SystemExit) as exit_info:
        main(main_args)
    assert exit_info.value.code == 0
    assert [(e.workers, e.label) for e in labelled.used] == [(1, "x")]
    assert (tmp_path / "g" / "results.parquet").exists()


@pytest.mark.parametrize("args, message", [
    (["--executor", "dask"], "unknown executor 'dask'; allowed: local, ray"),
    (["--executor-option", "threads=2"], "unknown option(s) threads for executor 'local'; "
                                         "allowed: workers"),
    (["--executor-option", "workers"], "--executor-option takes KEY=VALUE, got 'workers'"),
    (["--executor-option", "workers=3"], "executor option workers has a setting of its own "
                                         "(--workers); give it there"),
])
def test_bad_executor_is_one_line_exit_2(tmp_path, capsys, args, message):
    (tmp_path / "spec.yaml").write_text(SPEC)
    with pytest.raises(SystemExit) as exit_info:
        main(["grid", str(tmp_path / "spec.yaml"), "--out", str(tmp_path / "g"), *args])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err == f"error: {message}"
    assert not (tmp_path / "g").exists()


# ---- training methods ---------------------------------------------------------------------

def test_training_method_facts_and_the_tables_derived_from_them():
    assert TRAINING_METHODS.names() == METHODS == (
        "natural", "pgd", "fgsm", "fast", "free", "trades", "gaussian", "smoothadv")
    assert ROBUST_METHODS == ("pgd", "fgsm", "fast", "free", "trades", "smoothadv")
    assert NOISE_METHODS == ("gaussian", "smoothadv")
    # the model's mode while examples are made, as in each method's reference code
    assert ATTACK_MODE == {"pgd": "eval", "fgsm": "train", "fast": "train", "free": "train",
                           "trades": "eval"}
    # SourceConfig's method options take their owners and defaults from the plugins
    assert method_options(SourceConfig) == {
        "trades_beta": (("trades",), 6.0), "free_replays": (("free",), 8),
        "sigma": (("gaussian", "smoothadv"), 0.25), "noise_samples": (("smoothadv",), 1),
        "trades_attack": (("trades",), "reference")}
    assert SourceConfig(eps=0.5, method="fast").on_overfit == "warn"
    cfg = SourceConfig(eps=0.5, method="trades", trades_beta=2)
    assert cfg.plugin_options() == TRAINING_METHODS.options("trades", {"trades_beta": 2.0})


def test_objectives_by_name_take_their_typed_options():
    free = make_objective("free", 0.1, "linf", free_replays=3, sigma=None)
    assert isinstance(free, FreeLoss) and free.replays == 3
    trades = make_objective("trades", 0.1, "linf", trades_beta=2, free_replays=3)
    assert isinstance(trades, TRADESLoss) and trades.beta == 2.0 and trades.mode == "eval"
    with pytest.raises(UserError, match=r"unknown training method option\(s\) beta; allowed: "
                                        "free_replays, trades_beta"):
        make_objective("trades", 0.1, "linf", beta=2)
    with pytest.raises(UserError, match="free replays must be an integer >= 1, got 0"):
        make_objective("free", 0.1, "linf", free_replays=0)
    with pytest.raises(UserError, match="training method 'free' option free_replays must be "
                                        "int, got 1.5"):
        make_objective("free", 0.1, "linf", free_replays=1.5)
    with pytest.raises(UserError, match="unknown training method 'sgd'; allowed: natural, "):
        make_objective("sgd", 0.1, "linf")


def test_unknown_training_method_is_one_line_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--out", str(tmp_path / "o"), "--method", "sgd", "--eps", "0.1"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("error: unknown training method 'sgd'; allowed: natural, pgd")
    assert not (tmp_path / "o").exists()


# ---- distillation objectives --------------------------------------------------------------

def test_distillation_objectives_by_name_with_typed_options():
    assert DISTILL_OBJECTIVES.names() == ("kd", "ard", "defensive")
    assert [DISTILL_OBJECTIVES.get(n).attack_mode for n in DISTILL_OBJECTIVES] == [
        None, "train", None]  # ARD's code attacks the student in train mode
    assert DISTILL_OBJECTIVES.options("defensive").temperature == 100.0  # Papernot et al.
    teacher = nn.Linear(4, 3)
    kd = distill_objective(DistillConfig("kd", 2, 0.5), teacher, 0.0, "l2")
    assert isinstance(kd, KDLoss) and (kd.temperature, kd.alpha) == (2.0, 0.5)
    ard = distill_objective(DistillConfig("ard", kl_scaling="code"), teacher, 0.5, "l2")
    assert isinstance(ard, ARDLoss) and ard.kl_scaling == "code"
    assert ard.examples.mode == "train" and ard.examples.eps == 0.5
    soft = distill_objective(DistillConfig("defensive", 50.0), teacher, 0.0, "l2")
    assert isinstance(soft, SoftLabelLoss) and soft.temperature == 50.0
    with pytest.raises(UserError, match="unknown distillation objective 'fitnets'; allowed: "
                                        "kd, ard, defensive"):
        DistillConfig("fitnets")
    with pytest.raises(UserError, match=r"unknown option\(s\) kl_scaling for distillation "
                                        "objective 'kd'"):
        DISTILL_OBJECTIVES.options("kd", {"kl_scaling": "code"})
    with pytest.raises(UserError, match="option temperature must be float, got 'hot'"):
        DISTILL_OBJECTIVES.options("kd", {"temperature": "hot"})
    with pytest.raises(UserError, match="unknown ARD KL scaling 'half'"):
        DistillConfig("ard", kl_scaling="half")
    with pytest.raises(UserError, match="ARD only"):
        DistillConfig("kd", kl_scaling="code")


def test_bad_distillation_option_is_one_line_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["distill", str(tmp_path / "teacher"), "--out", str(tmp_path / "s"),
              "--temperature", "0"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err == "error: temperature must be > 0, got 0.0"
    assert not (tmp_path / "s").exists()


def test_train_flags_are_made_from_the_methods_option_declarations(cli):
    from dataclasses import fields

    from robust_transfer.train.methods import OPTION_NAMES, TRAINING_METHODS

    code, text, _ = cli("train", "--help")
    assert code == 0
    flat = " ".join(text.replace("│", " ").split())  # rich's box borders out
    for name in OPTION_NAMES:
        assert "--" + name.replace("_", "-") in flat
    trades = {f.name: f for f in fields(TRAINING_METHODS.get("trades").Options)}
    beta = " ".join(trades["trades_beta"].metadata["help"].split())
    assert f"trades: {beta} (default {trades['trades_beta'].default})" in flat
    assert "gaussian, smoothadv: std of the Gaussian" in flat
