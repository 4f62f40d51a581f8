"""A PNG grid of LAVAE's latent augmentations next to the pixel augmentations they stand in for (thesis 000 §5.4.3)."""
from __future__ import annotations

from typing import Callable

import lightning as L
import torch
from typing_extensions import override

from lit_robust.callbacks.contract import ContractCallback, evaluated_split

LATENT_AUGMENTATIONS = ("augmented_set", "reconstruct", "latent_augment", "latent_compose")  # LAVAE's methods


class LatentAugmentationGrid(ContractCallback):
    """After testing, save ``latent_augmentation_grid.png``: per row, for ``num_images`` test images spread over the
    split, the input, then for each augmentation and the composition the pixel-augmented image beside θ(φ(x0)·L)
    (Eqs. 5.7, 5.8). The images are the test split the loop iterates (or ``split``), in [0, 1] (``normalization``
    undone); ``output_dir`` defaults to the trainer's output folder (contract: :class:`ContractCallback`)."""

    def __init__(self, output_dir: str | None = None, num_images: int = 8, split: str | Callable | None = None,
                 item_keys: tuple | None = None, normalization=None):
        super().__init__(split, item_keys, normalization, output_dir)
        self.num_images = num_images

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        missing = [name for name in LATENT_AUGMENTATIONS if not hasattr(pl_module, name)]
        if stage == "test" and missing:
            raise TypeError(f"LatentAugmentationGrid draws a LAVAE's latent augmentations, but "
                            f"{type(pl_module).__name__} has no {', '.join(missing)}: use lit_robust.LAVAE or leave "
                            "this callback out")

    @override
    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        dataset = evaluated_split(trainer, "test", self.split, "LatentAugmentationGrid")
        picks = torch.linspace(0, len(dataset) - 1, self.num_images).long()   # spread over the (class-sorted) split
        images = self.item_format.collate([dataset[i] for i in picks.tolist()])[0]
        x0 = self.pixel_space.to_unit(images).to(pl_module.device)
        self.check_shape(x0, pl_module)
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
        folder = self.outputs(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        fig.savefig(folder / "latent_augmentation_grid.png", dpi=110)
        plt.close(fig)
