"""A PNG grid of LAVAE's latent augmentations next to the pixel augmentations they stand in for (thesis 000 §5.4.3)."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from lit_robust.datasets import stack_dataset


class LatentAugmentationGrid(L.Callback):
    """After testing, save ``latent_augmentation_grid.png``: per row, for ``num_images`` test images spread over the
    split, the input,
    then for each augmentation and the composition the pixel-augmented image beside θ(φ(x0)·L) (Eqs. 5.7, 5.8)."""

    def __init__(self, output_dir: str, num_images: int = 8):
        self.output_dir, self.num_images = Path(output_dir), num_images

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        images, _ = stack_dataset(trainer.datamodule.test_dataset)
        picks = torch.linspace(0, len(images) - 1, self.num_images).long()   # spread over the (class-sorted) split
        x0 = images[picks].to(pl_module.device)
        a1, a2 = pl_module.hparams.augmentations
        targets = pl_module.augmented_set(x0)
        with torch.no_grad():
            rows = {"input": x0, "reconstruction (5.6)": pl_module.reconstruct(x0),
                    f"{a1}(x)": targets[a1], f"latent {a1} (5.7)": pl_module.latent_augment(x0, 0),
                    f"{a2}(x)": targets[a2], f"latent {a2} (5.7)": pl_module.latent_augment(x0, 1),
                    "composition": targets["composition"], "latent L1·L2 (5.8)": pl_module.latent_compose(x0),
                    "latent L2·L1 (5.9)": pl_module.latent_compose(x0, reverse=True)}
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(len(rows), len(x0), figsize=(1.1 * len(x0), 1.1 * len(rows)), squeeze=False)
        for r, (name, batch) in enumerate(rows.items()):
            for c in range(len(x0)):
                axes[r, c].imshow(batch[c].cpu().permute(1, 2, 0).squeeze(-1).clamp(0, 1).numpy(), cmap="gray")
                axes[r, c].set_xticks([]), axes[r, c].set_yticks([])
            axes[r, 0].set_ylabel(name, fontsize=6, rotation=0, ha="right")
        fig.tight_layout()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        fig.savefig(self.output_dir / "latent_augmentation_grid.png", dpi=110)
        plt.close(fig)
