"""PhotoGuard on the embedded digits (thesis 001 ch. 4, Table 4.1; issue #50): do immunised images give edits farther
from the clean edit than images with random noise of the same ε, and closer to the attack's target?

The editor: ``photoguard_digits`` (conv autoencoder to 4×7×7 latents, class-conditional MLP latent DDPM). The judge
of the edits: the classifier of ``benchmarks/unadversarial_table.py`` (same overrides). ``--images`` test digits,
each edited towards another class (the "prompt") with SDEdit (``--ddim-steps`` DDIM steps, guidance 2) from one
fixed noise draw per image, clean and after immunisation — random ℓ∞ noise, the encoder attack (``--encoder-steps``
PGD steps towards a grey image's latent) or the diffusion attack (``--diffusion-steps`` PGD steps through 4 DDIM
steps of the edit towards the grey image) — at each ε and edit strength. SSIM / PSNR (torchmetrics) compare the
immunised edit with the clean edit (lower: the immunisation changed the edit more); "MSE to target" is the edit's
mean squared distance to the grey target. Written to ``<out>/photoguard_digits.json``.

    python benchmarks/photoguard_table.py --out outputs/photoguard_table [train.py overrides of the editor]
"""
from __future__ import annotations

import argparse
import json

import torch
from records import ROOT, TableRecord, recorded_runs
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from unadversarial_table import CLASSIFIER

DEPENDS_ON = ["lit_robust/models/latent_diffusion.py", "lit_robust/functional/photoguard.py",
              "lit_robust/models/classifier.py", "datamodules/digits.py", "conf/experiment/photoguard_digits.yaml",
              "conf/experiment/digits_classifier.yaml", "benchmarks/unadversarial_table.py"]
COLUMNS = [("strength", "{strength:g}"), ("ε", "{eps_255:g}/255"), ("immunisation", "{method}"),
           ("SSIM to clean edit", "{ssim:.3f}"), ("PSNR to clean edit (dB)", "{psnr:.1f}"),
           ("MSE to target", "{mse_target:.4f}"), ("edit is the requested class (%)", "{agreement:.1f}")]


def edit_metrics(edits: torch.Tensor, clean_edits: torch.Tensor, targets: torch.Tensor, classifier) -> dict:
    with torch.no_grad():
        agreement = (classifier(edits).argmax(-1) == targets).float().mean().item()
    return {"ssim": structural_similarity_index_measure(edits, clean_edits, data_range=1.0).item(),
            "psnr": peak_signal_noise_ratio(edits, clean_edits, data_range=1.0).item(),
            "mse_target": (edits - 0.5).pow(2).mean().item(), "agreement": 100 * agreement}


def main() -> None:
    from lit_robust import ImageClassifier, LatentDiffusion
    from lit_robust.datamodules import DigitsDataModule
    from lit_robust.functional.unadversarial_patterns import conflicting_labels

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/photoguard_table")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--eps", type=int, nargs="+", default=[16, 32, 64], help="ε in 1/255")
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.3, 0.6])
    parser.add_argument("--ddim-steps", type=int, default=20)
    parser.add_argument("--encoder-steps", type=int, default=200)
    parser.add_argument("--diffusion-steps", type=int, default=60)
    args, extra = parser.parse_known_args()
    out = (ROOT / args.out).resolve()
    record = TableRecord("photoguard_digits", depends_on=DEPENDS_ON,
                         title="PhotoGuard immunisation of digits against latent SDEdit edits")
    runs = [(out / "editor", ["experiment=photoguard_digits", *extra], "test/recon_loss"),
            (out / "classifier", CLASSIFIER, "test/acc")]
    if recorded_runs(record, runs) is None:
        return
    editor = LatentDiffusion.load_from_checkpoint(out / "editor" / "checkpoints" / "last.ckpt", map_location="cpu",
                                                  weights_only=True).eval().requires_grad_(False)
    classifier = ImageClassifier.load_from_checkpoint(out / "classifier" / "checkpoints" / "best.ckpt",
                                                      map_location="cpu", weights_only=True).eval()
    datamodule = DigitsDataModule(source="mnist5k", seed=0)
    datamodule.setup("test")
    images = datamodule.test_dataset.images[:args.images]
    generator = torch.Generator().manual_seed(0)
    targets = conflicting_labels(datamodule.test_dataset.targets[:args.images], 10, generator)
    noise = torch.randn((len(images), *editor.latent_shape), generator=generator)
    rows = []
    for strength in args.strengths:
        def edit(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return editor.edit(x, targets, strength, args.ddim_steps, noise=noise)
        clean_edits = edit(images)
        rows.append({"strength": strength, "eps_255": 0, "method": "none",
                     **edit_metrics(clean_edits, clean_edits, targets, classifier)})
        for eps in args.eps:
            for method, steps in (("random", 0), ("encoder", args.encoder_steps), ("diffusion", args.diffusion_steps)):
                immunized = editor.immunize(images, method, eps / 255, steps=steps, target_labels=targets,
                                            strength=strength, ddim_steps=4, generator=generator)
                rows.append({"strength": strength, "eps_255": eps, "method": method,
                             **edit_metrics(edit(immunized), clean_edits, targets, classifier)})
                print(rows[-1], flush=True)
    path = record.write(out, COLUMNS, rows)
    from render_results import render_table
    print(render_table(json.loads(path.read_text())))
    print(f"record: {path}")


if __name__ == "__main__":
    main()
