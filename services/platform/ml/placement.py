"""Where a trial runs: which Dask worker (resources), which device inside it, and the
reproducible torch settings it runs under there.

The rule is taken from measurement, not from the assumption that a GPU is always faster:

- Measured on one H100 with XGBoost 3.4 on a 54k-row table (DESIGN.md, "Compute"): 80 trials
  took 169 s one after another on the GPU, 45 s on 16 CPU threads, and 17 s as 16
  single-thread CPU processes. A small tree trial cannot fill a GPU, so a GPU worker running
  them one at a time is ~10x slower than the same machine's CPUs running them side by side.
  Tree and linear families therefore never ask for a GPU.
- PyTorch families (the tabular MLP, the text transformer) are dense matrix work that a GPU
  runs at a large multiple of CPU speed (bench/gpu.py measures tokens/s on both in one run);
  they ask for `{"GPU": 1}` whenever the cluster has a worker advertising the `GPU` resource,
  and run on CPU workers (single-threaded, like every other trial) when it has none.

No crossover for "large tables belong on GPUs" has been measured for the tree families, so
this module has no row threshold for them; add one together with its measurement.

Dask resources are abstract counters: a GPU worker started with `--resources GPU=1` runs one
GPU trial at a time; `GPU=4` packs four trials onto one card (bench/gpu.py measures whether
packing pays). Tasks without resource restrictions may land on any worker, GPU workers
included; a cluster that wants GPU workers kept free for torch trials starts its CPU workers
with `--resources CPU=1`, and then tree trials ask for `{"CPU": 1}`.

Nothing here imports torch at module import time: the tuning service decides placement
without needing torch installed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

#: Families whose training is PyTorch (GPU-eligible): the `ModelFamily` values, as strings.
TORCH_FAMILIES: frozenset[str] = frozenset({"mlp", "transformer"})
#: The Dask resource name GPU workers advertise (compute.py's GPU worker group: `--resources GPU=1`).
GPU_RESOURCE = "GPU"
#: The optional resource CPU-only workers may advertise to keep GPU workers free for torch trials.
CPU_RESOURCE = "CPU"

#: The measurement the rule rests on (DESIGN.md), kept as data so reports can cite it.
XGBOOST_80_TRIALS_54K_ROWS_S = {
    "h100_gpu_sequential": 169.0,
    "cpu_16_threads": 45.0,
    "cpu_16_single_thread_processes": 17.0,
}


def resources_from_info(info: Mapping[str, Any]) -> dict[str, float]:
    """Sum every worker's advertised resources from a scheduler identity/info dict.

    `info` is what `Client.scheduler_info()` (sync client) or
    `await client.scheduler.identity(n_workers=-1)` (async client) returns.
    Returns e.g. `{"GPU": 2.0}`, or `{}` for a cluster with no declared resources.
    """
    total: dict[str, float] = {}
    for worker in (info.get("workers") or {}).values():
        for name, amount in (worker.get("resources") or {}).items():
            total[name] = total.get(name, 0.0) + float(amount)
    return dict(sorted(total.items()))


async def cluster_resources_async(client: Any) -> dict[str, float]:
    """Resources available on an *asynchronous* `distributed.Client`'s cluster (all workers)."""
    return resources_from_info(await client.scheduler.identity(n_workers=-1))


def is_torch_family(family: str) -> bool:
    """True for the PyTorch families (`ModelFamily.uses_torch` where the contracts define it)."""
    from contracts.types import ModelFamily

    try:
        return bool(ModelFamily(str(family)).uses_torch)
    except (ValueError, AttributeError):
        return str(family) in TORCH_FAMILIES


def trial_resources(family: str, available: Mapping[str, float]) -> dict[str, float]:
    """The Dask `resources=` for one trial of `family` on a cluster offering `available`.

    - torch families: `{"GPU": 1}` when any worker advertises GPU, else `{}` (CPU workers).
    - tree/linear families: `{}`; or `{"CPU": 1}` when CPU workers advertise `CPU` (so the
      trial cannot occupy a GPU worker's slot).
    """
    if is_torch_family(family):
        return {GPU_RESOURCE: 1} if available.get(GPU_RESOURCE, 0) > 0 else {}
    return {CPU_RESOURCE: 1} if available.get(CPU_RESOURCE, 0) > 0 else {}


def trial_device(resources: Mapping[str, float]) -> str:
    """The torch device a trial submitted with `resources` should use: "cuda" or "cpu"."""
    return "cuda" if resources.get(GPU_RESOURCE, 0) > 0 else "cpu"


def resolve_device(device: str | None) -> str:
    """`None` -> "cuda" when torch sees a GPU, else "cpu"; an explicit device is kept as given.

    Raises RuntimeError for an explicit CUDA device when torch sees no GPU (rather than
    silently training on CPU under a GPU placement).
    """
    import torch

    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but torch.cuda.is_available() is False")
    return device


@contextmanager
def torch_runtime(
    device: str, seed: int, deterministic: bool = True, cpu_threads: int | None = 1
) -> Iterator[None]:
    """Run a block with torch seeded, and (by default) deterministic, then restore everything.

    Inside: the global CPU (and, on CUDA, that device's) RNG is forked and seeded with `seed`,
    so parameter init and dropout depend on the seed alone and the caller's RNG state is left
    untouched. With `deterministic`: `torch.use_deterministic_algorithms(True)` (strict: an op
    without a deterministic kernel raises instead of silently varying), cuDNN benchmark off,
    and `CUBLAS_WORKSPACE_CONFIG=:4096:8` on CUDA (set only if unset; it must be set before
    cuBLAS initialises, so a GPU worker should export it at start). On CPU the intra-op thread
    count is fixed to `cpu_threads` (None leaves torch's default): bit-identical results need
    the same thread count, and Dask supplies the parallelism anyway.

    The settings are process-global: run one such block per process at a time (Dask workers
    started with `--nthreads 1`, as cairn's are).
    """
    import torch

    cuda = device.startswith("cuda")
    prev = {
        "det": torch.are_deterministic_algorithms_enabled(),
        "warn": torch.is_deterministic_algorithms_warn_only_enabled(),
        "threads": torch.get_num_threads(),
        "bench": torch.backends.cudnn.benchmark,
        "cudnn_det": torch.backends.cudnn.deterministic,
    }
    rng_devices = [torch.device(device).index or 0] if cuda else []
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(seed)
        try:
            if deterministic:
                if cuda:
                    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
                torch.use_deterministic_algorithms(True)
                torch.backends.cudnn.benchmark = False
                torch.backends.cudnn.deterministic = True
            if not cuda and cpu_threads is not None:
                torch.set_num_threads(cpu_threads)
            yield
        finally:
            torch.use_deterministic_algorithms(prev["det"], warn_only=prev["warn"])
            torch.backends.cudnn.benchmark = prev["bench"]
            torch.backends.cudnn.deterministic = prev["cudnn_det"]
            if torch.get_num_threads() != prev["threads"]:
                torch.set_num_threads(prev["threads"])
