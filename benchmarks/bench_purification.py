"""Langevin purification throughput: the EBMPurification callback vs a bare PyTorch loop, and 2 DDP processes vs 1.

    OMP_NUM_THREADS=1 python benchmarks/bench_purification.py [--images 1000] [--steps 150] [--chunk 250]

Same EBM (the shipped ``pretrained:digits``), same images (the first ``--images`` mnist5k training digits), same
batch size. The bare loop is the textbook one (x.requires_grad_, autograd.grad, update with torch.randn); the callback
runs its full path (key hashing, chunk seeding, cache writes, gather) with a fresh cache. Prints images/s and ratios
(callback / bare should be ≥ 0.95; 2-process / 1-process ≈ 2 on 2 free cores). Not part of CI.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lit_robust import EBM
from lit_robust.datamodules import DigitsDataModule

DDP_RUN = """
import sys, time, torch, lightning as L
from lit_robust import EBM
from lit_robust.callbacks import EBMPurification
devices, n, steps, chunk, cache = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
accelerator, out = (sys.argv[7], sys.argv[8]) if len(sys.argv) > 8 else ("cpu", "")
torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
fabric = L.Fabric(accelerator=accelerator, devices=devices, strategy="ddp" if devices > 1 else "auto")
fabric.launch()


class Ranks:  # the part of a Trainer that Purification uses
    world_size, global_rank, is_global_zero = fabric.world_size, fabric.global_rank, fabric.is_global_zero
    default_root_dir, strategy = cache, fabric.strategy  # gather_in_order reads strategy.root_device


images = torch.load(sys.argv[6])[:n]
callback = EBMPurification(EBM.pretrained("digits"), steps=steps, chunk_size=chunk, cache_dir=cache, progress=False)
fabric.barrier()
start = time.perf_counter()
purified = callback.purify_dataset(images, Ranks(), fabric.device)
fabric.barrier()
if fabric.is_global_zero:
    print(f"RESULT {n / (time.perf_counter() - start):.2f}")
    if out:
        torch.save(purified, out)
"""


class OneProcess:
    """The part of a single-process Trainer that :meth:`Purification.purify_dataset` reads."""

    world_size, global_rank, is_global_zero = 1, 0, True

    def __init__(self, default_root_dir: str):
        self.default_root_dir = default_root_dir


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def bare_loop(ebm: EBM, images: torch.Tensor, steps: int, batch: int) -> torch.Tensor:
    """The textbook Langevin loop (detached updates, no caching, no checks) on ``images`` where they are."""
    eps, temp = ebm.hparams.step_size, ebm.hparams.temperature
    outputs = []
    for start in range(0, len(images), batch):
        x = images[start:start + batch] * 2 - 1
        for _ in range(steps):
            x = x.detach().requires_grad_(True)
            grad = torch.autograd.grad(ebm(x).sum(), x)[0]
            x = x - 0.5 * eps ** 2 * grad / temp + eps * torch.randn_like(x)
        outputs.append((x.detach().clamp(-1, 1) + 1) / 2)
    return torch.cat(outputs)


def time_bare_loop(ebm: EBM, images: torch.Tensor, steps: int, batch: int) -> float:
    """Seconds of :func:`bare_loop` (the device synchronised)."""
    synchronize(images.device)
    start = time.perf_counter()
    bare_loop(ebm, images, steps, batch)
    synchronize(images.device)
    return time.perf_counter() - start


def time_callback(callback, images: torch.Tensor, device: torch.device | str, cache_dir: str
                  ) -> tuple[float, torch.Tensor]:
    """Seconds of the callback's whole work loop (cache key, chunk seeding, checks, cache writes, gather) on one
    process, ``images`` on the CPU as a DataModule holds them and a fresh ``cache_dir``; and the purified images."""
    callback.cache_dir = cache_dir
    synchronize(device)
    start = time.perf_counter()
    purified = callback.purify_dataset(images, OneProcess(cache_dir), torch.device(device))
    synchronize(device)
    return time.perf_counter() - start, purified


def run_ddp(devices: int, images_path: Path, steps: int, chunk: int, cache: Path, accelerator: str = "cpu",
            out: Path | None = None, count: int | None = None) -> float:
    """The callback on ``devices`` processes (Fabric, DDP) in a subprocess; images/s. With ``out``, rank zero saves
    the purified set there."""
    count = count if count is not None else len(torch.load(images_path))
    script = Path(cache).parent / "purify_ddp_run.py"
    script.write_text(DDP_RUN)
    run = subprocess.run([sys.executable, str(script), str(devices), str(count), str(steps), str(chunk), str(cache),
                          str(images_path), accelerator, str(out or "")], capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"{devices}-process purification failed:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}")
    return float([row for row in run.stdout.splitlines() if row.startswith("RESULT")][-1].split()[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--chunk", type=int, default=250)
    args = parser.parse_args()
    ebm = EBM.pretrained("digits")
    datamodule = DigitsDataModule()
    datamodule.setup("fit")
    images = datamodule.train_dataset.images[: args.images]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        results["bare loop"] = len(images) / time_bare_loop(ebm, images, args.steps, args.chunk)
        torch.save(images, Path(tmp) / "images.pt")
        for devices in (1, 2):
            results[f"callback, {devices} process{'es' if devices > 1 else ''}"] = run_ddp(
                devices, Path(tmp) / "images.pt", args.steps, args.chunk, Path(tmp) / f"cache{devices}")
    for name, value in results.items():
        print(f"{name:24s} {value:8.1f} images/s  ({value * args.steps:.0f} image-steps/s)")
    print(f"callback / bare loop      {results['callback, 1 process'] / results['bare loop']:.3f}")
    print(f"2 processes / 1 process   {results['callback, 2 processes'] / results['callback, 1 process']:.3f}")


if __name__ == "__main__":
    main()
