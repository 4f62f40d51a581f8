"""Threads per process from the usable cores, bf16 only where the hardware computes it, and pass sizes by device."""
from __future__ import annotations

import pytest
import torch

from lit_robust import machine


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_threads_share_the_usable_cores_among_the_nodes_processes(monkeypatch, restore_threads):
    """A SLURM-style allocation of 8 cores on a 32-core node: 8 threads for one process, 4 each for two, never 0;
    a fixed or torch-default count fails."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(machine, "_TORCH_DEFAULT_THREADS", 32)
    monkeypatch.setattr(machine, "cores_available", lambda: 8)
    assert [machine.use_available_cores(n) for n in (1, 2, 3, 16)] == [8, 4, 2, 1]
    assert torch.get_num_threads() == 1
    monkeypatch.setattr(machine, "_TORCH_DEFAULT_THREADS", 2)   # more cores allowed than the machine's physical ones
    assert machine.use_available_cores(1) == 2


def test_omp_num_threads_set_by_the_user_wins(monkeypatch, restore_threads):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    monkeypatch.setattr(machine, "cores_available", lambda: 8)
    assert machine.use_available_cores(1) == 1 and torch.get_num_threads() == 1


@pytest.mark.parametrize("accelerator,native,expected", [("gpu", False, "bf16-mixed"), ("cpu", False, "32-true"),
                                                         ("cpu", True, "bf16-mixed")])
def test_fast_precision_is_bf16_only_on_gpus_and_cpus_with_native_bf16(monkeypatch, accelerator, native, expected):
    monkeypatch.setattr(machine, "native_bf16_on_cpu", lambda: native)
    assert machine.fast_precision(accelerator) == expected


def test_stacked_pass_size_is_the_configured_one_else_small_on_a_cpu_and_large_on_a_gpu():
    """Certifiers stack ablated copies into passes of this size; without a setting a CPU gets cache-sized passes."""
    stacked_pass_size = machine.stacked_pass_size
    assert stacked_pass_size("cpu", None) == 128
    assert stacked_pass_size(torch.device("cuda", 1), None) == 1024
    assert stacked_pass_size("cpu", 7) == 7 and stacked_pass_size("cuda", 4096) == 4096
