"""Randomized smoothing (Cohen et al. 2019): CERTIFY against the exact radius of a linear
classifier, the alpha level over many repetitions on a model with known p_A, batch
independence, abstentions, PREDICT's two-sided test, the empirical upper bound, the `certify`
command, its figure and bad input."""

from __future__ import annotations

import json
import shutil

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import beta, binom, norm
from torch import nn

from robust_transfer.certify import (
    ABSTAIN,
    Smooth,
    SmoothedSoft,
    average_certified_radius,
    certified_accuracy,
    certify_dataset,
    empirical_robust_accuracy,
    radius_scale,
    table_radii,
)
from robust_transfer.data import load_task
from robust_transfer.errors import UserError
from robust_transfer.models import ModelSpec, build_model
from robust_transfer.report.certify_figures import certified_accuracy_figure


class Linear2(nn.Module):
    """f(x) = 1 if w.x + b > 0 else 0, as two logits (0, scale * (w.x + b))."""

    def __init__(self, w: torch.Tensor, b: float, scale: float = 1.0) -> None:
        super().__init__()
        self.w = nn.Parameter(w.flatten().clone(), requires_grad=False)
        self.b, self.scale = b, scale

    def forward(self, x):
        s = self.scale * (x.flatten(1) @ self.w + self.b)
        return torch.stack([torch.zeros_like(s), s], 1)


class Threshold(nn.Module):
    """Class 0 where coordinate 0 of the (noisy) input is below `t`, else class 1: at an input
    whose coordinate 0 is 0, p_0 = Phi(t / sigma) exactly."""

    def __init__(self, t: float) -> None:
        super().__init__()
        self.t = nn.Parameter(torch.tensor(float(t)), requires_grad=False)

    def forward(self, x):
        s = (x.flatten(1)[:, 0] >= self.t).float()
        return torch.stack([1 - s, s], 1)


def _cp_lower(n_a, n, alpha):
    """Clopper-Pearson one-sided lower bound, written out (independent of the module)."""
    return np.array([0.0 if k == 0 else beta.ppf(alpha, k, n - k + 1) for k in n_a])


def test_linear_classifier_radius_tends_to_the_exact_distance():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(1, 4, 4, generator=g), 0.1
    x = torch.rand(32, 1, 4, 4, generator=g) - 0.5
    sigma, n, alpha = 0.5, 20_000, 0.001
    model = Linear2(w, b)
    cert = Smooth(model, 2, sigma).certify(x, n0=100, n=n, alpha=alpha, seed=3)
    margin = (x.flatten(1) @ w.flatten() + b).double()
    exact = (margin.abs() / w.norm()).numpy()
    p_a = norm.cdf(exact / sigma)
    # the count of the top class lies (all but surely) between these quantiles; the radius
    # lies between the certificates they would give: the Clopper-Pearson slack for this n
    lo = sigma * norm.ppf(np.clip(_cp_lower(binom.ppf(1e-6, n, p_a), n, alpha), 0.5, None))
    hi = sigma * norm.ppf(_cp_lower(binom.isf(1e-6, n, p_a), n, alpha))
    r = cert.radius.numpy()
    certified = cert.prediction != ABSTAIN
    assert certified.sum() >= 28  # |margin| small only for a few
    assert (cert.prediction[certified] == (margin[certified] > 0).long()).all()  # g = f
    assert np.all(r <= hi + 1e-9) and np.all(r[certified.numpy()] >= lo[certified.numpy()] - 1e-9)
    assert np.all(r <= exact + (hi - exact).clip(min=0) + 1e-9)
    # approaches the exact radius: within the CP slack, well below it on average
    gap = exact[certified.numpy()] - r[certified.numpy()]
    assert 0 < gap.mean() < 0.1 * exact.mean()
    # abstain only where the bound could not pass 1/2
    assert (cert.p_lower[~certified] <= 0.5).all()


def test_certified_but_wrong_rate_stays_below_alpha():
    """Known p_A = Phi(t / sigma) = 0.8 for 20,000 distinct images (seed 0): CERTIFY is wrong
    when it returns a class other than g(x) = 0 or a radius above sigma * PhiInv(p_A); at
    alpha = 0.001 that may happen at most at rate alpha: the count of such images stays below
    the 1 - 1e-6 quantile of Binomial(20000, 0.001) (42). Abstentions follow the exact law
    of the selection on n0 draws and P(CP(n_A) <= 1/2), n_A ~ Binomial(n, p_A) (within the 1e-6
    two-sided quantiles of the resulting binomial count)."""
    sigma, p_a, n, alpha, reps = 0.5, 0.8, 100, 0.001, 20_000
    model = Threshold(sigma * norm.ppf(p_a))
    x = torch.zeros(reps, 1, 1, 2)
    x[:, 0, 0, 1] = torch.arange(reps) / reps  # distinct images, same p_A
    cert = Smooth(model, 2, sigma).certify(x, n0=10, n=n, alpha=alpha, batch_size=20_000)
    true_radius = sigma * norm.ppf(p_a)
    certified = cert.prediction != ABSTAIN
    wrong = certified & ((cert.prediction != 0) | (cert.radius > true_radius + 1e-12))
    assert wrong.sum().item() <= binom.ppf(1 - 1e-6, reps, alpha)
    # teeth: the point estimate n_A / n in place of the bound would exceed p_A about half the time
    assert (cert.counts[:, 0] / n > p_a).double().mean() > 0.3
    # abstain = select class 1 on the n0 draws (ties go to class 0), or CP(n_A) <= 1/2
    k = np.arange(n + 1)
    select_1 = binom.sf(5, 10, 1 - p_a)
    low = binom.pmf(k, n, p_a)[_cp_lower(k, n, alpha) <= 0.5].sum()
    abstain_p = select_1 + (1 - select_1) * low
    n_abstain = (~certified).sum().item()
    assert binom.ppf(1e-6, reps, abstain_p) <= n_abstain <= binom.isf(1e-6, reps, abstain_p)


def test_batch_independence():
    model = build_model(ModelSpec(num_classes=5), seed=0).eval()
    x = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    smooth = Smooth(model, 5, 0.25)
    batch = smooth.certify(x, n0=50, n=500, batch_size=1000, seed=7)
    alone = smooth.certify(x[5:6], n0=50, n=500, batch_size=1000, seed=7)
    small = smooth.certify(x, n0=50, n=500, batch_size=64, seed=7)
    assert torch.equal(alone.radius, batch.radius[5:6])
    assert torch.equal(small.radius, batch.radius) and torch.equal(small.counts, batch.counts)
    assert torch.equal(batch.counts.sum(1), torch.full((32,), 500))
    other = smooth.certify(x[5:6], n0=50, n=500, seed=8)
    assert not torch.equal(other.counts, alone.counts)  # the seed matters


def test_modes_restored_and_no_grads():
    model = build_model(ModelSpec(num_classes=5), seed=0).train()
    model.blocks.block1.eval()
    x = torch.rand(4, 1, 8, 8)
    Smooth(model, 5, 0.25).certify(x, n0=10, n=20)
    assert model.training and not model.blocks.block1.training
    assert all(p.grad is None for p in model.parameters())


def test_abstains_when_no_class_dominates():
    """A base classifier that is a fair coin under noise (threshold 0 on a zero coordinate):
    p_A = 1/2, so CERTIFY abstains with radius 0 and PREDICT mostly abstains."""
    model = Threshold(0.0)
    x = torch.zeros(200, 1, 1, 2)
    x[:, 0, 0, 1] = torch.arange(200) / 200
    smooth = Smooth(model, 2, 1.0)
    cert = smooth.certify(x, n0=100, n=1000)
    assert (cert.prediction == ABSTAIN).all() and (cert.radius == 0).all()
    pred = smooth.predict(x, n=1000, alpha=0.001)
    assert (pred == ABSTAIN).float().mean() > 0.95  # alpha bounds the rest


def test_predict_two_sided_binomial_test():
    """PREDICT abstains exactly where the two-sided p-value of n_A out of n_A + n_B at 1/2,
    written here as min(1, 2 * P(X >= n_A)), exceeds alpha."""
    sigma = 1.0
    model = Threshold(0.08)  # p_0 = 0.53: some images pass the test at n = 2000, some not
    x = torch.zeros(300, 1, 1, 2)
    x[:, 0, 0, 1] = torch.arange(300) / 300
    smooth = Smooth(model, 2, sigma)
    alpha = 0.05
    pred = smooth.predict(x, n=2000, alpha=alpha, seed=4)
    counts = smooth.counts(x, 2000, seed=4).numpy()
    n_a, n_b = counts.max(1), counts.min(1)
    p = np.minimum(1.0, 2 * binom.sf(n_a - 1, n_a + n_b, 0.5))
    expected = np.where(p <= alpha, counts.argmax(1), ABSTAIN)
    assert np.array_equal(pred.numpy(), expected)
    assert 0 < (expected == ABSTAIN).sum() < len(x)


@pytest.mark.parametrize("kwargs, message", [
    ({"sigma": 0.0}, "sigma must be"), ({"sigma": -1}, "sigma must be"),
    ({"n0": 200, "n": 100}, "must not exceed n"), ({"alpha": 0.0}, "alpha must be"),
    ({"alpha": 1.0}, "alpha must be"), ({"n": 0}, "n must be"), ({"n0": 1.5}, "n0 must be"),
])
def test_bad_input(kwargs, message):
    model = Threshold(0.0)
    sigma = kwargs.pop("sigma", 0.5)
    with pytest.raises(UserError, match=message):
        Smooth(model, 2, sigma).certify(torch.zeros(1, 1, 1, 2), **kwargs)


def test_bad_images_and_classes():
    with pytest.raises(UserError, match="num_classes"):
        Smooth(Threshold(0.0), 1, 0.5)
    with pytest.raises(UserError, match=r"\(N, C, H, W\)"):
        Smooth(Threshold(0.0), 2, 0.5).predict(torch.zeros(3, 2), n=10)


def test_summaries_against_hand_computation():
    radius = torch.tensor([0.0, 0.3, 0.6, 1.2, 0.9])
    correct = torch.tensor([False, True, True, False, True])
    assert certified_accuracy(radius, correct, [0, 0.3, 0.7]) == [0.6, 0.6, 0.2]
    assert average_certified_radius(radius, correct) == pytest.approx((0.3 + 0.6 + 0.9) / 5)
    assert radius_scale((3, 32, 32)) == 1.0
    assert table_radii((3, 32, 32)) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert table_radii((1, 8, 8)) == [round(r * (64 / 3072) ** 0.25, 3)
                                      for r in (0, 0.25, 0.5, 0.75, 1.0)]


def test_smoothed_soft_classifier_and_empirical_bound():
    """log G of a (near-hard: logits x 1000) linear classifier is log(1 - Phi, Phi) of its
    normalised margin over sigma (up to Monte Carlo error); PGD with EOT on it lowers g's
    accuracy as the radius grows, and never beats the exact robust accuracy of g = f
    (margin > r) by more than Monte Carlo noise."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1, 4, 4, generator=g)
    x = torch.rand(64, 1, 4, 4, generator=g)
    b = -float((x.flatten(1) @ w.flatten()).median())
    sigma = 0.25
    soft = SmoothedSoft(Linear2(w, b, scale=1000.0), sigma, m=4000)
    margin = (x.flatten(1) @ w.flatten() + b) / w.norm()
    p1 = torch.tensor(norm.cdf(margin.numpy() / sigma), dtype=torch.float32)
    assert torch.allclose(soft(x).exp()[:, 1], p1, atol=0.04)
    y = (margin > 0).long()
    smooth = Smooth(Linear2(w, b, scale=20.0), 2, sigma)
    radii = [0.0, 0.1, 0.3]
    acc = empirical_robust_accuracy(smooth, x, y, radii, n=400, m=8, eot_samples=2, steps=10)
    exact = [((margin.abs() > r) & ((margin > 0).long() == y)).float().mean().item()
             for r in radii]
    assert acc[0] >= 0.95 and acc[0] >= acc[1] >= acc[2]
    for a, e in zip(acc, exact, strict=True):
        assert a <= e + 0.08
    assert acc[2] <= exact[2] + 0.08 and acc[2] < acc[0] - 0.2


def test_certify_cli_writes_tables_and_figure(cli, source_dir, tmp_path):
    out = tmp_path / "cert"
    code, stdout, err = cli("certify", source_dir, "--sigma", "0.25", "0.5", "--n0", "20",
                            "--n", "100", "--max-images", "12", "--attack-steps", "2",
                            "--attack-n", "50", "--out", out)
    assert code == 0, err
    images = pd.read_csv(out / "certify.csv")
    summary = pd.read_csv(out / "certify_summary.csv")
    assert len(images) == 24 and set(images["sigma"]) == {0.25, 0.5}
    assert {"label", "prediction", "radius", "correct", "sigma"} <= set(images.columns)
    assert (images["correct"] == (images["prediction"] == images["label"])).all()
    assert ((images["prediction"] == -1) <= (images["radius"] == 0)).all()
    # the summary is the per-image table summarised: certified accuracy at each radius
    for row in summary.itertuples():
        df = images[images["sigma"] == row.sigma]
        assert row.certified_accuracy == pytest.approx(
            ((df["radius"] >= row.radius) & df["correct"]).mean())
    shape = load_task("synthetic-0to4").input_shape
    assert sorted(summary["radius"].unique()) == table_radii(shape)
    assert summary["empirical_accuracy"].notna().all()
    assert "certified/PGD+EOT accuracy at L2 radius" in stdout.replace("\n", " ")
    assert (out / "certified_accuracy.png").stat().st_size > 0


def test_certified_accuracy_figure_draws_what_a_person_sees():
    images = pd.DataFrame({"sigma": [0.25] * 4 + [0.5] * 4, "radius": [0, .1, .2, .4] * 2,
                           "correct": [False, True, True, True] * 2})
    summary = pd.DataFrame({"sigma": [0.25, 0.25, 0.5, 0.5], "radius": [0, 0.2] * 2,
                            "empirical_accuracy": [1.0, 0.8, 0.9, 0.7]})
    fig = certified_accuracy_figure(images, summary, "t")
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["σ = 0.25: certified (lower bound)", "σ = 0.25: PGD + EOT (upper bound)",
                      "σ = 0.5: certified (lower bound)", "σ = 0.5: PGD + EOT (upper bound)"]
    step = ax.get_lines()[0]
    x, y = step.get_xdata(), step.get_ydata()
    assert y[0] == 0.75 and y[np.searchsorted(x, 0.3)] == 0.25  # radius >= r and correct
    assert ax.get_xlabel() == "L2 radius"
    plt.close(fig)


@pytest.mark.parametrize("args, message", [
    (["--sigma", "0"], "sigma must be"), (["--sigma", "-0.5"], "sigma must be"),
    (["--sigma", "0.25", "--n0", "200", "--n", "100"], "must not exceed n"),
    (["--sigma", "0.25", "--alpha", "1.5"], "alpha must be"),
    (["--sigma", "0.25", "--alpha", "0"], "alpha must be"),
    (["--sigma", "0.25", "--radius", "-1"], "radii must be"),
    (["--sigma", "0.25", "--attack-steps", "0"], "attack steps"),
])
def test_certify_cli_bad_input(cli, source_dir, tmp_path, args, message):
    out = tmp_path / "cert"
    code, _, err = cli("certify", source_dir, *args, "--out", out)
    assert code == 2 and err.startswith("error:") and message in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_certify_cli_no_checkpoint(cli, tmp_path):
    out = tmp_path / "cert"
    code, _, err = cli("certify", tmp_path / "nothing", "--sigma", "0.25", "--out", out)
    assert code == 2 and "no checkpoint" in err and not out.exists()


def test_repeated_sigma_is_certified_once(cli, source_dir, tmp_path):
    """`--sigma 0.25 --sigma 0.25` used to certify twice and write every row twice."""
    w = torch.ones(1, 2, 2)
    x, y = torch.rand(3, 1, 2, 2), torch.tensor([1, 1, 0])
    result = certify_dataset(Linear2(w, -2.0), x, y, [0.25, 0.5, 0.25], 2, n0=10, n=50,
                             attack=None)
    assert list(result.images["sigma"]) == [0.25] * 3 + [0.5] * 3
    assert list(result.summary["sigma"].unique()) == [0.25, 0.5]
    out = tmp_path / "cert"
    code, _, err = cli("certify", source_dir, "--sigma", "0.25", "--sigma", "0.25", "--n0", "10",
                       "--n", "20", "--max-images", "3", "--no-attack", "--out", out)
    assert code == 0, err
    assert len(pd.read_csv(out / "certify.csv")) == 3


def test_certify_an_imported_checkpoint_needs_task(cli, source_dir, tmp_path):
    """An imported checkpoint records `task: ""`; certify said "unknown task ''"."""
    ckpt = tmp_path / "imported"
    shutil.copytree(source_dir, ckpt)
    meta = json.loads((ckpt / "meta.json").read_text())
    (ckpt / "meta.json").write_text(json.dumps({**meta, "task": ""}))
    out = tmp_path / "cert"
    code, _, err = cli("certify", ckpt, "--sigma", "0.25", "--out", out)
    assert code == 2 and "records no task" in err and "--task" in err and not out.exists()
