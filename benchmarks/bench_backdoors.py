"""Seconds for poisoned source training (BadNets, 10%, digits-0to4, 30 epochs) and for each
backdoor defense on it, with the C-Acc / ASR before and after.

    PYTHONPATH=src python benchmarks/bench_backdoors.py

Timings depend on the machine's load; the grid timing is in bench_backdoor_transfer.py.
"""

from __future__ import annotations

import time

import torch

from robust_transfer.backdoors.defenses import DEFENSES, DefenseConfig, defend
from robust_transfer.backdoors.metrics import backdoor_metrics
from robust_transfer.backdoors.source import train_backdoor_source
from robust_transfer.data import load_task
from robust_transfer.data.poison import BackdoorConfig
from robust_transfer.train import SourceConfig, TrainConfig
from robust_transfer.train.source import train_source


def main() -> None:
    torch.set_num_threads(1)
    task = load_task("digits-0to4")
    start = time.perf_counter()
    _, clean_card = train_source(SourceConfig())
    print(f"clean source: {time.perf_counter() - start:.1f} s, "
          f"C-Acc {clean_card.metrics['clean_accuracy']:.4f}")
    backdoor = BackdoorConfig("badnets", rate=0.1, target=0)
    start = time.perf_counter()
    model, card = train_backdoor_source(SourceConfig(backdoor=backdoor))
    m = card.metrics
    print(f"poisoned training: {time.perf_counter() - start:.1f} s, C-Acc "
          f"{m['clean_accuracy']:.4f}, ASR {m['asr']:.4f}, RA {m['ra']:.4f}")
    cfg = DefenseConfig()
    index = torch.tensor(card.backdoor["poisoned_indices"])
    for name in DEFENSES:
        defended, info = defend(model, name, task, backdoor, cfg, TrainConfig(), index)
        after = backdoor_metrics(defended, task.test.x, task.test.y,
                                 backdoor.trigger(task.input_shape), 0)
        extra = {k: v for k, v in info.items() if k not in ("defense", "seconds")}
        print(f"{name}: {info['seconds']:.1f} s, C-Acc {after['clean_accuracy']:.4f}, "
              f"ASR {after['asr']:.4f}, {extra}")


if __name__ == "__main__":
    main()
