"""Certification throughput of the smoothed ViT: token dropping vs all tokens on the same ViT, and against
adversarial-robustness-toolbox's ``PyTorchDeRandomizedSmoothing`` (ART) on the same ViT-S/16, inputs and ablations.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_certification.py            # CPU, 4 images
    .venv/bin/python benchmarks/bench_certification.py --device cuda --images 256   # GPU: bf16 autocast by default

Setting (the issue's): ViT-S/16 at 224 with random weights, 32×32×3 inputs nearest-upsampled ×7 inside the model,
column ablations of width 4 at stride 1 (32 positions), certification for 4×4 patches. Our path stacks many
positions into one forward pass (``max_batch`` ablated images) and keeps exactly the tokens each band touches
(2 or 3 of the 14 token columns, grouped so each pass is one dense tensor); ART runs one position per pass.
Prints ms/image for each path and the ratios, all measured in the same run.

ART 1.20.1's ViT path fails on timm ≥ 1.0.26 (``forward_features() got an unexpected keyword argument
'is_causal'``), so ART runs in its own environment, a hard-linked copy of the project's with an older timm::

    cp -al .venv .venv-art
    .venv-art/bin/python -m pip install timm==1.0.25 adversarial-robustness-toolbox==1.20.1   # the `art` extra

When ``.venv-art/bin/python`` (or ``--art-python``) exists, the ART timing runs there in a subprocess and the timm
version it used is printed; otherwise the ART line is skipped.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

ART_SCRIPT = r"""
import json, sys, time, numpy as np, torch, timm
from art.estimators.certification.derandomized_smoothing import PyTorchDeRandomizedSmoothing
args = json.loads(sys.argv[1])
torch.manual_seed(0)
art = PyTorchDeRandomizedSmoothing(
    model=args["model"], loss=torch.nn.CrossEntropyLoss(), input_shape=(3, args["size"], args["size"]),
    nb_classes=10, ablation_size=args["width"], algorithm="salman2021", ablation_type="column",
    replace_last_layer=True, drop_tokens=True, load_pretrained=False, device_type=args["device_type"], verbose=False)
x = np.random.default_rng(0).random((args["images"], 3, args["size"], args["size"]), dtype=np.float32)
y = np.random.default_rng(1).integers(0, 10, args["images"])
art.eval_and_certify(x[:1], y[:1], size_to_certify=args["patch"], batch_size=args["batch"], verbose=False)  # warm-up
times = []
for _ in range(args["repeats"]):
    start = time.perf_counter()
    art.eval_and_certify(x, y, size_to_certify=args["patch"], batch_size=args["batch"], verbose=False)
    times.append(time.perf_counter() - start)
print(json.dumps({"seconds": min(times), "timm": timm.__version__}))
"""


def time_ours(model, images: torch.Tensor, token_dropping: bool, bf16: bool, repeats: int) -> float:
    """Seconds to count votes over the whole ablation set for ``images`` (after one warm-up call; the fastest of
    ``repeats``, since on a shared machine the minimum is the least disturbed measurement)."""
    autocast = torch.autocast(images.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    with torch.inference_mode(), autocast:
        model.smoothed_counts(images[:1], token_dropping=token_dropping)
        if images.is_cuda:
            torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model.smoothed_counts(images, token_dropping=token_dropping)
            if images.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return min(times)


def art_python(fallback: Path = ROOT / ".venv-art" / "bin" / "python") -> Path | None:
    """The interpreter to time ART with: this one when ``art`` is importable here, else ``fallback`` (the
    ``.venv-art`` of the docstring) when it exists, else None."""
    import importlib.util

    if importlib.util.find_spec("art") is not None:
        return Path(sys.executable)
    return fallback if fallback.exists() else None


def time_art(python: Path, model: str, size: int, width: int, patch: int, images: int, batch: int, device: str,
             repeats: int) -> dict | None:
    """ART's ``eval_and_certify`` (token dropping, fp32) on ``images`` random images, run by ``python`` in a
    subprocess: ``{"seconds": fastest of repeats, "timm": version}``, or None (the error printed) if ART failed."""
    payload = json.dumps({"model": model, "size": size, "width": width, "patch": patch, "images": images,
                          "batch": batch, "device_type": "gpu" if device == "cuda" else "cpu", "repeats": repeats})
    run = subprocess.run([str(python), "-c", ART_SCRIPT, payload], capture_output=True, text=True)
    if run.returncode != 0:
        print(f"ART failed ({python}):\n{run.stderr[-2000:]}")
        return None
    return json.loads(run.stdout.strip().splitlines()[-1])


def build_vit(model: str, width: int, max_batch: int, device: str):
    """The benchmarked smoothed ViT: ``model`` at 224 with random weights, 3 channels, column ablations of
    ``width``."""
    from lit_robust import SmoothedViT

    torch.manual_seed(0)
    return SmoothedViT(backbone=model, in_chans=3, img_size=224, ablation_width=width, max_batch=max_batch,
                       mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)).eval().to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--size", type=int, default=32, help="input side (upsampled to 224 in the model)")
    parser.add_argument("--width", type=int, default=4, help="column ablation width b")
    parser.add_argument("--patch", type=int, default=4, help="patch side m to certify")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--max-batch", type=int, default=256, help="ablated images per forward pass (ours)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast for our path (default: on for CUDA, off on CPU)")
    parser.add_argument("--art-python", type=Path, default=ROOT / ".venv-art" / "bin" / "python")
    parser.add_argument("--art-images", type=int, default=None, help="images for ART (default --images)")
    parser.add_argument("--art-batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="timed repetitions per path (the fastest counts)")
    parser.add_argument("--skip-full", action="store_true", help="skip the all-tokens path (slow on CPU)")
    args = parser.parse_args()
    bf16 = args.device == "cuda" if args.bf16 is None else args.bf16

    model = build_vit(args.model, args.width, args.max_batch, args.device)
    images = torch.rand(args.images, 3, args.size, args.size, device=args.device)
    positions = len(model.certification_masks((args.size, args.size)))
    print(f"{args.model} at 224 from {args.size}×{args.size}, column b={args.width}, {positions} positions, "
          f"{args.images} images, device={args.device}, bf16={bf16}, torch threads={torch.get_num_threads()}")

    results = {"ours, token dropping": time_ours(model, images, True, bf16, args.repeats) / args.images}
    if not args.skip_full:
        results["ours, all tokens"] = time_ours(model, images, False, bf16, args.repeats) / args.images
    python = art_python(args.art_python)
    if python is not None:
        art = time_art(python, args.model, args.size, args.width, args.patch, args.art_images or args.images,
                       args.art_batch, args.device, args.repeats)
        if art is not None:
            results[f"ART 1.20.1 (timm {art['timm']}), token dropping, fp32"] = art["seconds"] / (
                args.art_images or args.images)
    else:
        print(f"ART skipped: no {args.art_python} (see this script's docstring)")
    for name, seconds in results.items():
        print(f"  {name:<48s} {1000 * seconds:9.1f} ms/image")
    ours = results["ours, token dropping"]
    for name, seconds in results.items():
        if name != "ours, token dropping":
            print(f"  speed-up of ours with token dropping over {name}: {seconds / ours:.2f}×")


if __name__ == "__main__":
    sys.exit(main())
