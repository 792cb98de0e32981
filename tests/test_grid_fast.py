"""The batched fine-tuning engine against the per-run reference, its fallback, and the grid's
batched work units (resume without duplicates)."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import re
import shutil

import pandas as pd
import pytest
import torch
from torch import nn

from grid_fixtures import RecordingExecutor
from robust_transfer.models import load_checkpoint, save_checkpoint
from robust_transfer.models.runtime import predict_logits
from robust_transfer.train.loop import batch_bounds
from robust_transfer.transfer import batched, run
from robust_transfer.transfer.engines import finetune
from robust_transfer.transfer.finetune import FinetuneConfig, finetune_per_run
from robust_transfer.transfer.grid import _FinetuneBatch, run_grid
from robust_transfer.transfer.results import done_run_ids, read_results
from robust_transfer.transfer.run import finetune_many_from_checkpoint
from robust_transfer.transfer.spec import expand, parse_spec

TARGET = "synthetic-5to9"


def _cfgs(blocks, shots=3, seeds=(0, 1, 2), epochs=3):
    return [FinetuneConfig(TARGET, shots, blocks, epochs, 0.1, 32, s) for s in seeds]


def _assert_same_histories(got, ref):
    assert len(got) == len(ref)
    for g, r in zip(got, ref, strict=True):
        assert [list(e) for e in g] == [list(e) for e in r]  # same keys, same order
        for a, b in zip(g, r, strict=True):
            assert a["epoch"] == b["epoch"] and a["epoch_lr"] == b["epoch_lr"]
            assert a["train_images"] == b["train_images"]
            assert a["test_accuracy"] == b["test_accuracy"]
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("blocks,shots", [(0, 3), (1, 7), (None, 3)])
def test_batched_runs_match_per_run_runs_epoch_by_epoch(source_dir, blocks, shots):
    """Head only, one block, all blocks; 7 shots x 5 classes = 35 images: a last partial
    batch of 3 every epoch. Each run keeps its own subset, order and head: the seeds'
    histories differ from each other but each equals its per-run reference."""
    model, _ = load_checkpoint(source_dir)
    cfgs = _cfgs(blocks, shots)
    ref = [finetune_per_run(copy.deepcopy(model), c) for c in cfgs]
    got = batched.finetune_batch(copy.deepcopy(model), cfgs)
    _assert_same_histories(got, ref)
    assert len({tuple(e["train_loss"] for e in h) for h in got}) == len(cfgs)


@pytest.mark.parametrize("blocks", [0, None])
def test_a_last_batch_of_one_joins_the_one_before_in_both_engines(source_dir, blocks):
    """5 images (1 per class) in batches of 4: one batch of 5 per epoch, in both engines (a
    batch of 1 cannot train BatchNorm where a block's output is 1x1)."""
    model, _ = load_checkpoint(source_dir)
    cfgs = [FinetuneConfig(TARGET, 1, blocks, 3, 0.1, 4, s) for s in (0, 1)]
    ref = [finetune_per_run(copy.deepcopy(model), c) for c in cfgs]
    _assert_same_histories(batched.finetune_batch(copy.deepcopy(model), cfgs), ref)
    assert batch_bounds(5, 4) == [(0, 5)]


@pytest.mark.parametrize("blocks", [0, 1, None])
def test_finetune_takes_the_fast_path_and_leaves_the_same_model(source_dir, blocks):
    """`finetune` (auto) writes the batched run's weights back: same predictions, same
    weights and BN running stats (to float rounding) as the per-run reference."""
    model, _ = load_checkpoint(source_dir)
    cfg = FinetuneConfig(TARGET, 5, blocks, 3, seed=4)
    fast, ref = copy.deepcopy(model), copy.deepcopy(model)
    calls = []
    original = batched.finetune_batch

    def spy(*a, **kw):
        calls.append(1)
        return original(*a, **kw)

    batched.finetune_batch = spy
    try:
        got = finetune(fast, cfg)
    finally:
        batched.finetune_batch = original
    want = finetune(ref, cfg, engine="per-run")
    assert calls == [1]
    _assert_same_histories([got], [want])
    x = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(predict_logits(fast, x).argmax(1), predict_logits(ref, x).argmax(1))
    state_fast, state_ref = fast.state_dict(), ref.state_dict()
    assert state_fast.keys() == state_ref.keys()
    for key, value in state_ref.items():
        if value.dtype.is_floating_point:
            torch.testing.assert_close(state_fast[key], value, rtol=1e-4, atol=1e-5)
        else:
            assert torch.equal(state_fast[key], value), key  # num_batches_tracked
    assert [p.requires_grad for p in fast.parameters()] == [
        p.requires_grad for p in ref.parameters()]
    assert not any(m.training for m in fast.modules())


def test_frozen_batchnorm_stays_frozen_in_the_batched_engine(source_dir):
    """With one block unfrozen, the frozen blocks' weights and BN running stats are
    bit-identical after training, while the unfrozen block's running stats moved."""
    model, _ = load_checkpoint(source_dir)
    before = copy.deepcopy(model.state_dict())
    finetune(model, FinetuneConfig(TARGET, 5, 1, 2, seed=0))
    after = model.state_dict()
    frozen = [k for k in before if k.startswith(("blocks.block1.", "blocks.block2."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["blocks.block3.1.running_mean"],
                           after["blocks.block3.1.running_mean"])
    assert not any(p.requires_grad for p in model.blocks.block2.parameters())


class _OtherBlock(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.inner = block

    def forward(self, x):
        return self.inner(x)


def test_applies_covers_the_standard_protocol_only(source_dir):
    model, card = load_checkpoint(source_dir)
    cfg = FinetuneConfig(TARGET, 3, 1, 2)
    assert batched.applies(model, cfg, card)
    assert not batched.applies(model, cfg, dataclasses.replace(card, backdoor={"target": 0}))
    assert not batched.applies(model, cfg, dataclasses.replace(card, role="finetune"))
    recipe = {**card.recipe, "trigger": "badnets"}  # a field this engine does not know
    assert not batched.applies(model, cfg, dataclasses.replace(card, recipe=recipe))
    odd = copy.deepcopy(model)
    odd.blocks.block3 = _OtherBlock(odd.blocks.block3)
    assert not batched.applies(odd, cfg, card)
    hooked = copy.deepcopy(model)
    hooked.blocks.block1.register_forward_hook(lambda *_: None)
    assert not batched.applies(hooked, cfg, card)

    @dataclasses.dataclass(frozen=True)
    class ExtraConfig(FinetuneConfig):
        asr_every_epoch: bool = True

    assert not batched.applies(model, ExtraConfig(TARGET, 3, 1, 2), card)


def test_a_non_standard_source_takes_the_per_run_path(source_dir, tmp_path, monkeypatch):
    """A source whose metadata holds more than the standard protocol (here a backdoor record)
    is fine-tuned run by run through the per-run path; a standard one is batched."""
    model, card = load_checkpoint(source_dir)
    odd_dir = save_checkpoint(model, tmp_path / "odd",
                              dataclasses.replace(card, backdoor={"target": 0}))
    cfgs = _cfgs(0, seeds=(0, 1))
    batched_calls, per_run_calls = [], []
    original_batch, original_run = batched.finetune_batch, finetune_per_run
    monkeypatch.setattr(batched, "finetune_batch",
                        lambda *a, **k: batched_calls.append(1) or original_batch(*a, **k))
    dispatcher = importlib.import_module("robust_transfer.transfer.engines")
    monkeypatch.setattr(dispatcher, "finetune_per_run",
                        lambda *a, **k: per_run_calls.append(1) or original_run(*a, **k))
    odd = finetune_many_from_checkpoint(odd_dir, cfgs)
    assert batched_calls == [] and per_run_calls == [1, 1]
    standard = finetune_many_from_checkpoint(source_dir, cfgs)
    assert batched_calls == [1] and per_run_calls == [1, 1]
    for a, b in zip(odd, standard, strict=True):
        assert [r["test_accuracy"] for r in a] == [r["test_accuracy"] for r in b]
        assert {k for k in a[0] if k != "source_recipe"} == set(b[0]) - {"source_recipe"}


def test_per_run_fallbacks_read_the_checkpoint_once_and_start_from_the_source(
        source_dir, tmp_path, monkeypatch):
    """Fallback runs of one checkpoint share one read of it, and each starts from the source's
    weights, not from the previous run's: the same rows as one `finetune_from_checkpoint`
    call per run (with an unfrozen block, so a leaked update would change them)."""
    model, card = load_checkpoint(source_dir)
    odd_dir = save_checkpoint(model, tmp_path / "odd",
                              dataclasses.replace(card, backdoor={"target": 0}))
    cfgs = _cfgs(1, seeds=(0, 1))
    separate = [run.finetune_from_checkpoint(odd_dir, c) for c in cfgs]
    reads = []
    original = run.load_checkpoint
    monkeypatch.setattr(run, "load_checkpoint",
                        lambda *a, **k: reads.append(1) or original(*a, **k))
    together = finetune_many_from_checkpoint(odd_dir, cfgs)
    assert reads == [1]
    assert all(row.pop("engine") == "per-run" for rows in together for row in rows)
    assert together == separate


SPEC = {
    "source": {"task": "synthetic-0to4", "epochs": 1, "attack_steps": 1},
    "sources": [{"eps": 0.0, "norm": "l2"}, {"eps": 0.5, "norm": "l2"}],
    "targets": [TARGET], "images_per_class": [2], "unfrozen_blocks": [0, 1],
    "epochs": 2, "seeds": [0, 1, 2, 3, 4],
}


def test_a_killed_batched_grid_resumes_without_duplicates(tmp_path):
    """Batches hold several runs; a partial results dir (as a kill leaves it: some runs'
    parts written) is finished with exactly the missing runs, each once, and the table
    equals the uninterrupted grid's (accuracy exactly, loss to float rounding)."""
    spec = parse_spec(SPEC)
    recorder = RecordingExecutor()
    full = read_results(run_grid(spec, tmp_path / "full", executor=recorder))
    fine_tunes = [u for u in recorder.units if isinstance(u, _FinetuneBatch)]
    assert len(fine_tunes) == 4 and all(len(u.jobs) == 5 for u in fine_tunes)
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full" / "sources", part / "sources")
    kept = sorted(done_run_ids(tmp_path / "full"))[::3]
    (part / "results").mkdir()
    for run_id in kept:
        shutil.copy(tmp_path / "full" / "results" / f"{run_id}.parquet", part / "results")
    done = []
    resumed = read_results(run_grid(spec, part, executor=RecordingExecutor(),
                                    on_run_done=done.append))
    expected = {r.run_id for r in expand(spec)}
    assert sorted(done) == sorted(expected - set(kept))
    assert set(resumed.run_id) == expected and not resumed.duplicated(["run_id", "epoch"]).any()
    key = ["run_id", "epoch"]
    a = full.sort_values(key).reset_index(drop=True)
    b = resumed.sort_values(key).reset_index(drop=True)
    assert list(a.columns) == list(b.columns) and (a.dtypes == b.dtypes).all()
    pd.testing.assert_frame_equal(a.drop(columns="train_loss"), b.drop(columns="train_loss"))
    assert (a.train_loss - b.train_loss).abs().max() < 1e-5
    assert json.loads((part / "runs.json").read_text())["run_ids"] == sorted(expected)


def test_grid_command_ends_with_the_fine_tune_rate(tmp_path, capsys):
    """`grid` ends with "N fine-tunes in S s (R per s; ENGINE n at r per s)" on stdout (a
    result, not progress), N the fine-tunes it ran; a re-run that finds everything done says
    0."""
    from robust_transfer.cli import main

    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(json.dumps({**SPEC, "sources": SPEC["sources"][:1], "seeds": [0, 1],
                                     "unfrozen_blocks": [0]}))
    lines, notes = [], []
    for _ in range(2):
        with pytest.raises(SystemExit) as exit_info:
            main(["grid", str(spec_file), "--out", str(tmp_path / "g"), "--workers", "1"])
        assert (exit_info.value.code or 0) == 0
        captured = capsys.readouterr()
        lines.append(captured.out.strip().splitlines()[-1])
        assert "fine-tunes in" not in captured.err and "results:" not in captured.err
        notes.append(captured.err)
    assert re.fullmatch(r"2 fine-tunes in \d+\.\d s \(\d+\.\d per s; batched 2 at \d+\.\d "
                        r"per s\)", lines[0]), lines[0]
    assert lines[1].startswith("0 fine-tunes in "), lines[1]
    assert "2 of 2 fine-tunes already done; nothing left to run" in notes[1], notes[1]


def test_batched_runs_adapt_grey_targets_like_the_per_run_path():
    """An RGB 16x16 source on the grey 8x8 target: the engine adapts the images as
    `finetune_per_run` does (repeat to 3 channels, resize) before its prefix features."""
    from robust_transfer.models import ModelSpec, build_model

    model = build_model(ModelSpec("cnn-small", 5, 3, (0.5,) * 3, (0.5,) * 3, input_size=16),
                        seed=0)
    cfgs = _cfgs(1, seeds=(0, 1), epochs=2)
    ref = [finetune_per_run(copy.deepcopy(model), c) for c in cfgs]
    _assert_same_histories(batched.finetune_batch(copy.deepcopy(model), cfgs), ref)
