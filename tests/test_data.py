import pytest
import torch

from robust_transfer.data import load_task, shots_per_class
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
