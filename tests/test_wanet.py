"""WaNet (Nguyen & Tran 2021): the warp field's properties against a hand-written bilinear
resampling, noise mode's true labels, options from the spec and the CLI, and the digits goal
(ASR >= 90% with C-Acc within 3 points of a clean model)."""

from __future__ import annotations

import pytest
import torch

from robust_transfer.backdoors.source import train_backdoor_source
from robust_transfer.data import load_task
from robust_transfer.data.poison import BackdoorConfig, poison
from robust_transfer.data.triggers import make_trigger
from robust_transfer.data.wanet import WaNet
from robust_transfer.errors import UserError
from robust_transfer.models import load_checkpoint
from robust_transfer.train import SourceConfig, TrainConfig
from robust_transfer.transfer.spec import parse_spec


def _bilinear(img: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """grid_sample(align_corners=True) written out: (H, W) image, (H, W, 2) grid in [-1, 1]."""
    h, w = img.shape
    out = torch.empty(grid.shape[:2], dtype=torch.float64)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            px = (float(grid[i, j, 0]) + 1) / 2 * (w - 1)
            py = (float(grid[i, j, 1]) + 1) / 2 * (h - 1)
            x0, y0 = min(int(px), w - 2), min(int(py), h - 2)
            fx, fy = px - x0, py - y0
            out[i, j] = ((1 - fx) * (1 - fy) * img[y0, x0] + fx * (1 - fy) * img[y0, x0 + 1]
                         + (1 - fx) * fy * img[y0 + 1, x0] + fx * fy * img[y0 + 1, x0 + 1])
    return out


def test_field_identity_seed_range_and_resampling():
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    x[0] = 0.0
    x[1] = 1.0
    assert torch.allclose(WaNet((1, 8, 8), s=0.0).apply(x), x, atol=1e-6)  # s = 0: identity
    a, b, c = (WaNet((1, 8, 8), k=4, s=0.5, seed=seed) for seed in (0, 0, 1))
    assert torch.equal(a.grid, b.grid) and not torch.equal(a.grid, c.grid)
    assert torch.equal(a.apply(x), b.apply(x))
    assert torch.allclose(a.control.abs().mean(), torch.tensor(1.0))  # their normalisation
    # bicubic with align_corners passes through the corner control points
    assert torch.allclose(a.flow[0, 0, 0], a.control[0, :, 0, 0], atol=1e-5)
    assert torch.allclose(a.flow[0, -1, -1], a.control[0, :, -1, -1], atol=1e-5)
    assert torch.allclose(a.grid, (a.identity + 0.5 * a.flow / 8).clamp(-1, 1))
    strong = WaNet((1, 8, 8), k=4, s=2.0, seed=3)
    for t in (a, strong):
        out = t.apply(x)
        assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
        assert torch.allclose(out[2, 0].double(), _bilinear(x[2, 0].double(), t.grid[0]),
                              atol=1e-5)
        assert (out - x).abs().max() > 0.05  # it does warp
    noisy = a.noise_examples(x, torch.Generator().manual_seed(0))
    assert noisy.min() >= 0 and noisy.max() <= 1 and not torch.allclose(noisy, a.apply(x))


@pytest.mark.parametrize("options, message", [
    ({"k": 9}, "wanet k"), ({"k": 1}, "wanet k"), ({"s": -0.1}, "wanet s"),
    ({"cross_ratio": -1}, "cross_ratio"), ({"alpha": 0.2}, "unknown option(s) alpha"),
])
def test_bad_options(options, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        BackdoorConfig("wanet", trigger_options=options).trigger((1, 8, 8))


def test_noise_mode_keeps_true_labels():
    task = load_task("digits-0to4")
    cfg = BackdoorConfig("wanet", rate=0.1, target=0, seed=2,
                         trigger_options={"cross_ratio": 2.0})
    data, index = poison(task.train, cfg, task.num_classes)
    changed = torch.nonzero((data.x != task.train.x).flatten(1).any(1)).flatten()
    cross = changed[~torch.isin(changed, index)]
    assert len(cross) == round(2.0 * len(index)) and torch.isin(index, changed).all()
    assert torch.equal(data.y[cross], task.train.y[cross])  # noise mode: true labels
    assert (data.y[index] == 0).all()
    trig = cfg.trigger(task.input_shape)
    assert torch.allclose(data.x[index], trig.apply(task.train.x[index]))
    assert not torch.allclose(data.x[cross], trig.apply(task.train.x[cross]))  # + noise
    again, _ = poison(task.train, cfg, task.num_classes)
    assert torch.equal(again.x, data.x)  # seeded
    off, _ = poison(task.train, BackdoorConfig("wanet", rate=0.1, target=0, seed=2,
                                               trigger_options={"cross_ratio": 0}), 5)
    assert int((off.x != task.train.x).flatten(1).any(1).sum()) == len(index)


def test_options_from_spec_and_config_records():
    cfg = BackdoorConfig("wanet", trigger_options={"s": 1.0, "k": 4})
    assert cfg.to_dict()["trigger_options"] == {"k": 4, "s": 1.0}
    assert BackdoorConfig.from_dict(cfg.to_dict()) == cfg and hash(cfg) is not None
    assert "trigger_options" not in BackdoorConfig("badnets").to_dict()  # old ids unchanged
    assert make_trigger("wanet", (1, 8, 8), seed=0, s=1.0).s == cfg.trigger((1, 8, 8)).s
    spec = parse_spec({
        "source": {"task": "digits-0to4", "epochs": 1},
        "sources": [{"eps": 0.0, "backdoor": {"attack": "wanet", "rate": 0.2, "target": 0,
                                              "trigger_options": {"k": 4, "s": 1.0}}}],
        "targets": ["digits-5to9"], "images_per_class": [1], "unfrozen_blocks": [0],
        "epochs": 1, "seeds": [0]})
    assert spec.sources[0].backdoor.trigger((1, 8, 8)).s == 1.0
    with pytest.raises(UserError, match="unknown option"):
        BackdoorConfig("badnets", trigger_options={"s": 1.0})


def test_cli_options_and_errors(cli, tmp_path):
    out = tmp_path / "bd"
    code, _, err = cli("backdoor", "attack", "--trigger", "wanet", "--wanet-k", "9",
                       "--out", out, "--epochs", "1")
    assert code == 2 and "wanet k" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli("backdoor", "attack", "--trigger", "badnets", "--wanet-s", "1",
                       "--out", out, "--epochs", "1")
    assert code == 2 and "unknown option(s) s for trigger 'badnets'" in err
    assert not out.exists()
    code, _, _ = cli("backdoor", "attack", "--task", "synthetic-0to4", "--trigger",
                          "wanet", "--wanet-s", "1", "--cross-ratio", "1", "--epochs", "1",
                          "--out", out)
    assert code == 0
    _, card = load_checkpoint(out)
    assert card.backdoor["trigger_options"] == {"cross_ratio": 1.0, "s": 1.0}


def test_digits_goal_asr_and_clean_accuracy():
    """Digits 0-4, k = 4, s = 1.0, 20% poisoned, noise mode (cross ratio 2), 60 epochs."""
    train = TrainConfig(epochs=60, lr=0.1, seed=0)
    backdoor = BackdoorConfig("wanet", rate=0.2, target=0,
                              trigger_options={"k": 4, "s": 1.0, "cross_ratio": 2.0})
    _, card = train_backdoor_source(SourceConfig(task="digits-0to4", backdoor=backdoor,
                                                 train=train))
    _, clean = train_backdoor_source(SourceConfig(task="digits-0to4", train=train))
    m = card.metrics
    assert m["asr"] >= 0.90
    assert m["clean_accuracy"] >= clean.metrics["clean_accuracy"] - 0.03
