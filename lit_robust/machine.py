"""Use the machine a run is on: CPU threads for each process, and bf16 only where the hardware computes it.

Torch's default intra-op thread count is the machine's physical cores, whatever share of them the process may use
(a SLURM allocation, ``taskset``) and however many processes of the run share the node (``trainer=ddp_cpu``), so it
oversubscribes exactly where users scale up; and bf16 autocast on a CPU without native bf16 instructions is emulated
and slower than float32 (11× on an AVX2-only EPYC, docs/results.md); and a forward pass over many stacked copies
(certification) fills a GPU best when large but spills a CPU's caches.
"""
from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)
_TORCH_DEFAULT_THREADS = torch.get_num_threads()


def cores_available() -> int:
    """Cores this process may run on (its CPU affinity, which SLURM and ``taskset`` set)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def use_available_cores(processes_per_node: int) -> int:
    """Set and return the intra-op threads of this process: the usable cores shared among the node's processes
    (never more than torch's physical-core default). ``OMP_NUM_THREADS``, when set, is left to decide."""
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    threads = max(1, min(_TORCH_DEFAULT_THREADS, cores_available()) // max(1, processes_per_node))
    torch.set_num_threads(threads)
    log.info("torch intra-op threads: %d per process (%d cores, %d process(es) per node; OMP_NUM_THREADS overrides)",
             threads, cores_available(), processes_per_node)
    return threads


def native_bf16_on_cpu() -> bool:
    """Whether this CPU computes bf16 matrix products natively (AVX512-BF16 or AMX), as oneDNN reports it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def fast_precision(accelerator: str) -> str:
    """``trainer.precision`` for training whose numerics allow bf16 (the classifiers): ``bf16-mixed`` on GPUs and
    on CPUs with native bf16, else ``32-true``. Config: ``precision: ${fast_precision:${trainer.accelerator}}``."""
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "bf16-mixed"
    return "bf16-mixed" if native_bf16_on_cpu() else "32-true"


def stacked_pass_size(device: torch.device, configured: int | None) -> int:
    """Inputs per forward pass when a certifier stacks many ablated copies: ``configured`` when given, else 1024 on
    an accelerator and 128 on a CPU, where larger passes no longer fit the caches and run slower per input
    (docs/results.md, certification throughput)."""
    if configured is not None:
        return configured
    return 128 if torch.device(device).type == "cpu" else 1024
