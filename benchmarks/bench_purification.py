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
fabric = L.Fabric(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto")
fabric.launch()


class Ranks:  # the part of a Trainer that Purification uses
    world_size, global_rank, is_global_zero = fabric.world_size, fabric.global_rank, fabric.is_global_zero
    default_root_dir, strategy = cache, fabric


images = torch.load(sys.argv[6])[:n]
callback = EBMPurification(EBM.pretrained("digits"), steps=steps, chunk_size=chunk, cache_dir=cache, progress=False)
fabric.barrier()
start = time.perf_counter()
callback.purify_dataset(images, Ranks(), torch.device("cpu"))
fabric.barrier()
if fabric.is_global_zero:
    print(f"RESULT {n / (time.perf_counter() - start):.2f}")
"""


def bare_loop(ebm: EBM, images: torch.Tensor, steps: int, batch: int) -> None:
    eps, temp = ebm.hparams.step_size, ebm.hparams.temperature
    for start in range(0, len(images), batch):
        x = images[start:start + batch] * 2 - 1
        for _ in range(steps):
            x = x.detach().requires_grad_(True)
            grad = torch.autograd.grad(ebm(x).sum(), x)[0]
            x = x - 0.5 * eps ** 2 * grad / temp + eps * torch.randn_like(x)
        ((x.detach().clamp(-1, 1) + 1) / 2)


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
        start = time.perf_counter()
        bare_loop(ebm, images, args.steps, args.chunk)
        results["bare loop"] = len(images) / (time.perf_counter() - start)
        torch.save(images, Path(tmp) / "images.pt")
        for devices in (1, 2):
            script = Path(tmp) / "run.py"
            script.write_text(DDP_RUN)
            out = subprocess.run([sys.executable, str(script), str(devices), str(len(images)), str(args.steps),
                                  str(args.chunk), str(Path(tmp) / f"cache{devices}"), str(Path(tmp) / "images.pt")],
                                 capture_output=True, text=True, check=True)
            line = [row for row in out.stdout.splitlines() if row.startswith("RESULT")][-1]
            results[f"callback, {devices} process{'es' if devices > 1 else ''}"] = float(line.split()[1])
    for name, value in results.items():
        print(f"{name:24s} {value:8.1f} images/s  ({value * args.steps:.0f} image-steps/s)")
    print(f"callback / bare loop      {results['callback, 1 process'] / results['bare loop']:.3f}")
    print(f"2 processes / 1 process   {results['callback, 2 processes'] / results['callback, 1 process']:.3f}")


if __name__ == "__main__":
    main()
