"""``contract.shard_map``, the one shard → compute → gather loop: every rank ends with the single-process outputs in
dataset order, and its one empty-rank rule — what a rank did not compute it contributes as zero rows shaped as the
ranks that did — lets a rank without a batch, or without an optional output, join every gather."""
from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from lit_robust.callbacks.contract import ItemFormat, shard_map

IMAGES = torch.arange(5 * 2 * 2, dtype=torch.float32).reshape(5, 1, 2, 2)
DATASET = [(image, torch.tensor(i % 3)) for i, image in enumerate(IMAGES)]


def fake_trainer(rank: int, world: int) -> SimpleNamespace:
    return SimpleNamespace(world_size=world, global_rank=rank, strategy=SimpleNamespace(root_device=torch.device("cpu")))


def compute(rows: torch.Tensor, images: torch.Tensor, targets: torch.Tensor) -> dict:
    """Per item: its pixel sum and batch index; for even items only, their targets (an output of some rows, absent
    from a batch without any)."""
    even = rows % 2 == 0
    out = {"sums": images.flatten(1).sum(1), "batch": torch.full((len(rows), 2), int(rows[0]) // 2)}
    if even.any():
        out["even_targets"] = (targets[even], rows[even])
    return out


def run(rank: int, world: int, batch_size: int) -> dict:
    return shard_map(fake_trainer(rank, world), DATASET, batch_size, compute, ItemFormat())


def test_one_process_gives_every_output_in_dataset_order():
    out = run(0, 1, 2)
    assert torch.equal(out["sums"], IMAGES.flatten(1).sum(1))
    assert out["batch"][:, 0].tolist() == [0, 0, 1, 1, 2]
    assert out["even_targets"].tolist() == [0, 2, 1]  # items 0, 2, 4


def _rank(rank: int, world: int, port: int, root, batch_size: int) -> None:
    torch.set_num_threads(1)  # a forked child must not wait on the parent's OpenMP threads
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.save(run(rank, world, batch_size), root / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world, batch_size", [(3, 4), (2, 1)])
def test_gloo_ranks_equal_one_process_with_an_empty_rank_or_a_rank_without_an_optional_output(tmp_path, world,
                                                                                             batch_size):
    """3 ranks, batches of 4 (items 0–3 and 4): rank 2 has no batch. 2 ranks, batches of 1: rank 1 holds items 1 and
    3 only, so it never computes ``even_targets``. Every rank still joins every gather and ends with the
    single-process outputs; gathering by rank instead of by item, or a rank skipping a gather, differs or hangs."""
    single = run(0, 1, batch_size)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.start_processes(_rank, args=(world, port, tmp_path, batch_size), nprocs=world,
                                          start_method="fork")
    for rank in range(world):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert out.keys() == single.keys()
        for name, value in single.items():
            assert torch.equal(out[name], value), (rank, name)
