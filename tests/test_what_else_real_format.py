"""The three "what else transfers" studies run unchanged on real-format data: an ImageFolder
tree of RGB PNGs (the layout of any real data set on disk), with the 32x32 architecture."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Source (4 classes) and target (3 classes) trees of 16x16 RGB PNGs, each class a colour."""
    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    for name, classes in (("src", 4), ("tgt", 3)):
        for c in range(classes):
            folder = root / name / f"class_{c}"
            folder.mkdir(parents=True)
            colour = rng.random(3) * 255
            for i in range(20):
                pixels = np.clip(rng.normal(colour, 40, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    return f"imagefolder:{root / 'src'}", f"imagefolder:{root / 'tgt'}"


def test_bias_transfer_on_image_folders(cli, folders, tmp_path):
    src, tgt = folders
    code, _, err = cli("bias-transfer", "--out", tmp_path / "bias", "--source-task", src,
                       "--target-task", tgt, "--arch", "cnn-medium", "--seeds", "1",
                       "--images-per-class", "2", "--source-epochs", "1", "--epochs", "1",
                       "--device", "cpu")
    assert code == 0, err
    table = pd.read_parquet(tmp_path / "bias" / "results.parquet")
    assert set(table.target_task) == {tgt} and len(table) == 2 * 2 * 2  # sources x modes x data
    assert table.train_images.eq(6).all()  # 2 images x 3 target classes


def test_watermark_and_survival_on_image_folders(cli, folders, tmp_path):
    src, tgt = folders
    ckpt, key = tmp_path / "wm", tmp_path / "key"
    code, out, err = cli("watermark", "embed", "--out", ckpt, "--key", key, "--task", src,
                         "--arch", "cnn-medium", "--epochs", "2", "--device", "cpu")
    assert code == 0, err
    code, out, err = cli("watermark", "remove", ckpt, "--key", key, "--out", tmp_path / "rm",
                         "--attack", "FTLL", "--transfer-task", tgt, "--transfer-blocks", "0",
                         "--seeds", "1", "--epochs", "1", "--device", "cpu")
    assert code == 0, err
    table = pd.read_parquet(tmp_path / "rm" / "watermark_study.parquet")
    assert {"FTLL", "transfer k=0"} <= set(table.model)
    code, out, err = cli("backdoor", "updates", "--out", tmp_path / "upd", "--task", src,
                         "--drift", "rotation", "--strength", "0", "1", "--updates", "1",
                         "--update-images", "20", "--update-epochs", "1", "--source-epochs",
                         "1", "--seeds", "1", "--lr-schedule", "constant", "--device", "cpu")
    assert code == 0, err
    survival = pd.read_parquet(tmp_path / "upd" / "results.parquet")
    assert set(survival.source_task) == {src} and set(survival["update"]) == {0, 1}
