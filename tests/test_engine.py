"""The general batched engine (`transfer.stacked`) against the per-run reference for every
registered architecture, its BatchNorm and memory invariants, and `grid --engine`."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import logging
import shutil

import pytest
import torch

from grid_fixtures import RecordingExecutor
from robust_transfer.data import ImageSet, load_task
from robust_transfer.models import ARCHS, SourceCard
from robust_transfer.train import SourceConfig, TrainConfig, train_source
from robust_transfer.train.freeze import frozen_blocks
from robust_transfer.transfer import stacked
from robust_transfer.transfer.finetune import FinetuneConfig, finetune_per_run
from robust_transfer.transfer.grid import _FinetuneBatch, run_grid
from robust_transfer.transfer.results import done_run_ids, read_results
from robust_transfer.transfer.spec import expand, parse_spec

TARGET = "synthetic-5to9"
finetune_module = importlib.import_module("robust_transfer.transfer.finetune")


_SOURCES: dict[str, torch.nn.Module] = {}


def _model(arch: str):
    """A briefly trained source of `arch` on the 8x8 synthetic 0-4 task (cached)."""
    if arch not in _SOURCES:
        cfg = SourceConfig(task="synthetic-0to4", arch=arch,
                           train=TrainConfig(epochs=2, batch_size=32, lr=0.02))
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)  # trained in float32 (the fixture may be on)
        try:
            _SOURCES[arch] = train_source(cfg)[0]
        finally:
            torch.set_default_dtype(default)
    return copy.deepcopy(_SOURCES[arch])


@pytest.fixture
def float64(monkeypatch):
    """Both engines in float64 (model, data, new heads). In float32 the two engines' sums in
    another order differ by ~1e-6, and on these tiny nets that is enough to flip a ReLU or a
    near-tied argmax: ResNet-18 at 8x8 runs layer2-4 at 1x1 with BatchNorm over 5 images,
    where a 1e-5 difference in a block's input moved a BN bias gradient by 4% (measured); in
    float64 both agree to ~1e-12, so equal predictions test the algorithm, not luck."""
    def double_task(name):
        t = load_task(name)
        return dataclasses.replace(t, train=ImageSet(t.train.x.double(), t.train.y),
                                   test=ImageSet(t.test.x.double(), t.test.y))

    monkeypatch.setattr(finetune_module, "load_task", double_task)
    monkeypatch.setattr(stacked, "load_task", double_task)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # new heads (nn.Linear) in float64
    yield
    torch.set_default_dtype(default)


def _cfgs(k, seeds=(0, 1), shots=2, augment=False):
    """2 epochs on 2 images per class, batches of 5."""
    return [FinetuneConfig(TARGET, shots, k, 2, 0.01, 5, s, augment) for s in seeds]


def _same(got, ref, loss_rel=1e-4):
    """Equal predictions per epoch (test accuracy), losses to float rounding."""
    assert len(got) == len(ref)
    for g, r in zip(got, ref, strict=True):
        assert [e["test_accuracy"] for e in g] == [e["test_accuracy"] for e in r]
        assert [(e["epoch"], e["epoch_lr"], e["train_images"]) for e in g] == [
            (e["epoch"], e["epoch_lr"], e["train_images"]) for e in r]
        assert [e["train_loss"] for e in g] == pytest.approx([e["train_loss"] for e in r],
                                                             rel=loss_rel)


@pytest.mark.parametrize("k", [0, 1, None])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_stacked_runs_equal_per_run_runs_for_every_arch(arch, k, float64):
    """Two seeds of one shape through the stacked engine: each run's per-epoch test accuracy
    equals its per-run reference (its own subset, order, head and BN statistics)."""
    model = _model(arch).double()
    cfgs = _cfgs(k)
    ref = [finetune_per_run(copy.deepcopy(model), c) for c in cfgs]
    # fit records the loss in fp32
    _same(stacked.finetune_stacked(copy.deepcopy(model), cfgs), ref, loss_rel=1e-6)


@pytest.mark.parametrize("k", [1, None])
def test_augmented_runs_batch_with_their_own_draws(k, float64):
    """--augment: each run draws its own crops (as `finetune.augmentation(cfg)` does per run);
    the prefix runs per step on them, the suffixes are stacked."""
    model = _model("resnet18").double()
    cfgs = _cfgs(k, augment=True)
    ref = [finetune_per_run(copy.deepcopy(model), c) for c in cfgs]
    # fit records the loss in fp32
    _same(stacked.finetune_stacked(copy.deepcopy(model), cfgs), ref, loss_rel=1e-6)


def test_frozen_bn_stays_frozen_and_unfrozen_bn_is_each_runs_own():
    """k=1 on ResNet-18: written back, the frozen blocks are bit-identical to the source and
    the unfrozen block's weights and running stats equal the per-run reference's; two runs
    trained together give each the history it has alone (no BN statistics shared)."""
    model = _model("resnet18")
    cfgs = _cfgs(1, seeds=(3, 4))
    alone = [stacked.finetune_stacked(copy.deepcopy(model), [c])[0] for c in cfgs]
    together = stacked.finetune_stacked(copy.deepcopy(model), cfgs)
    _same(together, alone, loss_rel=1e-5)
    assert alone[0] != alone[1]
    fast, ref = copy.deepcopy(model), copy.deepcopy(model)
    stacked.finetune_stacked(fast, [cfgs[0]], write_back=True)
    finetune_per_run(ref, cfgs[0])
    before, got, want = model.state_dict(), fast.state_dict(), ref.state_dict()
    last = "layer4.1."
    for key, value in want.items():
        if key.startswith(("layer", "conv1", "bn1")) and not key.startswith(last):
            assert torch.equal(got[key], before[key]), key  # frozen: untouched
        elif value.dtype.is_floating_point:
            torch.testing.assert_close(got[key], value, rtol=1e-3, atol=1e-4)
        else:
            assert torch.equal(got[key], value), key  # num_batches_tracked
    assert not torch.equal(got[last + "bn1.running_mean"], before[last + "bn1.running_mean"])
    assert len(frozen_blocks(fast)) == len(fast.blocks) - 1
    assert not any(m.training for m in fast.modules())


def test_runs_are_chunked_to_the_memory_budget(caplog):
    """A budget for about two runs: five runs in chunks, the same histories as in one chunk,
    and a note saying so; a budget below one run is a one-line UserError."""
    from robust_transfer.errors import UserError

    model = _model("preact-resnet18")
    cfgs = _cfgs(1, seeds=range(5))
    whole = stacked.finetune_stacked(copy.deepcopy(model), cfgs)
    suffix_params = sum(p.numel() for p in model.split(1)[1].parameters())
    run_bytes = stacked.RUN_PARAM_COPIES * 4 * suffix_params
    with caplog.at_level(logging.WARNING, logger=stacked.__name__):
        chunked = stacked.finetune_stacked(copy.deepcopy(model), cfgs,
                                           max_memory=int(2.5 * run_bytes))
    assert "5 runs of one shape trained in 3 chunks of up to 2 runs" in caplog.text
    _same(chunked, whole, loss_rel=1e-5)
    with pytest.raises(UserError, match="max memory .* raise --max-memory"):
        stacked.finetune_stacked(copy.deepcopy(model), cfgs, max_memory=run_bytes // 2)
    with pytest.raises(UserError, match=r"max memory 9.31e-06 GiB .*needs \(\d\.\d+e-0\d GiB"):
        stacked.plan_chunks(1, 1000, 10**4, 1, 2, 10**4)  # not "0.00 GiB ... (0.00 GiB"
    assert stacked.plan_chunks(10, 100, 10, 1, 2, 100 + 14 * 4) == (4, 14)


def test_why_not_names_what_the_engine_does_not_cover():
    model = _model("resnet18")
    cfg = _cfgs(1)[0]
    assert stacked.why_not(model, cfg, SourceCard(role="source", recipe={"arch": "resnet18"})
                           ) is None
    assert stacked.why_not(model, cfg, SourceCard(role="source", imported_from={})) is None
    assert "backdoor" in stacked.why_not(model, cfg, SourceCard(role="source", backdoor={}))
    assert "'backdoor'" in stacked.why_not(
        model, cfg, SourceCard(role="source", recipe={"backdoor": {"attack": "badnets"}}))
    assert "finetune" in stacked.why_not(model, cfg, SourceCard(role="finetune"))
    hooked = copy.deepcopy(model)
    hooked.layer4.register_forward_hook(lambda *_: None)
    assert stacked.why_not(hooked, cfg) == "the model has hooks"


RESNET_SPEC = {
    "source": {"task": "synthetic-0to4", "arch": "resnet18", "epochs": 1, "attack_steps": 1},
    "sources": [{"eps": 0.0, "norm": "l2"}],
    "targets": [TARGET], "images_per_class": [2], "unfrozen_blocks": [0, 1],
    "epochs": 2, "seeds": [0, 1, 2, 3], "lr": 0.01,
}


def test_a_killed_batched_resnet_grid_resumes_without_lost_or_duplicate_rows(tmp_path):
    """A ResNet-18 grid trained by the stacked engine (`engine` column "batched"); a results
    directory as a kill leaves it (some runs' parts written) is finished with exactly the
    missing runs, each once, and equals the uninterrupted table."""
    spec = parse_spec(RESNET_SPEC)
    recorder = RecordingExecutor()
    full = read_results(run_grid(spec, tmp_path / "full", executor=recorder, engine="batched"))
    units = [u for u in recorder.units if isinstance(u, _FinetuneBatch)]
    assert len(units) == 2 and all(len(u.jobs) == 4 for u in units)
    assert set(full.engine) == {"batched"}
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full" / "sources", part / "sources")
    kept = sorted(done_run_ids(tmp_path / "full"))[::3]
    (part / "results").mkdir()
    for run_id in kept:
        shutil.copy(tmp_path / "full" / "results" / f"{run_id}.parquet", part / "results")
    done = []
    resumed = read_results(run_grid(spec, part, executor=RecordingExecutor(),
                                    on_run_done=done.append, engine="batched"))
    expected = {r.run_id for r in expand(spec)}
    assert sorted(done) == sorted(expected - set(kept))
    assert set(resumed.run_id) == expected and not resumed.duplicated(["run_id", "epoch"]).any()
    key = ["run_id", "epoch"]
    a = full.sort_values(key).reset_index(drop=True)
    b = resumed.sort_values(key).reset_index(drop=True)
    assert list(a.columns) == list(b.columns)
    assert (a.test_accuracy == b.test_accuracy).all()


def test_grid_engine_option(tmp_path, cli):
    """--engine per-run records "per-run" and the closing line's rate per engine; --engine
    batched on a spec with backdoored sources (per-epoch ASR) is exit 2 naming why, before
    anything is written; a bad --engine or --max-memory too."""
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({
        "source": {"task": "synthetic-0to4", "epochs": 1}, "sources": [{"eps": 0.0}],
        "targets": [TARGET], "images_per_class": [2], "unfrozen_blocks": [0], "epochs": 1,
        "seeds": [0, 1]}))
    code, out, err = cli("grid", spec_file, "--out", tmp_path / "g", "--workers", 1,
                         "--engine", "per-run")
    assert code == 0, err
    assert set(read_results(tmp_path / "g").engine) == {"per-run"}
    assert "; per-run 2 at " in out.strip().splitlines()[-1]
    backdoor = tmp_path / "backdoor.json"
    backdoor.write_text(json.dumps({
        "source": {"task": "synthetic-0to4", "epochs": 1},
        "sources": [{"eps": 0.0}, {"eps": 0.0, "backdoor": {"attack": "badnets", "rate": 0.1,
                                                           "target": 0}}],
        "targets": [TARGET], "images_per_class": [2], "unfrozen_blocks": [0], "epochs": 1,
        "seeds": [0]}))
    for args, message in [(("--engine", "batched"), "backdoor triggers are measured"),
                          (("--engine", "fast"), "engine"),
                          (("--max-memory", "0"), "--max-memory")]:
        code, out, err = cli("grid", backdoor, "--out", tmp_path / "b", *args)
        lines = (out + err).strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), out + err
        assert message in lines[0]
        assert not (tmp_path / "b").exists()


def test_amp_trains_under_bf16_autocast_close_to_the_per_run_amp_path(monkeypatch):
    """amp=True (the default on CUDA): the prefix, the stacked suffix and the evaluation run
    under bf16 autocast, as the per-run path's `fit` and `accuracy` do; the losses are those
    of bf16 (not fp32's), close to the per-run amp path's."""
    model = _model("resnet18")
    cfgs = _cfgs(1)
    calls = []
    real = stacked.autocast
    monkeypatch.setattr(stacked, "autocast", lambda d, a: calls.append(a) or real(d, a))
    got = stacked.finetune_stacked(copy.deepcopy(model), cfgs, amp=True)
    assert calls and all(calls)
    fp32 = stacked.finetune_stacked(copy.deepcopy(model), cfgs)
    ref = [finetune_per_run(copy.deepcopy(model), c, amp=True) for c in cfgs]
    for g, r, f in zip(got, ref, fp32, strict=True):
        assert g[-1]["train_loss"] != f[-1]["train_loss"]
        assert g[-1]["train_loss"] == pytest.approx(r[-1]["train_loss"], rel=0.05)
        assert abs(g[-1]["test_accuracy"] - r[-1]["test_accuracy"]) <= 0.1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_stacked_engine_keeps_data_on_the_device_and_matches_per_run():
    model = _model("resnet18").cuda()
    cfgs = _cfgs(1)
    ref = [finetune_per_run(copy.deepcopy(model), c) for c in cfgs]
    cache = stacked.FeatureCache()
    got = stacked.finetune_stacked(copy.deepcopy(model), cfgs, cache=cache)
    assert all(t.is_cuda for store, _ in cache.entries.values() for t in [store])
    for g, r in zip(got, ref, strict=True):
        assert abs(g[-1]["test_accuracy"] - r[-1]["test_accuracy"]) <= 0.1
