"""Certification throughput of the smoothed ViT: token dropping vs all tokens on the same ViT, and against
adversarial-robustness-toolbox's ``PyTorchDeRandomizedSmoothing`` (ART) on the same ViT-S/16, inputs and ablations,
at several batch sizes (images per ``eval_and_certify`` / ``smoothed_counts`` call).

    python benchmarks/bench_certification.py --images 2 8 32 --out docs/records         # CPU, the issue-34 table
    python benchmarks/bench_certification.py --device cuda --images 256                  # GPU: bf16 autocast

Setting (issue 34's): ViT-S/16 at 224 with random weights, 32×32×3 inputs nearest-upsampled ×7 inside the model,
column ablations of width 4 at stride 1 (32 positions), certification for 4×4 patches. Our path stacks many
positions into one forward pass (at most ``--max-batch`` ablated images) and keeps exactly the tokens each band
touches (2 or 3 of the 14 token columns, grouped so each pass is one dense tensor); ART runs one position per pass
over ``--art-batch`` images. For each image count the paths take turns (``benchmarks/timing.py``): ours with token
dropping, ours with all tokens (only up to ``--full-images`` images: it is 6× slower), and ART, which runs in a
persistent subprocess and reports the seconds of its own ``eval_and_certify`` call (its start-up is not counted).
A fourth case, the floor, runs only the ViT blocks and head on the same kept-token sequences: no token-dropping
certifier of this ViT can be faster, so ART / floor is the most any implementation could be ahead of ART.

ART 1.20.1's ViT path fails on timm ≥ 1.0.26 (``forward_features() got an unexpected keyword argument
'is_causal'``), so ART runs in its own environment, a hard-linked copy of the project's with an older timm::

    cp -al .venv .venv-art
    .venv-art/bin/python -m pip install timm==1.0.25 adversarial-robustness-toolbox==1.20.1   # the `art` extra

When ``.venv-art/bin/python`` (or ``--art-python``) exists, ART is timed there; otherwise its column is skipped.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from records import TableRecord
from timing import interleaved, machine, print_table

from lit_robust.machine import stacked_pass_size

ROOT = Path(__file__).resolve().parents[1]

# ART's side: built once, then one timed eval_and_certify per request line ({"images": n}) on stdin.
ART_WORKER = r"""
import json, sys, time, numpy as np, torch, timm
from art.estimators.certification.derandomized_smoothing import PyTorchDeRandomizedSmoothing
args = json.loads(sys.argv[1])
torch.manual_seed(0)
art = PyTorchDeRandomizedSmoothing(
    model=args["model"], loss=torch.nn.CrossEntropyLoss(), input_shape=(3, args["size"], args["size"]),
    nb_classes=10, ablation_size=args["width"], algorithm="salman2021", ablation_type="column",
    replace_last_layer=True, drop_tokens=True, load_pretrained=False, device_type=args["device_type"], verbose=False)
x = np.random.default_rng(0).random((args["max_images"], 3, args["size"], args["size"]), dtype=np.float32)
y = np.random.default_rng(1).integers(0, 10, args["max_images"])
print(json.dumps({"ready": True, "timm": timm.__version__}), flush=True)
for line in sys.stdin:
    n = json.loads(line)["images"]
    start = time.perf_counter()
    art.eval_and_certify(x[:n], y[:n], size_to_certify=args["patch"], batch_size=args["batch"], verbose=False)
    print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)
"""


class ArtWorker:
    """ART's ``eval_and_certify`` (token dropping, fp32) in a subprocess run by ``python``, kept alive so that
    each timed call costs only the certification itself."""

    def __init__(self, python: Path, model: str, size: int, width: int, patch: int, max_images: int, batch: int,
                 device: str):
        payload = json.dumps({"model": model, "size": size, "width": width, "patch": patch, "max_images": max_images,
                              "batch": batch, "device_type": "gpu" if device == "cuda" else "cpu"})
        self.process = subprocess.Popen([str(python), "-c", ART_WORKER, payload], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        self.timm = self._reply()["timm"]

    def _reply(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"ART worker exited with {self.process.wait()} (its stderr is above)")
        return json.loads(line)

    def seconds(self, images: int) -> float:
        self.process.stdin.write(json.dumps({"images": images}) + "\n")
        self.process.stdin.flush()
        return self._reply()["seconds"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()

# what the numbers measure: a commit changing one of these makes the record stale (render_results.py --strict)
DEPENDS_ON = ["lit_robust/models/smoothed_vit.py",
              "lit_robust/functional/derandomized_smoothing.py",
              "lit_robust/functional/vit_tokens.py",
              "lit_robust/machine.py"]


def ours_case(model, images: torch.Tensor, token_dropping: bool, bf16: bool):
    """A timing case: votes over the whole ablation set for ``images`` (the device synchronised)."""
    autocast = torch.autocast(images.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def run() -> None:
        with torch.inference_mode(), autocast:
            model.smoothed_counts(images, token_dropping=token_dropping)
        if images.is_cuda:
            torch.cuda.synchronize()
    return run


def floor_case(model, count: int, size: int, bf16: bool):
    """A timing case: only the ViT blocks and head on the exact kept-token sequences of ``count`` images (random
    tokens, passes of the model's pass size) — what any token-dropping certifier must compute, so ART's time over
    this one bounds how far ahead of ART an implementation can get."""
    from lit_robust.functional.vit_tokens import logits_of_kept_tokens

    vit, device = model.net, model.device
    pass_size = stacked_pass_size(device, model.hparams.max_batch)
    passes = []
    for _, kept in model.kept_token_groups(model.certification_masks((size, size))):
        rows = kept.repeat(count, 1)
        for first in range(0, len(rows), pass_size):
            index = rows[first:first + pass_size]
            passes.append((torch.randn(*index.shape, vit.embed_dim, device=device), index))

    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def run() -> None:
        with torch.inference_mode(), autocast:
            for tokens, index in passes:
                logits_of_kept_tokens(vit, tokens, index)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return run


def art_python(fallback: Path = ROOT / ".venv-art" / "bin" / "python") -> Path | None:
    """The interpreter to time ART with: this one when ``art`` is importable here, else ``fallback`` (the
    ``.venv-art`` of the docstring) when it exists, else None."""
    import importlib.util

    if importlib.util.find_spec("art") is not None:
        return Path(sys.executable)
    return fallback if fallback.exists() else None


def build_vit(model: str, width: int, max_batch: int, device: str):
    """The benchmarked smoothed ViT: ``model`` at 224 with random weights, 3 channels, column ablations of
    ``width``."""
    from lit_robust import SmoothedViT

    torch.manual_seed(0)
    return SmoothedViT(backbone=model, in_chans=3, img_size=224, ablation_width=width, max_batch=max_batch,
                       mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)).eval().to(device)


CASE_DROP, CASE_FULL, CASE_ART = "ours, token dropping", "ours, all tokens", "ART 1.20.1, token dropping"
CASE_FLOOR = "ViT blocks only (floor)"
COLUMNS = [("images per call", "{images}"), ("ours, token dropping (ms/image)", "{drop_ms:,.0f}"),
           ("ART 1.20.1 (ms/image)", "{art_ms:,.0f}"), ("ours / ART speed", "**{vs_art:.2f}×**"),
           ("ours, all tokens (ms/image)", "{full_ms:,.0f}"), ("dropping / all tokens speed", "{vs_full:.2f}×"),
           ("blocks-only floor (ms/image)", "{floor_ms:,.0f}"), ("ART / floor (best possible ours / ART)",
                                                                 "{art_floor:.2f}×"),
           ("load ≤", "{load:.1f}")]


def table_row(images: int, table: dict) -> dict:
    """One row: ms/image per path and the speed ratios (a path not timed leaves its cells out, rendered "–")."""
    ms = {name: 1000 / case["throughput"] for name, case in table["cases"].items()}
    row = {"images": images, "drop_ms": ms[CASE_DROP],
           "load": max(case["load_max"] for case in table["cases"].values())}
    for name, key, ratio in ((CASE_ART, "art_ms", "vs_art"), (CASE_FULL, "full_ms", "vs_full")):
        if name in ms:
            row[key], row[ratio] = ms[name], ms[name] / ms[CASE_DROP]
    if CASE_FLOOR in ms:
        row["floor_ms"] = ms[CASE_FLOOR]
        if CASE_ART in ms:
            row["art_floor"] = ms[CASE_ART] / ms[CASE_FLOOR]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--size", type=int, default=32, help="input side (upsampled to 224 in the model)")
    parser.add_argument("--width", type=int, default=4, help="column ablation width b")
    parser.add_argument("--patch", type=int, default=4, help="patch side m to certify")
    parser.add_argument("--images", type=int, nargs="+", default=[2, 8, 32], help="images per call, each a row")
    parser.add_argument("--full-images", type=int, default=2, help="time all tokens only up to this many images")
    parser.add_argument("--max-batch", type=int, default=None,
                        help="ablated images per forward pass (ours; default: the model's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast for our path (default: on for CUDA, off on CPU)")
    parser.add_argument("--art-python", type=Path, default=ROOT / ".venv-art" / "bin" / "python")
    parser.add_argument("--art-batch", type=int, default=128)
    parser.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the ViT blocks alone on the kept tokens")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per image count (minimum counts)")
    parser.add_argument("--out", type=Path, default=None, help="write the record certification_throughput.json here")
    args = parser.parse_args()
    bf16 = args.device == "cuda" if args.bf16 is None else args.bf16
    record = TableRecord("certification_throughput", depends_on=DEPENDS_ON,
                         title="Certification throughput vs ART 1.20.1 (issue 34)")

    model = build_vit(args.model, args.width, args.max_batch, args.device)
    python = art_python(args.art_python)
    art = (ArtWorker(python, args.model, args.size, args.width, args.patch, max(args.images), args.art_batch,
                     args.device) if python else None)
    print(f"{args.model} at 224 from {args.size}×{args.size}, column b={args.width}, "
          f"{len(model.certification_masks((args.size, args.size)))} positions, device={args.device}, bf16={bf16}, "
          f"our max_batch={stacked_pass_size(args.device, model.hparams.max_batch)}, ART batch={args.art_batch}"
          + (f", ART with timm {art.timm}" if art else f"; ART skipped: no {args.art_python}"))
    rows, tables = [], {}
    for count in args.images:
        images = torch.rand(count, 3, args.size, args.size, generator=torch.Generator().manual_seed(count))
        images = images.to(args.device)
        cases = {CASE_DROP: ours_case(model, images, True, bf16)}
        if args.floor:
            cases[CASE_FLOOR] = floor_case(model, count, args.size, bf16)
        if count <= args.full_images:
            cases[CASE_FULL] = ours_case(model, images, False, bf16)
        if art:
            cases[CASE_ART] = lambda count=count: art.seconds(count)
        print(f"{count} images:")
        tables[count] = print_table(interleaved(cases, repeats=args.repeats), reference=CASE_DROP, work=count,
                                    unit="images")
        rows.append(table_row(count, tables[count]))
    if art:
        art.close()
    record.add_config("benchmark", {**vars(args), "art_python": str(python), "out": str(args.out),
                                    "our_max_batch": stacked_pass_size(args.device, model.hparams.max_batch), "bf16": bf16,
                                    "art_timm": art.timm if art else None})
    record.add_run("timings", **{str(count): table for count, table in tables.items()})
    if args.out:
        print(f"record: {record.write(args.out, COLUMNS, rows)}")
    print(json.dumps({"machine": machine(), "rows": rows}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
