import numpy as np
import pytest
import torch

from robust_transfer.data import load_task, shots_per_class
from robust_transfer.data.datasets import cifar10
from robust_transfer.data.tasks import clear_caches
from robust_transfer.errors import UserError


def test_digits_tasks_are_the_named_classes_in_unit_range():
    src, tgt = load_task("digits-0to4"), load_task("digits-5to9")
    assert src.classes == (0, 1, 2, 3, 4) and tgt.classes == (5, 6, 7, 8, 9)
    assert len(src.train) + len(src.test) + len(tgt.train) + len(tgt.test) == 1797
    for t in (src, tgt):
        assert t.train.x.min() >= 0 and t.train.x.max() <= 1
        assert set(t.train.y.tolist()) == set(range(5))
        assert t.input_shape == (1, 8, 8)


def test_split_is_fixed_stratified_and_disjoint():
    t = load_task("digits-5to9")
    load_task.cache_clear()
    again = load_task("digits-5to9")
    assert torch.equal(t.train.x, again.train.x) and torch.equal(t.test.y, again.test.y)
    train_rows = {tuple(r) for r in t.train.x.flatten(1).tolist()}
    test_rows = {tuple(r) for r in t.test.x.flatten(1).tolist()}
    # Digits contains a few exact duplicate images; the split itself must not share indices,
    # so overlap can be at most those few duplicates.
    assert len(train_rows & test_rows) <= 3
    n_test, n_train = torch.bincount(t.test.y), torch.bincount(t.train.y)
    test_fraction = n_test / (n_test + n_train)
    assert ((test_fraction - 0.3).abs() < 0.02).all()  # stratified: 30% of every class


def test_k_shot_subsets_reproducible_by_seed_and_inside_train():
    y = load_task("digits-5to9").train.y
    a, b = shots_per_class(y, 5, seed=3), shots_per_class(y, 5, seed=3)
    c = shots_per_class(y, 5, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.bincount(y[a]).tolist() == [5] * 5
    assert a.max() < len(y) and len(set(a.tolist())) == 25
    assert len(shots_per_class(y, "all", seed=0)) == len(y)


def test_too_many_shots_is_a_user_error():
    y = load_task("digits-5to9").train.y
    with pytest.raises(UserError, match="more than class"):
        shots_per_class(y, 1000, seed=0)
    with pytest.raises(UserError):
        shots_per_class(y, 0, seed=0)


def test_unknown_task_names_allowed_ones():
    with pytest.raises(UserError, match="digits-0to4"):
        load_task("cifar-11")


def _write_cifar(root, per_batch: int = 12) -> None:
    """Tiny files in CIFAR-10's binary format: [label][1024 R][1024 G][1024 B] per record."""
    directory = root / "cifar-10-batches-bin"
    directory.mkdir(parents=True)
    gen = np.random.default_rng(0)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        labels = np.arange(per_batch, dtype=np.uint8) % 10
        pixels = gen.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        pixels[:, 0], pixels[:, 1024], pixels[:, 2048] = 255, 0, 128  # first pixel R, G, B
        np.concatenate([labels[:, None], pixels], axis=1).tofile(directory / name)


@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    _write_cifar(tmp_path)
    monkeypatch.setenv("ROBUST_TRANSFER_DATA", str(tmp_path))
    clear_caches()
    yield tmp_path
    clear_caches()


def test_cifar10_binary_files_load_with_the_official_split(cifar_root):
    train, test = cifar10()
    assert train.x.shape == (60, 3, 32, 32) and test.x.shape == (12, 3, 32, 32)
    assert train.x.min() >= 0 and train.x.max() <= 1
    # channel planes in order R, G, B; row-major within a plane
    assert train.x[0, :, 0, 0].tolist() == pytest.approx([1.0, 0.0, 128 / 255])
    assert train.y[:10].tolist() == list(range(10))
    task = load_task("cifar10-5to9")
    assert task.num_classes == 5 and task.input_shape == (3, 32, 32)
    assert sorted(set(task.train.y.tolist())) == [0, 1, 2, 3, 4] and len(task.test) == 5


def test_cifar10_source_trains_on_the_medium_net(cifar_root):
    from robust_transfer.train import SourceConfig, TrainConfig, train_source

    model, card = train_source(SourceConfig(task="cifar10-0to4", arch="cnn-medium", eps=8 / 255,
                                            norm="linf", attack_steps=1,
                                            train=TrainConfig(epochs=1, batch_size=16)))
    assert model.spec.in_channels == 3 and model.spec.arch == "cnn-medium"
    assert 0 <= card.metrics["robust_accuracy"] <= card.metrics["clean_accuracy"] + 1e-9


def test_missing_or_corrupt_cifar_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUST_TRANSFER_DATA", str(tmp_path))
    with pytest.raises(UserError, match="CIFAR-10 not found"):
        cifar10()
    _write_cifar(tmp_path)
    with open(tmp_path / "cifar-10-batches-bin" / "test_batch.bin", "ab") as f:
        f.write(b"\x00" * 10)
    with pytest.raises(UserError, match="corrupt CIFAR-10"):
        cifar10()
