"""Langevin purification throughput: the EBMPurification callback vs a bare PyTorch loop, and 2 DDP processes vs 1.

    python benchmarks/bench_purification.py [--images 1000] [--steps 150] [--chunk 250] [--repeats 3] [--rounds 2]
        [--out docs/records] [--other-chunks 500 1000]

Same EBM (the shipped ``pretrained:digits``), same images (the first ``--images`` mnist5k training digits), same
batch size and memory format (``channels_last``, the callback's default for the EBM). The bare loop is what a careful
user writes: detached updates under ``no_grad``, the constant ε²/(2T) folded, noise from a generator. The callback
runs its full path (key hashing, chunk seeding, saturation check, cache writes, gather) with a fresh cache. Both
1- and 2-process callback runs use every core of the machine (threads = cores / processes,
``lit_robust.machine``). The cases take turns (``benchmarks/timing.py``); prints images/s and ratios (callback /
bare should be ≥ 0.95). ``--rounds`` repeats the whole comparison back to back; ``--out`` writes the table record
``bench_purification.json``. ``--other-chunks`` adds the bare loop at other chunk sizes (the callback's
``chunk_size``: images per forward batch). Not part of CI.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from records import TableRecord
from timing import interleaved, print_table, write_ratio_record
from lit_robust import EBM
from lit_robust.datamodules import DigitsDataModule
from lit_robust.machine import cores_available, use_available_cores

DDP_RUN = """
import sys, time, torch, lightning as L
from lit_robust import EBM
from lit_robust.callbacks import EBMPurification
from lit_robust.machine import use_available_cores
devices, n, steps, chunk, cache = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
accelerator, out = (sys.argv[7], sys.argv[8]) if len(sys.argv) > 8 else ("cpu", "")
torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
fabric = L.Fabric(accelerator=accelerator, devices=devices, strategy="ddp" if devices > 1 else "auto")
fabric.launch()
use_available_cores(devices)


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

# what the numbers measure: a commit changing one of these makes the record stale (render_results.py --strict)
DEPENDS_ON = ["lit_robust/models/ebm.py",
              "lit_robust/functional/langevin.py",
              "callbacks/purification.py",
              "lit_robust/machine.py"]


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def bare_loop(ebm: EBM, images: torch.Tensor, steps: int, batch: int, seed: int = 0) -> torch.Tensor:
    """The Langevin loop as a careful user writes it, on ``images`` where they are."""
    coefficient, eps = 0.5 * ebm.hparams.step_size ** 2 / ebm.hparams.temperature, ebm.hparams.step_size
    ebm.to(memory_format=torch.channels_last)
    generator = torch.Generator(images.device).manual_seed(seed)
    outputs = []
    for start in range(0, len(images), batch):
        x = (images[start:start + batch] * 2 - 1).contiguous(memory_format=torch.channels_last)
        for _ in range(steps):
            x.requires_grad_(True)
            grad = torch.autograd.grad(ebm(x).sum(), x)[0]
            with torch.no_grad():
                x = x - coefficient * grad + eps * torch.randn(x.shape, generator=generator, device=x.device)
        outputs.append((x.clamp(-1, 1) + 1) / 2)
    return torch.cat(outputs)


def time_callback(callback, images: torch.Tensor, device: torch.device | str, cache_dir: str
                  ) -> tuple[float, torch.Tensor]:
    """Seconds of the callback's whole work loop on one process (the device synchronised), ``images`` on the CPU as
    a DataModule holds them, and the purified images. Give each call a fresh ``cache_dir``."""
    callback.cache_dir = cache_dir
    synchronize(device)
    start = time.perf_counter()
    purified = callback.purify_dataset(images, OneProcess(cache_dir), torch.device(device))
    synchronize(device)
    return time.perf_counter() - start, purified


def callback_case(ebm: EBM, images: torch.Tensor, steps: int, chunk: int, device: str, tmp: str):
    """A timing case: the callback on the bare loop's EBM object (as a user's run holds one EBM), fresh cache each
    time."""
    from lit_robust.callbacks import EBMPurification

    def case() -> float:
        callback = EBMPurification(ebm, steps=steps, chunk_size=chunk, progress=False, plots=False)
        with tempfile.TemporaryDirectory(dir=tmp) as cache:
            return time_callback(callback, images, device, cache)[0]
    return case


def bare_case(ebm: EBM, images: torch.Tensor, steps: int, chunk: int, device: str):
    """A timing case: :func:`bare_loop` on the device, synchronised."""
    def case() -> float:
        synchronize(device)
        start = time.perf_counter()
        bare_loop(ebm, images.to(device), steps, chunk)
        synchronize(device)
        return time.perf_counter() - start
    return case


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
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--chunk", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=2, help="whole comparisons back to back")
    parser.add_argument("--out", type=Path, default=None, help="write the record bench_purification.json here")
    parser.add_argument("--other-chunks", type=int, nargs="*", default=[], help="bare loops at these chunk sizes too")
    args = parser.parse_args()
    record = TableRecord("bench_purification", depends_on=DEPENDS_ON,
                         title="EBMPurification vs a bare Langevin loop (issue 34)")
    use_available_cores(1)
    ebm = EBM.pretrained("digits").to(args.device).eval()
    datamodule = DigitsDataModule()
    datamodule.setup("fit")
    images = datamodule.train_dataset.images[: args.images]

    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(images, Path(tmp) / "images.pt")
        cases = {"bare loop": bare_case(ebm, images, args.steps, args.chunk, args.device),
                 "callback, 1 process (in-process)": callback_case(ebm, images, args.steps, args.chunk, args.device, tmp)}
        cases.update({f"bare loop, chunk {size}": bare_case(ebm, images, args.steps, size, args.device)
                      for size in args.other_chunks})
        if args.device == "cpu":
            for devices in (1, 2):
                cases[f"callback, {devices} process(es) (subprocess)"] = ddp_case(devices, tmp, args)
        for _ in range(args.rounds):
            timings = interleaved(cases, repeats=args.repeats, warmup=0)
            print_table(timings, reference="bare loop", work=len(images), unit="images")
            if args.device == "cpu":
                two, one = (timings[f"callback, {n} process(es) (subprocess)"] for n in (2, 1))
                print(f"2 processes / 1 process (both on all {cores_available()} cores): {one.best / two.best:.3f}")
            rounds.append(timings)
    if args.out:
        write_ratio_record(record, args.out, rounds, "bare loop", {**vars(args), "out": str(args.out)})


def ddp_case(devices: int, tmp: str, args):
    """A timing case running the callback on ``devices`` processes in a subprocess; counts the purification only
    (start-up and imports excluded)."""
    def case() -> float:
        with tempfile.TemporaryDirectory(dir=tmp) as cache:
            rate = run_ddp(devices, Path(tmp) / "images.pt", args.steps, args.chunk, Path(cache) / "cache")
        return args.images / rate
    return case


if __name__ == "__main__":
    main()
