"""The GPU path: bf16 autocast and channels-last in the one loop, off (bit-identical) on CPU.

What CPU can prove: bf16 autocast on CPU trains to about fp32's accuracy, amp off (the CPU
default) is bit-identical to the plain loop. The CUDA tests run where CUDA exists.
"""

import pytest
import torch
import torch.nn.functional as F

from robust_transfer.data import load_task
from robust_transfer.data.augment import RandomCropFlip
from robust_transfer.models import ModelSpec, build_model
from robust_transfer.models.runtime import accuracy
from robust_transfer.train import TrainConfig, fit
from robust_transfer.train.examples import PGDExamples
from robust_transfer.train.objectives import ExampleLoss
from robust_transfer.transfer import FinetuneConfig
from robust_transfer.transfer.run import finetune_from_checkpoint

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CFG = TrainConfig(epochs=3, batch_size=64, lr=0.05)


def _train(amp, device="cpu", objective=None):
    task = load_task("digits-0to4")
    model = build_model(ModelSpec("cnn-small", 5, 1), seed=0).to(device)
    kwargs = {} if objective is None else {"objective": objective}
    history = fit(model, task.train, CFG, amp=amp, **kwargs)
    return model, history, accuracy(model, task.test.x, task.test.y, amp=False)


class _Recording(ExampleLoss):
    """Natural loss that records the dtype of the logits the loop's objective sees."""

    dtypes: list

    def __call__(self, model, x, y):
        logits = model(x)
        self.dtypes.append(logits.dtype)
        return F.cross_entropy(logits, y)


def test_bf16_autocast_on_cpu_trains_close_to_fp32():
    recorder = _Recording()
    recorder.dtypes = []
    _, history, acc_amp = _train(True, objective=recorder)
    _, _, acc_fp32 = _train(False)
    assert set(recorder.dtypes) == {torch.bfloat16}  # autocast really ran
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert acc_fp32 > 0.8 and abs(acc_amp - acc_fp32) < 0.05


def test_amp_is_off_by_default_on_cpu():
    a, ha, _ = _train(None)
    b, hb, _ = _train(False)

    def results(history):  # wall time is not a result
        return [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in history]

    assert results(ha) == results(hb)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(),
                                                 b.state_dict().values(), strict=True))


@CUDA
def test_cuda_fit_uses_bf16_and_channels_last_and_learns():
    recorder = _Recording()
    recorder.dtypes = []
    model, history, acc = _train(None, "cuda", recorder)
    assert set(recorder.dtypes) == {torch.bfloat16}
    weight = model.blocks.block1[0].weight
    assert weight.dtype == torch.float32 and weight.is_contiguous(
        memory_format=torch.channels_last)
    _, _, acc_fp32 = _train(False, "cuda")
    assert acc > 0.8 and abs(acc - acc_fp32) < 0.05


@CUDA
def test_cuda_pgd_examples_under_autocast_keep_the_attack_contract():
    task = load_task("digits-0to4")
    model = build_model(ModelSpec("cnn-small", 5, 1), seed=0).cuda()
    x, y = task.train.x[:64].cuda(), task.train.y[:64].cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        x_adv = PGDExamples(1.0, "l2", 3, None, 0)(model, x, y)
    assert x_adv.dtype == torch.float32 and not x_adv.requires_grad
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    delta = (x_adv - x).flatten(1).norm(dim=1)
    assert (delta <= 1.0 + 1e-4).all() and delta.max() > 0.5
    assert all(p.grad is None for p in model.parameters())


@CUDA
def test_cuda_augmentation_equals_cpu_augmentation():
    x = torch.rand(32, 3, 32, 32)
    cpu = RandomCropFlip(flip=True, seed=5)(x)
    gpu = RandomCropFlip(flip=True, seed=5)(x.cuda())
    assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu)


@CUDA
def test_cuda_finetune_from_checkpoint(source_dir):
    cfg = FinetuneConfig("synthetic-5to9", 5, "all", epochs=3, augment=True)
    rows = finetune_from_checkpoint(source_dir, cfg, device="cuda")
    assert len(rows) == 3 and rows[-1]["test_accuracy"] > 0.5


def test_lazy_image_folder_through_loader_workers_trains_like_the_tensor(tmp_path):
    from PIL import Image

    from robust_transfer.data import ImageSet
    from robust_transfer.data.lazy import LazyImageFolder

    task = load_task("digits-0to4")
    x, y = task.train.x[:40], task.train.y[:40]
    pixels = (x * 255).round().to(torch.uint8)
    for i in range(len(y)):
        folder = tmp_path / f"class_{int(y[i])}"
        folder.mkdir(exist_ok=True)
        Image.fromarray(pixels[i, 0].numpy(), mode="L").save(folder / f"{i:03d}.png")
    lazy = LazyImageFolder(tmp_path, channels=1)
    assert lazy.classes == [f"class_{c}" for c in sorted(set(y.tolist()))]
    images, labels = zip(*(lazy[i] for i in range(len(lazy))), strict=True)
    eager = ImageSet(torch.stack(images), torch.tensor(labels))
    assert torch.equal(torch.sort(eager.y).values, torch.sort(y).values)
    cfg = TrainConfig(epochs=2, batch_size=16)
    histories = []
    for data, workers in ((eager, 0), (lazy, 2)):
        model = build_model(ModelSpec("cnn-small", 5, 1), seed=0)
        histories.append(fit(model, data, cfg, loader_workers=workers))
    without_time = [[{k: v for k, v in r.items() if k != "epoch_seconds"} for r in h]
                    for h in histories]
    assert without_time[0] == without_time[1]  # same seeded order, same numbers
