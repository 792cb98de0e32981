"""Foreign checkpoints: MadryLab robustness and torchvision files import with their logits
intact; files that would run code while loading are refused without running it."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from robust_transfer.cli import main
from robust_transfer.errors import UserError
from robust_transfer.models import ModelSpec, build_model, load_checkpoint
from robust_transfer.models.foreign import IMAGENET_MEAN, IMAGENET_STD, import_checkpoint
from robust_transfer.transfer import FinetuneConfig
from robust_transfer.transfer.run import finetune_from_checkpoint


class InputNormalize(nn.Module):
    """robustness.helpers.InputNormalize: buffers new_mean/new_std shaped [3, 1, 1]."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("new_mean", torch.tensor(mean).view(3, 1, 1))
        self.register_buffer("new_std", torch.tensor(std).view(3, 1, 1))

    def forward(self, x):
        return (torch.clamp(x, 0, 1) - self.new_mean) / self.new_std


class Attacker(nn.Module):
    def __init__(self, model, normalize):
        super().__init__()
        self.model, self.normalize = model, normalize


class AttackerModel(nn.Module):
    """robustness.attacker.AttackerModel's layout: normalizer, model, attacker.{normalize,
    model} (the same modules again, so the state dict holds every weight twice)."""

    def __init__(self, model, mean, std):
        super().__init__()
        self.normalizer = InputNormalize(mean, std)
        self.model = model
        self.attacker = Attacker(model, InputNormalize(mean, std))

    def forward(self, x):
        return self.model(self.normalizer(x))


MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def _bare_resnet(arch: str = "resnet18", classes: int = 10, seed: int = 0):
    """A torchvision-layout network without a normaliser of its own (identity normaliser,
    whose buffers are dropped from the state dict), with non-default BN statistics."""
    net = build_model(ModelSpec(arch, classes, 3, (0.0,) * 3, (1.0,) * 3), seed=seed)
    with torch.no_grad():
        net.train()(torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(5)))
    return net.eval()


def _torchvision_state(net) -> dict:
    return {k: v for k, v in net.state_dict().items() if not k.startswith("normalizer.")}


class _Backbone(nn.Module):
    """What robustness wraps: the torchvision net itself (its state dict, our forward)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def state_dict(self, *args, **kwargs):
        return _torchvision_state(self.net)


X = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def madry_file(tmp_path_factory):
    """A robustness checkpoint as `torch.save` writes it after DataParallel training."""
    net = _bare_resnet()
    wrapper = AttackerModel(net, MEAN, STD)
    state = {}
    for key, value in wrapper.state_dict().items():
        if key.startswith(("model.normalizer.", "attacker.model.normalizer.")):
            continue  # the bare net's identity normaliser is ours, not robustness's
        state[f"module.{key}"] = value
    assert "module.attacker.model.layer4.1.bn2.running_var" in state
    assert state["module.normalizer.new_mean"].shape == (3, 1, 1)
    path = tmp_path_factory.mktemp("madry") / "cifar_l2_0_5.pt"
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []},
                "schedule": None, "epoch": 150, "nat_prec1": torch.tensor(90.8),
                "adv_prec1": torch.tensor(70.2)}, path)
    with torch.no_grad():
        return path, wrapper(X)


def test_madry_file_imports_with_the_same_logits(madry_file, tmp_path):
    path, logits = madry_file
    out = import_checkpoint(path, "robustness", "resnet18", tmp_path / "ck", eps=0.5, norm="l2")
    model, card = load_checkpoint(out)
    with torch.no_grad():
        assert torch.allclose(model(X), logits, atol=1e-5)
    assert card.role == "source" and card.eps == 0.5 and card.norm == "l2"
    assert card.model.mean == pytest.approx(MEAN) and card.model.num_classes == 10
    assert card.metrics["clean_accuracy"] == pytest.approx(0.908)
    assert card.imported_from["epoch"] == 150 and card.imported_from["format"] == "robustness"


def test_imported_source_fine_tunes(madry_file, tmp_path):
    out = import_checkpoint(madry_file[0], "robustness", "resnet18", tmp_path / "ck")
    cfg = FinetuneConfig("synthetic-5to9", 2, 0, epochs=1)
    # a grey 8x8 target: repeated to 3 channels (and resized when the source records a size)
    rows = finetune_from_checkpoint(out, cfg)
    assert rows[-1]["source_arch"] == "resnet18" and 0 <= rows[-1]["test_accuracy"] <= 1


def test_torchvision_file_uses_imagenet_normalisation(tmp_path):
    net = _bare_resnet()
    path = tmp_path / "resnet18.pth"
    torch.save({f"module.{k}": v for k, v in _torchvision_state(net).items()}, path)
    model, card = load_checkpoint(import_checkpoint(path, "torchvision", "resnet18",
                                                    tmp_path / "ck", input_size=32))
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(
        1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model(X), net((X - mean) / std), atol=1e-5)
    assert card.eps is None and card.model.input_size == 32


def test_safetensors_state_dict_with_given_normaliser(tmp_path):
    net = _bare_resnet("preact-resnet18", 4)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in _torchvision_state(net).items()}, path)
    with pytest.raises(UserError, match="no normaliser"):
        import_checkpoint(path, "state-dict", "preact-resnet18", tmp_path / "a")
    model, _ = load_checkpoint(import_checkpoint(path, "state-dict", "preact-resnet18",
                                                 tmp_path / "b", mean=(0.0,) * 3, std=(1.0,) * 3))
    with torch.no_grad():
        assert torch.allclose(model(X), net(X), atol=1e-6)


def test_mismatches_name_the_first_bad_key(madry_file, tmp_path):
    with pytest.raises(UserError, match=r"key 'layer1.0.conv1.weight' has shape \(64, 64, 3, 3\)"):
        import_checkpoint(madry_file[0], "robustness", "resnet50", tmp_path / "a")
    with pytest.raises(UserError, match="--num-classes 1000 does not match.*'fc.weight' has 10"):
        import_checkpoint(madry_file[0], "robustness", "resnet18", tmp_path / "b", 1000)
    with pytest.raises(UserError, match="no key 'linear.weight'"):
        import_checkpoint(madry_file[0], "robustness", "preact-resnet18", tmp_path / "c")
    assert not any((tmp_path / d).exists() for d in "abc")


class Payload:
    """Unpickling this object calls open(marker, 'w'): it creates a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_pickle_that_runs_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"conv1.weight": torch.zeros(1)}, "extra": Payload(marker)}, path)
    with pytest.raises(UserError, match=r"refusing .*evil\.pt.*needs code.*GLOBAL io\.open.*"
                                        r"weights_only=False.*state dict"):
        import_checkpoint(path, "robustness", "resnet18", tmp_path / "ck")
    assert not marker.exists() and not (tmp_path / "ck").exists()
    torch.load(path, weights_only=False)  # the payload is real: a full unpickle runs it
    assert marker.exists()


def test_cli_import_and_its_errors_are_one_line(madry_file, tmp_path, capsys):
    def run(*args):
        with pytest.raises(SystemExit) as exit_info:
            main([str(a) for a in args])
        return exit_info.value.code or 0, capsys.readouterr().err

    ok = run("import", madry_file[0], "--format", "robustness", "--arch", "resnet18",
             "--out", tmp_path / "ck", "--eps", "0.5", "--norm", "l2", "--num-classes", "10")
    assert ok[0] == 0 and load_checkpoint(tmp_path / "ck")[1].eps == 0.5
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    for args, message in [
        ((madry_file[0], "--format", "onnx", "--arch", "resnet18"), "unknown format 'onnx'"),
        ((madry_file[0], "--format", "robustness", "--arch", "resnet9"), "unknown arch"),
        ((madry_file[0], "--format", "robustness", "--arch", "resnet18", "--eps", "1"),
         "--eps and --norm together"),
        ((madry_file[0], "--format", "robustness", "--arch", "resnet18", "--eps", "1",
          "--norm", "l7"), "unknown norm"),
        ((junk, "--format", "torchvision", "--arch", "resnet18"), "cannot read"),
        ((tmp_path / "none.pt", "--format", "torchvision", "--arch", "resnet18"),
         "does not exist"),
    ]:
        code, err = run("import", *args, "--out", tmp_path / "new")
        assert code == 2 and err.startswith("error: ") and message in err, (args, err)
        assert len(err.strip().splitlines()) == 1 and not (tmp_path / "new").exists()
    for args, message in [
        ((madry_file[0], "--format", "onnx", "--arch", "resnet18"), "unknown format 'onnx'"),
        ((madry_file[0], "--format", "robustness", "--arch", "resnet18"), "already holds"),
    ]:
        code, err = run("import", *args, "--out", tmp_path / "ck")
        assert code == 2 and err.startswith("error: ") and message in err, (args, err)
        assert len(err.strip().splitlines()) == 1
