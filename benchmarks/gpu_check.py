"""The one check a session with a lent GPU runs (under 5 minutes on one H200).

1. the CUDA tests (tests/test_gpu_path.py and the attack contract's CUDA tests);
2. natural and L2 PGD-AT (eps 0.5, 7 steps) `cnn-medium` on CIFAR-10 from
   $ROBUST_TRANSFER_DATA, or on CIFAR-10-shaped synthetic data (10 classes, 3x32x32) when
   CIFAR-10 is absent (the summary says which): images/s with bf16 autocast off and on,
   clean test accuracy, and PGD-20 robust accuracy of the PGD-AT model (fp32, the one
   evaluation path);
3. a small transfer grid on the digits (2 sources x 8 fine-tunes) on the GPU, through the
   local executor and, when Ray is installed, the Ray executor with fractional GPUs;
4. the batched fine-tuning engine (`transfer.stacked`: bf16 autocast, channels-last, data on
   the device) on ResNet-18 and ResNet-50 for 3x32x32 inputs: fine-tunes/s batched vs
   per-run, head only and layer4, and the largest |batched - per-run| final test accuracy.
Ends with a compact summary.

    .venv/bin/python benchmarks/gpu_check.py             # on the GPU machine
    .venv/bin/python benchmarks/gpu_check.py --quick --device cpu   # smoke run anywhere
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from robust_transfer.attacks import PGD, evaluate
from robust_transfer.data.datasets import ImageSet, cifar10, synthetic
from robust_transfer.errors import UserError
from robust_transfer.models import ModelSpec, build_model
from robust_transfer.models.runtime import accuracy, resolve_device
from robust_transfer.train import ExampleLoss, PGDExamples, TrainConfig, fit, natural_loss
from robust_transfer.transfer.executors import make_executor
from robust_transfer.transfer.grid import run_grid
from robust_transfer.transfer.results import read_results
from robust_transfer.transfer.spec import parse_spec

ROOT = Path(__file__).resolve().parent.parent
EPS = 0.5


def cuda_tests() -> str:
    cmd = [sys.executable, "-m", "pytest", "-rs", "-p", "no:cacheprovider",
           str(ROOT / "tests/test_gpu_path.py"), str(ROOT / "tests/test_attacks_contract.py"),
           "-k", "cuda"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [line.strip("= ") for line in done.stdout.strip().splitlines()]
    if done.returncode:
        print(done.stdout[-4000:], done.stderr[-2000:])
    return lines[-1] if lines else f"pytest exit {done.returncode}"


def cifar_data(quick: bool) -> tuple[ImageSet, ImageSet, str]:
    try:
        train, test = cifar10()
        name = "CIFAR-10"
    except UserError:
        per_class = 120 if quick else 6000
        data = synthetic(num_classes=10, per_class=per_class, size=32, channels=3, seed=0)
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
        cut = int(0.8 * len(data))
        train, test = data.subset(order[:cut]), data.subset(order[cut:])
        name = "CIFAR-10-shaped synthetic (CIFAR-10 absent)"
    if quick:
        train, test = train.subset(torch.arange(min(1000, len(train)))), test.subset(
            torch.arange(min(500, len(test))))
    return train, test, name


def train_cnn_medium(train, test, device, robust: bool, amp: bool, epochs: int) -> dict:
    model = build_model(ModelSpec("cnn-medium", 10, 3, (0.5,) * 3, (0.5,) * 3), seed=0)
    model = model.to(device)
    objective = ExampleLoss(PGDExamples(EPS, "l2", 7, None, 0)) if robust else natural_loss
    cfg = TrainConfig(epochs=epochs, lr=0.1, batch_size=256, schedule="cosine")
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fit(model, train, cfg, objective, amp=amp)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    row = {"images/s": epochs * len(train) / seconds,
           "clean": accuracy(model, test.x, test.y, amp=False)}
    if robust:
        def pgd(m, e):
            return PGD(m, e, steps=20, norm="l2", seed=0)

        pgd.__name__ = "pgd-20"
        x, y = test.x[:2000], test.y[:2000]
        table = evaluate(model, x, y, [pgd], [EPS], "l2", check=False)
        row["PGD-20"] = float(table[table.attack == "worst case"].robust_accuracy.iloc[0])
    return row


GRID = {
    "source": {"task": "digits-0to4", "epochs": 10, "attack_steps": 7},
    "sources": [{"eps": 0.0}, {"eps": 0.5}],
    "targets": ["digits-5to9"], "images_per_class": [1, 10],
    "unfrozen_blocks": [0, "all"], "epochs": 10, "seeds": [0, 1],
}


def transfer_grid(device, quick: bool) -> list[str]:
    spec = parse_spec({**GRID, "epochs": 2, "source": {**GRID["source"], "epochs": 2}}
                      if quick else GRID)
    lines, tables = [], {}
    workers = 4 if device.type == "cuda" else 1  # runs sharing the GPU (4 per GPU on Ray)
    names = ["local"]
    try:
        import ray  # noqa: F401
        names.append("ray")
    except ImportError:
        lines.append("ray executor: skipped (ray not installed)")
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            start = time.perf_counter()
            out = run_grid(spec, Path(tmp) / name, executor=make_executor(name, workers),
                           device=str(device))
            seconds = time.perf_counter() - start
            df = read_results(out).sort_values(["run_id", "epoch"]).reset_index(drop=True)
            tables[name] = df
            final = df[df.epoch == df.epochs]
            means = final.groupby("source_eps").test_accuracy.mean()
            lines.append(f"grid ({name}, {workers} workers): {df.run_id.nunique()} fine-tunes"
                         " + 2 sources in "
                         f"{seconds:.1f} s; mean final acc natural {means.iloc[0]:.3f}, "
                         f"L2 eps 0.5 {means.iloc[-1]:.3f}")
    if len(tables) == 2:
        diff = (tables["local"].test_accuracy - tables["ray"].test_accuracy).abs().max()
        lines.append(f"grid: max |local - ray| test accuracy {diff:.4f}")
    return lines


def engine_check(device, quick: bool) -> list[str]:
    """Fine-tunes/s of the batched engine vs the per-run path (both with the device's amp
    default), on a random-init ResNet for 3x32x32 inputs and the synthetic 5-9 target
    (adapted to 3x32x32): head only and layer4, 20 epochs (2 quick), 10 images per class."""
    from robust_transfer.models import SourceCard, save_checkpoint
    from robust_transfer.transfer.finetune import FinetuneConfig
    from robust_transfer.transfer.run import finetune_many_from_checkpoint

    lines = []
    seeds, epochs = (4, 2) if quick else (100, 20)
    with tempfile.TemporaryDirectory() as tmp:
        for arch, layer4 in (("resnet18", 2), ("resnet50", 3)):
            model = build_model(ModelSpec(arch, 10, 3, (0.5,) * 3, (0.25,) * 3, input_size=32),
                                seed=0)
            source = save_checkpoint(model, Path(tmp) / arch,
                                     SourceCard(role="source", seed=0))
            for label, k in (("head only", 0), ("layer4", layer4)):
                rates, finals = {}, {}
                for engine, n in (("batched", seeds), ("per-run", 2)):
                    cfgs = [FinetuneConfig("synthetic-5to9", 10, k, epochs, 0.01, 32, s)
                            for s in range(n)]
                    finetune_many_from_checkpoint(source, cfgs[:1], str(device), engine=engine)
                    start = time.perf_counter()
                    rows = finetune_many_from_checkpoint(source, cfgs, str(device),
                                                         engine=engine)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    rates[engine] = n / (time.perf_counter() - start)
                    finals[engine] = [r[-1]["test_accuracy"] for r in rows[:2]]
                diff = max(abs(a - b) for a, b in zip(finals["batched"], finals["per-run"],
                                                      strict=True))
                ratio = rates["batched"] / rates["per-run"]
                lines.append(f"engine {arch} {label}, {epochs} ep, 10 img/class: batched "
                             f"{rates['batched']:.1f} fine-tunes/s ({seeds} seeds), per-run "
                             f"{rates['per-run']:.2f}/s, {ratio:.0f}x; max |batched - per-run|"
                             f" final acc {diff:.3f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    start = time.perf_counter()
    summary = [f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}"
               f", torch {torch.__version__}"]
    summary.append(f"CUDA tests: {cuda_tests()}")
    train, test, data_name = cifar_data(args.quick)
    summary.append(f"data: {data_name}, {len(train)} train / {len(test)} test")
    for robust, epochs in ((False, 1 if args.quick else 4), (True, 1 if args.quick else 2)):
        label = f"L2 PGD-AT eps {EPS} (7 steps)" if robust else "natural"
        for amp in (False, True):
            r = train_cnn_medium(train, test, device, robust, amp, epochs)
            extra = f", PGD-20 {r['PGD-20']:.3f}" if robust else ""
            summary.append(f"cnn-medium {label}, {epochs} ep, amp {'on ' if amp else 'off'}: "
                           f"{r['images/s']:8.0f} img/s, clean {r['clean']:.3f}{extra}")
    summary += transfer_grid(device, args.quick)
    summary += engine_check(device, args.quick)
    summary.append(f"total {time.perf_counter() - start:.0f} s")
    print("\n== gpu_check summary ==")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
