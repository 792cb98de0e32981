"""Input defenses and adaptive attacks: transforms against independent computations, BPDA and
EOT against the naive attack (Athalye et al. 2018), masking warnings, the squeeze detector,
the defense parser and the `defend` command."""

from __future__ import annotations

import copy
import warnings
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import median_filter
from typer.testing import CliRunner

from attack_fixtures import digits_batch, natural_model
from robust_transfer.attacks import APGDT, PGD, GradientMaskingWarning, Square, bpda_scope
from robust_transfer.attacks import evaluate as attack_eval
from robust_transfer.attacks.adaptive import eot_gradient
from robust_transfer.attacks.losses import get_loss
from robust_transfer.cli import app, expand_multi_value_options, main
from robust_transfer.data import load_task
from robust_transfer.defenses import (
    BitDepth,
    Defended,
    MedianSmoothing,
    RandomResizePad,
    SqueezeDetector,
    parse_defenses,
)
from robust_transfer.errors import UserError
from robust_transfer.models import ModelSpec, SourceCard, build_model, save_checkpoint
from robust_transfer.report.defense_figures import defense_figure
from robust_transfer.studies import load_study
from robust_transfer.studies.defend import DefendStudy


@cache
def invariant_model():
    """A digits CNN trained on randomly resized and padded inputs (the setting Xie et al.
    assume: a classifier that tolerates the transform), so random resize-pad keeps its
    clean accuracy and naive vs EOT is a fair comparison."""
    task = load_task("digits-0to4")
    model = build_model(ModelSpec(num_classes=5), seed=0)
    aug = RandomResizePad(seed=1)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    g = torch.Generator().manual_seed(0)
    x, y = task.train.x, task.train.y
    for _ in range(4):
        for idx in torch.randperm(len(x), generator=g).split(64):
            loss = F.cross_entropy(model(aug(x[idx])), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def _robust(model, x, y, eps=0.1, **adaptive):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GradientMaskingWarning)
        if isinstance(model, Defended):
            model.reseed(0)
        table = attack_eval(model, x, y, ["pgd"], [eps], steps=10, **adaptive)
    fired = {w.message.check for w in caught if isinstance(w.message, GradientMaskingWarning)}
    return table["robust_accuracy"].iloc[-1], table["clean_accuracy"].iloc[0], fired


# ---- transforms ------------------------------------------------------------------------

def test_bit_depth_and_median_equal_independent_computation():
    x = torch.rand(3, 2, 7, 6, generator=torch.Generator().manual_seed(0))
    for bits in (1, 3, 5):
        expected = np.rint(x.numpy() * (2**bits - 1)) / (2**bits - 1)
        assert np.allclose(BitDepth(bits)(x).numpy(), expected, atol=1e-7)
    for k in (2, 3, 4):  # Xu et al.'s reference: scipy median_filter, mode="reflect"
        expected = median_filter(x.numpy(), size=(1, 1, k, k), mode="reflect")
        assert np.array_equal(MedianSmoothing(k)(x).numpy(), expected), k


def test_transforms_keep_shape_and_range_and_are_seeded():
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    for t in (BitDepth(2), MedianSmoothing(3)):
        out = t(x)
        assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
    a, b = RandomResizePad(seed=3), RandomResizePad(seed=3)
    first = a(x)
    assert first.shape == (5, 1, 10, 10)  # default canvas at 8x8: max(round(8.86), 10)
    assert 0 <= first.min() and first.max() <= 1
    assert torch.equal(first, b(x)) and torch.equal(a(x), b(x))  # same seed, same sequence
    assert not torch.equal(a(x), a(x))  # fresh draws each call
    a.reseed(3)
    assert torch.equal(a(x), first)
    assert not torch.equal(RandomResizePad(seed=4)(x), first)
    # every output is the image resized to r in {8, 9} and shifted: the ink is conserved
    # for r = 8 and scaled by at most (9/8)^2 for r = 9
    ratio = first.sum((1, 2, 3)) / x.sum((1, 2, 3))
    assert ((ratio > 0.999) & (ratio < (9 / 8) ** 2 + 1e-3)).all()
    assert RandomResizePad(16, seed=0)(x).shape == (5, 1, 16, 16)


def test_bpda_scope_replaces_backward_by_identity_only_inside():
    x = torch.rand(4, 1, 8, 8, requires_grad=True)
    t = BitDepth(3)
    (g_plain,) = torch.autograd.grad(t(x).sum(), x)
    with bpda_scope(True):
        out = t(x)
        (g_bpda,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(out.detach(), t(x).detach())  # same forward values
    assert (g_plain == 0).all() and (g_bpda == 1).all()
    with pytest.raises(RuntimeError), bpda_scope(True):
        raise RuntimeError
    (g_after,) = torch.autograd.grad(t(x).sum(), x)  # the scope ended with the exception
    assert (g_after == 0).all()


# ---- adaptive attacks ------------------------------------------------------------------

def test_bpda_restores_undefended_robust_accuracy_on_bit_depth():
    model = natural_model()
    x, y = digits_batch(100)
    undefended, _, _ = _robust(model, x, y)
    defended = Defended(model, BitDepth(4))
    naive, clean, naive_fired = _robust(defended, x, y)
    bpda, _, bpda_fired = _robust(defended, x, y, bpda=True)
    assert clean > 0.9
    assert naive > undefended + 0.15  # the masked gradient hides the vulnerability
    assert abs(bpda - undefended) <= 0.08  # "within a few points" (here BPDA: 0.06 lower)
    assert "zero_gradients" in naive_fired and "zero_gradients" not in bpda_fired


def test_eot_is_lower_than_naive_on_random_resize_pad():
    model = invariant_model()
    x, y = digits_batch(100)
    defended = Defended(model, RandomResizePad(seed=0))
    naive, clean, naive_fired = _robust(defended, x, y)
    eot, _, eot_fired = _robust(defended, x, y, eot_samples=10)
    assert clean > 0.8
    assert eot < naive - 0.02
    assert "randomized" in naive_fired and "randomized" not in eot_fired


def test_eot_gradient_is_the_mean_over_draws():
    model = natural_model()
    x, y = digits_batch(6)
    loss = get_loss("ce")
    one, _, _ = eot_gradient(model, loss, x, y, None, 1)
    three, _, _ = eot_gradient(model, loss, x, y, None, 3, max_batch=12)  # two passes
    assert torch.allclose(one, three, atol=1e-6)  # deterministic model: every draw alike
    defended = Defended(model, RandomResizePad(seed=0))
    mean, _, _ = eot_gradient(defended, loss, x, y, None, 4)
    defended.reseed(0)  # the same draws, one copy of the batch at a time
    xr = x.repeat(4, 1, 1, 1).requires_grad_(True)
    (g,) = torch.autograd.grad(loss(defended(xr), y.repeat(4), None).sum(), xr)
    assert torch.allclose(mean, g.view(4, *x.shape).mean(0), atol=1e-6)


def test_adaptive_attacks_keep_the_contract():
    model = copy.deepcopy(natural_model()).train()
    defended = Defended(model, BitDepth(4), RandomResizePad(seed=0))
    x, y = digits_batch(8)
    x_adv = PGD(defended, 0.1, steps=2, seed=0).set_adaptive(bpda=True, eot_samples=3)(x, y)
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert not x_adv.requires_grad
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and 0 <= x_adv.min() and x_adv.max() <= 1
    atk = APGDT(defended, 0.1, steps=2, n_target_classes=1).set_adaptive(True, 2)
    assert atk.inner.bpda and atk.inner.eot_samples == 2
    with pytest.raises(UserError, match="does not take eot_samples"):
        Square(defended, 0.1).set_adaptive(eot_samples=2)
    with pytest.raises(UserError, match="eot_samples must be an integer >= 1"):
        attack_eval(defended, x, y, ["pgd"], [0.1], eot_samples=0)


# ---- detector --------------------------------------------------------------------------

def test_squeeze_detector_fpr_and_detection():
    model = natural_model()
    x, y = digits_batch(100)
    x_cal, _ = digits_batch(150, offset=100)
    det = SqueezeDetector(model, [BitDepth(3)]).fit(x_cal, fpr=0.05)
    assert det.detect(x_cal).float().mean() <= 0.05  # on the threshold's own data
    with torch.no_grad():  # the score, independently: L1 between softmaxes
        p, q = model(x_cal).softmax(1), model(BitDepth(3)(x_cal)).softmax(1)
    assert torch.allclose(det.score(x_cal), (p - q).abs().sum(1), atol=1e-5)
    x_adv = PGD(model, 0.2, steps=10, seed=0)(x, y)
    fooled = model(x_adv).argmax(1) != y
    assert fooled.sum() > 30
    assert det.detect(x_adv[fooled]).float().mean() > 0.3
    with pytest.raises(UserError, match="false-positive rate"):
        det.fit(x_cal, fpr=1.5)


# ---- parser ----------------------------------------------------------------------------

def test_parse_defenses():
    specs = parse_defenses("squeeze-bits:4, median:2,random-resize,squeeze-bits:2+median:3")
    assert [s.label for s in specs] == ["squeeze-bits:4", "median:2", "random-resize",
                                        "squeeze-bits:2+median:3"]
    assert [s.label for s in parse_defenses(["median", "median:2"])] == ["median:2"]
    d = specs[3].build(natural_model())
    assert not d.differentiable and not d.randomized
    assert specs[2].build(natural_model()).randomized
    for text, match in [("blur", "unknown defense 'blur'; defenses: squeeze-bits"),
                        ("squeeze-bits:x", "integer parameter"),
                        ("squeeze-bits:0", "bit depth must be an integer in 1..16"),
                        ("median:1", "median window must be an integer in 2..9"),
                        ("random-resize:1", "canvas size must be an integer >= 2"),
                        ("median+", "unknown defense ''"), (" , ", "no defense given")]:
        with pytest.raises(UserError, match=match):
            parse_defenses(text)


# ---- CLI -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    card = SourceCard(task="digits-0to4", eps=0.0, norm="l2")
    return save_checkpoint(natural_model(), tmp_path_factory.mktemp("def") / "nat", card)


def test_defend_prints_table_and_writes_figure_and_csv(checkpoint, tmp_path):
    out = tmp_path / "out"
    args = ["defend", checkpoint, "--defense", "squeeze-bits:4,random-resize", "--eps",
            "0.1", "0.2", "--n", "40", "--steps", "3", "--eot-samples", "2", "--out", out]
    result = CliRunner().invoke(app, expand_multi_value_options([str(a) for a in args]),
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for text in ("naive robust", "adaptive robust", "BPDA", "EOT-2", "zero_gradients",
                 "randomized", "feature-squeezing detector"):
        assert text in result.output, text
    assert {"defenses.csv", "defenses_vs_eps.png", "detector.csv"} <= {p.name for p in
                                                                       out.iterdir()}
    import pandas as pd

    table = pd.read_csv(out / "defenses.csv", keep_default_na=False)
    assert list(table["defense"].unique()) == ["none", "squeeze-bits:4", "random-resize"]
    bits = table[table["defense"] == "squeeze-bits:4"]
    assert (bits["naive_robust_accuracy"] > bits["adaptive_robust_accuracy"]).all()
    assert (bits["naive_warnings"] == "zero_gradients").all()
    assert (bits["adaptive_warnings"] == "").all()
    fig = defense_figure(table.replace("", float("nan")).fillna({"naive_warnings": "",
                                                                  "adaptive_warnings": ""}))
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 3
    assert "naive warnings: zero_gradients" in visible[1].get_title()
    labels = [t.get_text() for t in visible[1].get_legend().get_texts()]
    assert labels == ["clean", "naive attack", "adaptive (BPDA)", "undefended robust"]
    assert [len(line.get_xdata()) for line in visible[1].get_lines()] == [2, 2, 2, 2]
    assert visible[2].get_xlabel() == "eps (linf)"


@pytest.mark.parametrize("args, match", [
    (["--defense", "blur"], "error: unknown defense 'blur'; defenses: squeeze-bits[:N]"),
    (["--defense", "median:1"], "error: median window must be an integer in 2..9"),
    (["--defense", "random-resize", "--attack", "square"],
     "error: attack 'square' cannot average gradients"),
    (["--defense", "median", "--eot-samples", "0"], "error: --eot-samples must be >= 1"),
    (["--defense", "median", "--eps", "-1"], "error: eps must be >= 0"),
])
def test_defend_bad_input_exits_2_with_one_line(checkpoint, tmp_path, capsys, args, match):
    with pytest.raises(SystemExit) as exit_info:
        main(["defend", str(checkpoint), *args, "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(match), lines
    assert not (tmp_path / "x").exists()


def test_defend_spec_runs_resumably_and_report_redraws(checkpoint, tmp_path, cli):
    """--save-spec writes the spec the options make; --spec and `run` run it (the same run
    ids, so the second finds them done); `report DIR` redraws the study's files; a different
    checkpoint at the same path gets new run ids (its sha256 is in them)."""
    spec = tmp_path / "defend.yaml"
    opts = ["--defense", "median:2", "--eps", "0.1", "--n", "20", "--steps", "2"]
    assert cli("defend", checkpoint, *opts, "--save-spec", spec)[0] == 0
    study = load_study(spec)
    assert (study.name, study.defenses, study.eps) == ("defend", ("median:2",), (0.1,))
    code, out, err = cli("defend", "--spec", spec, "--out", tmp_path / "a", "--device", "cpu")
    assert code == 0, err
    assert "3 runs in" in out  # none, median:2 and the detector (median is a squeezer)
    code, out, err = cli("run", spec, "--out", tmp_path / "a", "--device", "cpu")
    assert code == 0 and "0 runs in" in out and "3 of 3 runs already done" in err
    code, out, err = cli("report", tmp_path / "a", "--out", tmp_path / "r")
    assert code == 0, err
    for name in ("defenses.csv", "detector.csv"):
        assert (tmp_path / "r" / name).read_text() == (tmp_path / "a" / name).read_text()
    assert (tmp_path / "r" / "defenses_vs_eps.png").is_file()
    other = save_checkpoint(build_model(ModelSpec(num_classes=5), seed=1), tmp_path / "c",
                            SourceCard(task="digits-0to4"))
    before = DefendStudy(other, ("median:2",)).run_ids()
    save_checkpoint(natural_model(), other, SourceCard(task="digits-0to4"))
    after = DefendStudy(other, ("median:2",)).run_ids()
    assert len(before) == 3 and not set(before) & set(after)


@pytest.mark.parametrize("args, match", [
    (["--defense", "median"], "error: give a checkpoint directory (or --spec FILE)"),
    (["{ckpt}"], "error: give --defense (or --spec FILE)"),
    (["--spec", "{bad}"], "error: unknown key(s) defence for defend spec"),
    (["--spec", "{grid}"], "is a grid spec, not a defend spec"),
])
def test_defend_spec_bad_input_exits_2(checkpoint, tmp_path, capsys, args, match):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"study: defend\ncheckpoint: {checkpoint}\ndefence: [median]\n")
    grid = Path(__file__).parent / "data" / "studies" / "grid.yaml"
    args = [a.format(ckpt=checkpoint, bad=bad, grid=grid) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        main(["defend", *args, "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and match in lines[0], lines
    assert not (tmp_path / "x").exists()
