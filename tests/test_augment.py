"""Fine-tuning augmentation: seeded, shape- and range-preserving, real crops and flips."""

import pytest
import torch
import torch.nn.functional as F

from robust_transfer.data import load_task
from robust_transfer.data.augment import RandomCropFlip, crop_padding
from robust_transfer.transfer.finetune import FinetuneConfig, augmentation
from robust_transfer.transfer.run import finetune_from_checkpoint
from robust_transfer.transfer.spec import expand, parse_spec


def _images(n=16, size=8):
    return load_task("digits").train.x[:n] if size == 8 else torch.rand(n, 3, size, size)


def test_padding_scales_with_the_image_size():
    assert [crop_padding(s) for s in (8, 28, 32, 64, 224)] == [1, 4, 4, 8, 28]


def test_same_seed_same_images_other_seed_other_images():
    x = _images()
    a, b = RandomCropFlip(flip=True, seed=3)(x), RandomCropFlip(flip=True, seed=3)(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, RandomCropFlip(flip=True, seed=4)(x))


@pytest.mark.parametrize("flip,size", [(False, 8), (True, 8), (True, 32)])
def test_each_image_is_a_padded_crop_or_its_mirror(flip, size):
    x = _images(24, size)
    out = RandomCropFlip(flip=flip, seed=0)(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, x)
    p = crop_padding(size)
    padded = F.pad(x, (p, p, p, p))
    flipped = 0
    for i in range(len(x)):  # a reference by slicing, one image at a time (test only)
        crops = {(dy, dx, m): padded[i, :, dy:dy + size, dx:dx + size].flip(-1) if m else
                 padded[i, :, dy:dy + size, dx:dx + size]
                 for dy in range(2 * p + 1) for dx in range(2 * p + 1) for m in (0, 1)}
        hits = [k for k, c in crops.items() if torch.equal(c, out[i])]
        assert hits, f"image {i} is no crop of its padded original"
        flipped += all(k[2] for k in hits)
    assert (flipped > 0) == flip


def test_flips_only_where_a_mirror_image_keeps_the_class():
    assert augmentation(FinetuneConfig("digits-5to9")) is None
    assert augmentation(FinetuneConfig("digits-5to9", augment=True)).flip is False
    assert augmentation(FinetuneConfig("synthetic-5to9", augment=True)).flip is False
    assert augmentation(FinetuneConfig("cifar10-5to9", augment=True)).flip is True


def test_augment_is_a_spec_key_and_off_keeps_run_ids(source_dir):
    spec = {"source": {"task": "synthetic-0to4"}, "sources": [{"eps": 0.0}],
            "targets": ["synthetic-5to9"], "images_per_class": [3], "unfrozen_blocks": [0],
            "epochs": 2, "seeds": [0]}
    plain, aug = expand(parse_spec(spec))[0], expand(parse_spec({**spec, "augment": True}))[0]
    assert "augment" not in plain.finetune.to_dict()  # ids of existing grids do not move
    assert aug.finetune.augment and aug.run_id != plain.run_id
    rows_plain = finetune_from_checkpoint(source_dir, plain.finetune)
    rows_aug = finetune_from_checkpoint(source_dir, aug.finetune)
    assert rows_aug[-1]["augment"] is True and rows_plain[-1]["augment"] is False
    assert rows_aug[-1]["train_loss"] != rows_plain[-1]["train_loss"]
    assert rows_aug == finetune_from_checkpoint(source_dir, aug.finetune)  # seeded
