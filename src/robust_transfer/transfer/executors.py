"""Executors: where runs happen is a seam; the experiment code does not know.

An executor is anything with the `Executor` interface: a context manager whose
`map_unordered(fn, items)` yields `(item, fn(item))` as runs finish. `run_grid` takes one as a
parameter, so a cluster executor (`RayExecutor`, in `transfer.ray_executor`) plugs in without
touching the grid. Executors by name are plugins (`robust_transfer.plugins`): each is one class
with a `name` and an `Options` dataclass of its constructor's keyword arguments, listed once in
`EXECUTORS`; `make_executor` builds the one a user names.

`LocalExecutor(workers)` runs in this process (workers <= 1) or in a pool of spawned worker
processes (spawn, not fork: forking a process whose OpenMP threads have run can deadlock).
Each worker gets cores/workers intra-op threads so workers do not oversubscribe the CPU (a
grid's runs fix their own count, `runner.RUN_THREADS`, so that their numbers do not depend on
where they ran), and exits by itself if the main process is killed. Workers ignore Ctrl-C
(SIGINT reaches the whole process group): the main process alone handles it, so an interrupt
is one message, not a traceback per worker.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol, TypeVar

import torch

from robust_transfer.errors import UserError
from robust_transfer.plugins import Registry, option
from robust_transfer.transfer.ray_executor import RayExecutor
from robust_transfer.transfer.threads import worker_threads

T = TypeVar("T")
R = TypeVar("R")


def _exit_with_parent(parent_pid: int) -> None:
    """Poll the parent; if it died (kill -9 leaves no chance to shut the pool down), exit."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


class Executor(Protocol):
    """Where a grid's runs execute. `fn` and the items must be picklable for executors that
    run them elsewhere; an exception in any run propagates out of `map_unordered`."""

    def __enter__(self) -> Executor: ...

    def __exit__(self, *exc) -> None: ...

    def map_unordered(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[tuple[T, R]]:
        ...


def _init_worker(threads: int, parent_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()


class LocalExecutor:
    """Runs on this machine, in this process or in spawned worker processes.

    One worker runs in this process, more in spawned processes. Use as a context manager:
    the worker pool is started once, on first need, and shared by every `map_unordered` call
    inside the block (spawning workers costs seconds)."""

    name = "local"

    @dataclass(frozen=True)
    class Options:
        workers: int = option(1, "parallel runs (worker processes; 1: in this process)")

    def __init__(self, workers: int = 1) -> None:
        self.workers = max(1, int(workers))
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self._pool is not None:
            if exc_type is not None:  # Ctrl-C or a failed run: do not wait for runs in flight
                for process in list(getattr(self._pool, "_processes", {}).values()):
                    process.terminate()
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def _get_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            threads = worker_threads(self.workers)
            self._pool = ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker, initargs=(threads, os.getpid()),
            )
        return self._pool

    def map_unordered(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[tuple[T, R]]:
        """Yield (item, fn(item)) as each finishes. An exception in any run propagates."""
        items = list(items)
        if self.workers == 1 or len(items) <= 1:
            for item in items:
                yield item, fn(item)
            return
        pool = self._get_pool()
        pending = {pool.submit(fn, item): item for item in items}
        # Runs left pending when this stops early are the context manager's to end: cancelled
        # on a normal exit, their workers terminated on an exception (Ctrl-C). Cancelling
        # here as well would race the pool's own clean-up of terminated workers.
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                item = pending.pop(future)
                yield item, future.result()


EXECUTORS: Registry[Executor] = Registry("executor")
for _executor in (LocalExecutor, RayExecutor):  # adding an executor: its file and its name here
    EXECUTORS.register(_executor)


def executors_help() -> str:
    """The executors by name with their docstring's first line, for --help."""
    lines = {name: EXECUTORS.get(name).__doc__.splitlines()[0].rstrip(".") for name in EXECUTORS}
    return " | ".join(f"{name} ({line[0].lower()}{line[1:]})" for name, line in lines.items())


# make_executor's own settings and the CLI flags that set them.
OWN_SETTINGS = {"workers": "--workers", "address": "--address",
                "tasks_per_gpu": "--tasks-per-gpu", "use_gpus": "--device; cpu asks for none"}


def make_executor(name: str = "local", workers: int = 1, address: str | None = None,
                  tasks_per_gpu: int = 4, use_gpus: bool = True,
                  options: Mapping[str, Any] | None = None) -> Executor:
    """The executor a user names (`EXECUTORS`: `local`, this machine's processes; `ray`, a
    Ray cluster at `address` or a local Ray started for the run, `tasks_per_gpu` runs sharing
    a GPU unless not `use_gpus`). Each executor takes those of these settings its `Options`
    declare; `options` (the CLI's `--executor-option KEY=VALUE`) sets its other options. An
    unknown option is a `UserError`, and so are an `address` for an executor that takes none
    (it would be silently ignored) and one of these settings given again in `options`."""
    given = {"workers": workers, "address": address, "tasks_per_gpu": tasks_per_gpu,
             "use_gpus": use_gpus}
    again = sorted(set(options or {}) & set(given))
    if again:
        raise UserError(f"executor option {again[0]} has a setting of its own "
                        f"({OWN_SETTINGS[again[0]]}); give it there")
    cls = EXECUTORS.get(name)
    takes = {f.name for f in fields(cls.Options)}
    if address is not None and "address" not in takes:
        owners = [n for n in EXECUTORS if "address" in {f.name for f in fields(
            EXECUTORS.get(n).Options)}]
        raise UserError(f"--address is for the {' or '.join(owners).capitalize()} executor; "
                        f"add --executor {owners[0]}")
    values = {k: v for k, v in given.items() if k in takes} | dict(options or {})
    return cls(**asdict(EXECUTORS.options(name, values)))
