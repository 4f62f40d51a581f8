"""LAVAE, the latent augmentation VAE (thesis 000 ch. 5.4): a VAE whose latent space carries explicit linear maps
L_aug_k that stand in for image augmentations f_aug_k, plus transfer decoder heads.

Training runs in the three stages of §5.4.2, switched by epoch (``stage_epochs``):
1. encoder φ / decoder θ on original, augmented and composed images, BCE + λ_KL·KL (Eq. 5.3);
2. the linear maps only: φ(f_k(x0)) ≈ φ(x0)·L_k (Eq. 5.4);
3. a transfer decoder head θ_T only: θ_T(φ(x0)·L_k) ≈ f_g(k)(x0) for a second augmentation set (Eq. 5.5).
Uses (§5.4.3) are methods: ``reconstruct`` (Eq. 5.6), ``latent_augment`` (Eq. 5.7), ``latent_compose`` (Eqs. 5.8
and 5.9, either order). φ(x) is the posterior mean. Augmentations are exact tensor ops on square images: ``rot90``,
``hflip``, ``vflip``, ``rot180``, ``transpose``; the composition is f_1 then f_2 (the order stage 1 trains on).
The test step logs, per augmentation and for the composition, the MSE to the pixel-augmented image of the latent
augmentation (``test/mse_latent/<name>``) and of the decoded original (``test/mse_original/<name>``).
"""
from __future__ import annotations

from typing import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from lit_robust.models.deep_cama import kl_to_standard_normal, mlp, reparameterise

AUGMENTATIONS = {
    "rot90": lambda x: torch.rot90(x, 1, dims=(-2, -1)),
    "rot180": lambda x: torch.rot90(x, 2, dims=(-2, -1)),
    "hflip": lambda x: torch.flip(x, dims=(-1,)),
    "vflip": lambda x: torch.flip(x, dims=(-2,)),
    "transpose": lambda x: x.transpose(-2, -1),
}


def augment(images: torch.Tensor, name: str) -> torch.Tensor:
    """f_aug(images) for a named augmentation (see ``AUGMENTATIONS``)."""
    if name not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {name!r}: use one of {sorted(AUGMENTATIONS)}")
    return AUGMENTATIONS[name](images)


class LAVAE(L.LightningModule):
    """Args:
        augmentations: the two augmentations 𝒜 = (f_1, f_2) the latent maps learn.
        transfer_augmentations: 𝒜_T paired with 𝒜 (g(1), g(2)) for the transfer head of stage 3.
        stage_epochs: epochs of stages 1, 2, 3.
        kl_weight, recon_weight: λ_KL = 5, λ_recon = 1 (§5.4.2, App. C.1), on per-image summed BCE and KL.
    """

    def __init__(self, in_chans: int = 1, img_size: int = 28, latent_dim: int = 16, hidden: int = 512,
                 augmentations: Sequence[str] = ("rot90", "hflip"),
                 transfer_augmentations: Sequence[str] = ("vflip", "rot180"),
                 stage_epochs: Sequence[int] = (20, 10, 10), kl_weight: float = 5.0, recon_weight: float = 1.0,
                 lr: float = 1e-3):
        super().__init__()
        if len(augmentations) != 2 or len(transfer_augmentations) != 2:
            raise ValueError(f"augmentations={augmentations}, transfer_augmentations={transfer_augmentations}: "
                             "give two of each (the pair and its composition, §5.4.2)")
        for name in [*augmentations, *transfer_augmentations]:
            augment(torch.zeros(1, 1, 2, 2), name)
        if len(stage_epochs) != 3:
            raise ValueError(f"stage_epochs={stage_epochs}: give epochs for the 3 stages")
        self.save_hyperparameters()
        pixels = in_chans * img_size * img_size
        self.encoder = mlp([pixels, hidden, hidden, 2 * latent_dim], last_activation=False)
        self.decoder = mlp([latent_dim, hidden, hidden, pixels], last_activation=False)
        self.transfer_decoder = mlp([latent_dim, hidden, hidden, pixels], last_activation=False)
        self.latent_maps = nn.Parameter(torch.eye(latent_dim).repeat(2, 1, 1))    # L_aug_1, L_aug_2

    @property
    def stage(self) -> int:
        """1, 2 or 3 from the current epoch and ``stage_epochs``."""
        s1, s2, _ = self.hparams.stage_epochs
        epoch = self.current_epoch
        return 1 if epoch < s1 else 2 if epoch < s1 + s2 else 3

    # -- networks --------------------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(x.flatten(1)).chunk(2, dim=-1)

    def phi(self, x: torch.Tensor) -> torch.Tensor:
        """φ(x): the posterior mean."""
        return self.encode(x)[0]

    def decode_logits(self, z: torch.Tensor, transfer: bool = False) -> torch.Tensor:
        hp = self.hparams
        head = self.transfer_decoder if transfer else self.decoder
        return head(z).view(-1, hp.in_chans, hp.img_size, hp.img_size)

    def theta(self, z: torch.Tensor, transfer: bool = False) -> torch.Tensor:
        """θ(z) (or θ_T): decoded image in [0, 1]."""
        return torch.sigmoid(self.decode_logits(z, transfer))

    def augmented_set(self, x0: torch.Tensor) -> dict[str, torch.Tensor]:
        """Original, f_1(x0), f_2(x0) and the composition f_2(f_1(x0)) — D_aug of stage 1."""
        a1, a2 = self.hparams.augmentations
        x1 = augment(x0, a1)
        return {"original": x0, a1: x1, a2: augment(x0, a2), "composition": augment(x1, a2)}

    # -- §5.4.3 uses -----------------------------------------------------------------------------------------------
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Eq. 5.6: x̂ = θ(φ(x)) for any original, augmented or composed image."""
        return self.theta(self.phi(x))

    def latent_augment(self, x0: torch.Tensor, index: int, transfer: bool = False) -> torch.Tensor:
        """Eq. 5.7: x̂_i = θ(φ(x0)·L_aug_i) (``transfer``: through θ_T, giving f_g(i)(x0), Eq. 5.5's use)."""
        return self.theta(self.phi(x0) @ self.latent_maps[index], transfer)

    def latent_compose(self, x0: torch.Tensor, reverse: bool = False) -> torch.Tensor:
        """Eq. 5.8: θ(φ(x0)·L_1·L_2); ``reverse`` gives Eq. 5.9's θ(φ(x0)·L_2·L_1) ≈ the same image."""
        first, second = (1, 0) if reverse else (0, 1)
        return self.theta(self.phi(x0) @ self.latent_maps[first] @ self.latent_maps[second])

    # -- stage losses ----------------------------------------------------------------------------------------------
    def reconstruction_loss(self, x0: torch.Tensor) -> torch.Tensor:
        """Stage 1, Eq. 5.3 (+ λ_KL·KL): BCE of θ(φ(x)) over original, augmented and composed images."""
        x = torch.cat(list(self.augmented_set(x0).values()))
        mean, logvar = self.encode(x)
        logits = self.decode_logits(reparameterise(mean, logvar))
        recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(-1).mean()
        kl = kl_to_standard_normal(mean, logvar).mean()
        return self.hparams.recon_weight * recon + self.hparams.kl_weight * kl

    def latent_map_loss(self, x0: torch.Tensor) -> torch.Tensor:
        """Stage 2, Eq. 5.4: Σ_k (φ(f_k(x0)) − φ(x0)·L_k)², encoder fixed."""
        with torch.no_grad():
            z0 = self.phi(x0)
            targets = [self.phi(augment(x0, name)) for name in self.hparams.augmentations]
        return sum(((target - z0 @ self.latent_maps[k]) ** 2).sum(-1).mean() for k, target in enumerate(targets))

    def transfer_loss(self, x0: torch.Tensor) -> torch.Tensor:
        """Stage 3, Eq. 5.5: BCE(f_g(k)(x0), θ_T(φ(x0)·L_k)), only the transfer head trained."""
        with torch.no_grad():
            z = [self.phi(x0) @ self.latent_maps[k] for k in range(2)]
        return sum(F.binary_cross_entropy_with_logits(self.decode_logits(z[k], transfer=True), augment(x0, name))
                   for k, name in enumerate(self.hparams.transfer_augmentations))

    # -- Lightning -------------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        total = sum(self.hparams.stage_epochs)
        if self.trainer.max_epochs is not None and 0 <= self.trainer.max_epochs < total and not self.trainer.max_steps > 0:
            raise ValueError(f"trainer.max_epochs={self.trainer.max_epochs} ends before the 3 stages "
                             f"{list(self.hparams.stage_epochs)}: set trainer.max_epochs={total}")

    def training_step(self, batch, batch_idx):
        x0 = batch[0]
        stage = self.stage
        loss = {1: self.reconstruction_loss, 2: self.latent_map_loss, 3: self.transfer_loss}[stage](x0)
        self.log(f"train/stage{stage}_loss", loss, prog_bar=True)
        return loss

    def augmentation_errors(self, x0: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-image MSE to each pixel-augmented image: latent augmentation (Eq. 5.7/5.8) vs decoded original."""
        a1, a2 = self.hparams.augmentations
        targets = self.augmented_set(x0)
        original = self.reconstruct(x0)
        latent = {a1: self.latent_augment(x0, 0), a2: self.latent_augment(x0, 1),
                  "composition": self.latent_compose(x0)}
        errors = {}
        for name, image in latent.items():
            errors[f"mse_latent/{name}"] = ((image - targets[name]) ** 2).flatten(1).mean(1)
            errors[f"mse_original/{name}"] = ((original - targets[name]) ** 2).flatten(1).mean(1)
        errors["mse_latent/composition_reversed"] = ((self.latent_compose(x0, reverse=True) - targets["composition"])
                                                     ** 2).flatten(1).mean(1)
        for k, name in enumerate(self.hparams.transfer_augmentations):
            errors[f"mse_transfer/{name}"] = ((self.latent_augment(x0, k, transfer=True) - augment(x0, name))
                                              ** 2).flatten(1).mean(1)
        errors["mse_reconstruction"] = ((original - x0) ** 2).flatten(1).mean(1)
        return errors

    def _evaluate(self, batch, split: str) -> None:
        for name, values in self.augmentation_errors(batch[0]).items():
            self.log(f"{split}/{name}", values.mean(), sync_dist=True)

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
