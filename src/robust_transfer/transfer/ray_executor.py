"""The Ray executor: a grid's runs as Ray tasks, on a cluster or on a local Ray started for it.

Same interface as `LocalExecutor` (a context manager whose `map_unordered(fn, items)` yields
`(item, fn(item))` as runs finish), so `run_grid` does not know where its runs go: the same
source-training and fine-tune functions run in Ray workers, which return their rows, and the
driver alone writes the resumable Parquet store. A killed driver loses only the runs in
flight; a re-run plans and submits only the missing ones.

Numbers equal `LocalExecutor(workers)`'s: every task sets the same intra-op thread count
(`worker_threads(workers)`) before it runs, and asks Ray for that many CPUs, so at most
`workers` tasks share a machine's cores. When the cluster has GPUs, each task asks for
`1 / tasks_per_gpu` of one (Ray's fractional GPUs: small fine-tunes share a device).

Ray is an optional dependency: `pip install robust_transfer[ray]`. The executor registry
(`transfer.executors.EXECUTORS`) lists this class; this module imports nothing of it, so the
two modules form no import circle.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch

from robust_transfer.errors import UserError
from robust_transfer.plugins import option
from robust_transfer.transfer.threads import worker_threads

T = TypeVar("T")
R = TypeVar("R")

INSTALL_HINT = "the Ray executor needs Ray: pip install robust_transfer[ray]"
# A local Ray started for one grid: the object store only carries configs and result rows.
LOCAL_OBJECT_STORE_BYTES = 100 * 1024**2


def import_ray():
    """Ray, or a `UserError` that says how to install it."""
    try:
        import ray
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return ray


def _run_task(fn: Callable[[T], R], item: T, threads: int) -> R:
    """What a Ray worker runs: the run itself, at the executor's thread count."""
    torch.set_num_threads(threads)
    return fn(item)


class RayExecutor:
    """Runs as Ray tasks, on a cluster or on a local Ray started for the run.

    Ray: Moritz et al. 2018, "Ray: A Distributed Framework for Emerging AI Applications".

    `address`: an existing cluster ("auto", "ray://host:10001", "host:6379"); None starts a
    local Ray for the run (all this machine's CPUs and GPUs, no dashboard) and shuts it down
    after. A Ray already initialised in this process is used as it is and left running.
    `workers`: runs that share one machine's cores (sets the threads per task, as for
    `LocalExecutor`). `tasks_per_gpu`: runs that share one GPU when the cluster has GPUs;
    `use_gpus` False (runs on CPU) asks for none.

    Shape: items and results must pickle (they travel to the workers and back).

    Example:
        >>> with RayExecutor(workers=2) as pool:
        ...     results = dict(pool.map_unordered(fn, items))
    """

    name = "ray"

    @dataclass(frozen=True)
    class Options:
        workers: int = option(1, "runs sharing one machine's cores (threads per task)")
        address: str | None = option(None, "cluster address (auto, ray://host:10001); "
                                     "None: a local Ray for the run")
        tasks_per_gpu: int = option(4, "runs sharing one GPU when the cluster has GPUs")
        use_gpus: bool = option(True, "ask for GPUs where the cluster has them")

    def __init__(self, workers: int = 1, address: str | None = None,
                 tasks_per_gpu: int = 4, use_gpus: bool = True) -> None:
        if tasks_per_gpu < 1:
            raise UserError(f"tasks per GPU must be >= 1, got {tasks_per_gpu}")
        self.ray = import_ray()
        self.workers = max(1, int(workers))
        self.address = address
        self.tasks_per_gpu = int(tasks_per_gpu)
        self.use_gpus = bool(use_gpus)
        self.threads = worker_threads(self.workers)
        self._started = False
        self._pending: dict = {}

    def __enter__(self) -> RayExecutor:
        ray = self.ray
        if not ray.is_initialized():
            kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
            if self.address is None:
                kwargs |= dict(num_cpus=os.cpu_count() or 1,
                               object_store_memory=LOCAL_OBJECT_STORE_BYTES)
            try:
                ray.init(address=self.address, **kwargs)
            except ConnectionError as e:
                raise UserError(f"cannot connect to the Ray cluster at {self.address!r}: "
                                f"{str(e).splitlines()[0]}") from None
            self._started = True
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:  # Ctrl-C or a failed run: stop the runs in flight
            for ref in self._pending:
                self.ray.cancel(ref, force=True)
        self._pending = {}
        if self._started:
            self.ray.shutdown()
            self._started = False

    def gpus_per_task(self) -> float:
        """1 / tasks_per_gpu when the cluster has GPUs (and runs use them), else 0."""
        has_gpus = self.use_gpus and self.ray.cluster_resources().get("GPU", 0) > 0
        return 1.0 / self.tasks_per_gpu if has_gpus else 0.0

    def map_unordered(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[tuple[T, R]]:
        """Yield (item, fn(item)) as each Ray task finishes. An exception in any run
        propagates (a `UserError` as itself)."""
        items = list(items)
        if not items:
            return
        ray = self.ray
        task = ray.remote(_run_task).options(num_cpus=self.threads,
                                             num_gpus=self.gpus_per_task(), max_retries=0)
        fn_ref = ray.put(fn)
        self._pending = {task.remote(fn_ref, item, self.threads): item for item in items}
        while self._pending:
            done, _ = ray.wait(list(self._pending), num_returns=1)
            for ref in done:
                item = self._pending.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    cause = getattr(e, "cause", None)
                    if isinstance(cause, UserError):
                        raise cause from None
                    raise
                yield item, result
