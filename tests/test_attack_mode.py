"""Fidelity to each method's reference code: the model's mode while training examples are
made (eval: MadryLab PGD, TRADES; train: fast, free, FGSM, ARD), TRADES' start and step, and
ARD's KL scaling. Each objective is checked on one batch against a by-hand torch computation,
BatchNorm running statistics included (train-mode attack forwards update them)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from robust_transfer.attacks import ExampleRNG, make_threat
from robust_transfer.data import load_task
from robust_transfer.errors import UserError
from robust_transfer.models import ModelSpec, build_model
from robust_transfer.train import SourceConfig
from robust_transfer.train.distill import ARDLoss, DistillConfig, distill_objective
from robust_transfer.train.methods import FAST_STEP, make_objective

TASK = "synthetic-0to4"
EPS = 0.1


@pytest.fixture(scope="module")
def batch():
    data = load_task(TASK).train
    return data.x[:32], data.y[:32]


def _model(seed=0):
    return build_model(ModelSpec("cnn-small", 5, 1, (0.5,), (0.5,)), seed=seed).train()


def _pgd_by_hand(model, x, y, start, alpha, steps, train: bool):
    """Linf PGD on the summed CE from `start`, the model in train or eval mode (BatchNorm on
    batch or running statistics), then back to train mode (the loop's)."""
    model.train(train)
    x_adv = start
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y, reduction="sum"), x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + alpha * grad.sign(), x - EPS), x + EPS)
        x_adv = x_adv.clamp(0, 1)
    model.train()
    return x_adv.detach()


def _uniform_start(x, seed):
    return make_threat("linf", EPS).random_start(x, ExampleRNG.for_inputs(x, seed), 0)


def _same_state(a, b):
    for (name, u), v in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6, msg=name)


def _check(method, mode, expected_fn, batch, **options):
    """The objective's loss and the model's BatchNorm statistics after it equal the by-hand
    computation's; the other mode gives another loss (so the mode matters on this batch)."""
    x, y = batch
    losses = {}
    for m in ("eval", "train"):
        model, ref = _model(), _model()
        loss = make_objective(method, EPS, "linf", steps=3, seed=2, attack_mode=m,
                              **options)(model, x, y)
        if m == mode:
            torch.testing.assert_close(loss, expected_fn(ref, x, y), rtol=1e-5, atol=1e-6)
            _same_state(model, ref)
        losses[m] = float(loss.detach())
    assert abs(losses["eval"] - losses["train"]) > 1e-4, losses


def test_reference_attack_modes_are_the_recorded_defaults():
    modes = {m: SourceConfig(eps=EPS, norm="linf", method=m).attack_mode
             for m in ("pgd", "trades", "fgsm", "fast", "free")}
    assert modes == {"pgd": "eval", "trades": "eval", "fgsm": "train", "fast": "train",
                     "free": "train"}
    assert SourceConfig().attack_mode is None
    ard = SourceConfig(eps=EPS, norm="linf", distill=DistillConfig("ard"))
    assert ard.attack_mode == "train" and ard.to_dict()["attack_mode"] == "train"
    # Unchanged recipes keep their content (ids): pgd in eval mode records nothing new.
    assert "attack_mode" not in SourceConfig(eps=0.5).to_dict()
    assert SourceConfig(eps=0.5, attack_mode="train").to_dict()["attack_mode"] == "train"
    fast = SourceConfig(eps=0.5, method="fast", attack_mode="eval")
    assert SourceConfig(**{**fast.to_dict(), "train": fast.train}) == fast


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_pgd_examples_in_either_mode(batch, mode):
    def expected(ref, x, y):
        x_adv = _pgd_by_hand(ref, x, y, _uniform_start(x, 2 * 2**32), 2.5 * EPS / 3, 3,
                             mode == "train")
        return F.cross_entropy(ref(x_adv), y)

    _check("pgd", mode, expected, batch)


def test_fast_attacks_in_train_mode_as_wong(batch):
    def expected(ref, x, y):
        x_adv = _pgd_by_hand(ref, x, y, _uniform_start(x, 2 * 2**32), FAST_STEP * EPS, 1, True)
        return F.cross_entropy(ref(x_adv), y)

    _check("fast", "train", expected, batch)


def test_fgsm_attacks_in_train_mode(batch):
    def expected(ref, x, y):
        x_adv = _pgd_by_hand(ref, x, y, x, EPS, 1, True)
        return 0.5 * F.cross_entropy(ref(x), y) + 0.5 * F.cross_entropy(ref(x_adv), y)

    _check("fgsm", "train", expected, batch)


def _trades_by_hand(ref, x, y, beta, start_noise, step, steps=3):
    """trades_loss of TRADES' code (trades.py, Linf): attack in eval mode from
    x + 0.001 N(0, I) (clipped here, see KLPGD), KLDivLoss(sum) / batch size in the loss."""
    ref.eval()
    with torch.no_grad():  # the clean target as log-probabilities: the same KL, but its
        clean = F.log_softmax(ref(x), dim=1)  # 1e-12 gradients then keep their signs
    x_adv = (x + 0.001 * start_noise).clamp(0, 1)
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        kl = F.kl_div(F.log_softmax(ref(x_adv), dim=1), clean, reduction="sum",
                      log_target=True)
        (grad,) = torch.autograd.grad(kl, x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + step * grad.sign(), x - EPS), x + EPS)
        x_adv = x_adv.clamp(0, 1)
    ref.train()
    logits = ref(x)
    robust = F.kl_div(F.log_softmax(ref(x_adv), dim=1), F.softmax(logits, dim=1),
                      reduction="sum") / len(x)
    return F.cross_entropy(logits, y) + beta * robust


def test_trades_follows_its_reference_code(batch):
    x, y = batch
    noise = ExampleRNG.for_inputs(x, 2 * 2**32).normal(tuple(x.shape[1:]), 0)
    step = EPS * 0.007 / (8 / 255)

    def expected(ref, x, y):
        return _trades_by_hand(ref, x, y, 6.0, noise, step)

    _check("trades", "eval", expected, batch, trades_beta=6.0)
    # The former attack (uniform start, 2.5 eps / K) is another loss on this batch.
    ref = make_objective("trades", EPS, "linf", steps=3, seed=2, trades_beta=6.0)(_model(), x, y)
    old = make_objective("trades", EPS, "linf", steps=3, seed=2, trades_beta=6.0,
                         trades_attack="uniform")(_model(), x, y)
    assert abs(float(ref.detach()) - float(old.detach())) > 1e-3


@pytest.mark.parametrize("scaling", ["paper", "code"])
def test_ard_attacks_in_train_mode_with_the_papers_or_the_codes_kl(batch, scaling):
    x, y = batch
    teacher = _model(seed=7).eval()
    temperature, alpha = 4.0, 0.9
    cfg = DistillConfig("ard", temperature, alpha, kl_scaling=scaling)
    student, ref = _model(), _model()
    objective = distill_objective(cfg, teacher, EPS, "linf", attack_steps=3, seed=2)
    assert isinstance(objective, ARDLoss) and objective.examples.mode == "train"
    loss = objective(student, x, y)

    x_adv = _pgd_by_hand(ref, x, y, _uniform_start(x, 2 * 2**32), 2.5 * EPS / 3, 3, True)
    with torch.no_grad():
        t = teacher(x)
    p_t = F.softmax(t / temperature, dim=1)
    log_s = F.log_softmax(ref(x_adv) / temperature, dim=1)
    per_entry = p_t * (p_t.log() - log_s)  # (N, K)
    kl = per_entry.sum(1).mean() if scaling == "paper" else per_entry.mean()  # KLDivLoss()
    expected = alpha * temperature**2 * kl + (1 - alpha) * F.cross_entropy(ref(x), y)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    _same_state(student, ref)


@pytest.mark.parametrize("kwargs,match", [
    ({"eps": 0.0, "attack_mode": "train"}, "adversarial examples, not method 'natural'"),
    ({"eps": EPS, "method": "free", "attack_mode": "eval"}, "free AT"),
    ({"eps": EPS, "attack_mode": "test"}, "unknown attack mode"),
    ({"eps": EPS, "method": "trades", "trades_attack": "gauss"}, "unknown trades attack"),
    ({"eps": EPS, "method": "pgd", "trades_attack": "uniform"}, "applies to method 'trades'"),
])
def test_bad_attack_settings_are_user_errors(kwargs, match):
    with pytest.raises(UserError, match=match):
        SourceConfig(**kwargs)
    with pytest.raises(UserError, match="ARD only"):
        DistillConfig("kd", kl_scaling="code")


def test_cli_records_the_attack_mode_and_refuses_bad_ones(cli, tmp_path):
    import json

    out = tmp_path / "src"
    code, _out, err = cli("train", "--out", out, "--task", TASK, "--eps", EPS, "--norm", "linf",
                          "--method", "trades", "--trades-attack", "uniform", "--attack-mode",
                          "train", "--epochs", 1, "--attack-steps", 1)
    assert code == 0, err
    recipe = json.loads((out / "meta.json").read_text())["recipe"]
    assert recipe["attack_mode"] == "train" and recipe["trades_attack"] == "uniform"
    code, _out, err = cli("train", "--out", tmp_path / "bad", "--eps", EPS, "--method", "free",
                          "--attack-mode", "eval", "--epochs", 1)
    assert code == 2 and err.startswith("error: ") and err.strip().count("\n") == 0
    assert not (tmp_path / "bad").exists()
    code, _out, err = cli("distill", out, "--out", tmp_path / "d", "--attack-mode", "eval")
    assert code == 2 and "add --adversarial" in err and not (tmp_path / "d").exists()
    code, _out, err = cli("distill", out, "--out", tmp_path / "d", "--adversarial",
                          "--ard-kl-scaling", "half")
    assert code == 2 and "unknown ARD KL scaling 'half'" in err and not (tmp_path / "d").exists()



def test_spec_sources_carry_the_attack_options():
    from robust_transfer.transfer.spec import expand, parse_spec
    from test_study_seams import SPEC_DICT

    sources = [{"eps": 0.5}, {"eps": 0.5, "method": "fast", "attack_mode": "eval"},
               {"eps": 0.5, "method": "trades", "trades_attack": "uniform"}]
    runs = expand(parse_spec({**SPEC_DICT, "sources": sources, "seeds": [0]}))
    configs = list({r.source_id: r.source for r in runs}.values())
    assert [(c.method, c.attack_mode, c.trades_attack) for c in configs] == [
        ("pgd", "eval", None), ("fast", "eval", None), ("trades", "eval", "uniform")]
    with pytest.raises(UserError, match="free AT"):
        parse_spec({**SPEC_DICT, "sources": [{"eps": 0.5, "method": "free",
                                              "attack_mode": "eval"}]})


def test_distill_plan_records_ards_attack_mode_and_kl_scaling(source_dir):
    from robust_transfer.studies.distill import DistillStudy

    plan = DistillStudy(source_dir, adversarial=True, attack_mode="eval",
                        kl_scaling="code").plan()
    ard = plan.students["ARD student"]
    recipe = ard.to_dict()
    assert recipe["attack_mode"] == "eval" and recipe["distill"]["kl_scaling"] == "code"
    default = DistillStudy(source_dir, adversarial=True).plan()
    recipe = default.students["ARD student"].to_dict()
    assert recipe["attack_mode"] == "train" and "kl_scaling" not in recipe["distill"]
    assert all(s.attack_mode is None for n, s in default.students.items() if n != "ARD student")
