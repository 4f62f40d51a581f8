"""A small latent diffusion editor and PhotoGuard's immunisation against it (thesis 001 ch. 4): a convolutional
autoencoder (28×28 → 4×7×7 latents), then a class-conditional ε-prediction MLP DDPM on the latents; an edit is SDEdit
with DDIM steps, the target class standing for Stable Diffusion's prompt. CPU-sized stand-in for Stable Diffusion
v1.5 (the thesis' editor), trained on the embedded digits in about a minute."""
from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import nn

from lit_robust.functional.attacks import random_start
from lit_robust.functional.photoguard import diffusion_attack, encoder_attack, sdedit

IMMUNIZATIONS = ("random", "encoder", "diffusion")


class ConvAutoencoder(nn.Module):
    """28×28 images → (latent_channels, 7, 7) latents in (−1, 1) (tanh) → logits of the pixels (BCE-trained: with a
    sigmoid and MSE the small decoder collapsed to black, issue #50's probe)."""

    def __init__(self, in_chans: int = 1, latent_channels: int = 4, width: int = 32):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(in_chans, width, 3, 2, 1), nn.SiLU(),
                                     nn.Conv2d(width, 2 * width, 3, 2, 1), nn.SiLU(),
                                     nn.Conv2d(2 * width, latent_channels, 3, 1, 1), nn.Tanh())
        self.decoder = nn.Sequential(nn.Conv2d(latent_channels, 2 * width, 3, 1, 1), nn.SiLU(),
                                     nn.ConvTranspose2d(2 * width, width, 4, 2, 1), nn.SiLU(),
                                     nn.ConvTranspose2d(width, in_chans, 4, 2, 1))


class LatentDenoiser(nn.Module):
    """ε̂(z_t, t, y): an MLP on the flattened latent with sinusoidal time and learned class embeddings (class
    ``num_classes`` is the unconditional one, for classifier-free guidance)."""

    def __init__(self, latent_dim: int, num_classes: int, hidden: int = 512, depth: int = 3):
        super().__init__()
        self.class_embedding = nn.Embedding(num_classes + 1, hidden)
        self.time_embedding = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.inp = nn.Linear(latent_dim, hidden)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.SiLU(),
                                                  nn.Linear(hidden, hidden)) for _ in range(depth))
        self.out = nn.Linear(hidden, latent_dim)
        self.hidden = hidden

    def time_features(self, t: torch.Tensor) -> torch.Tensor:
        half = self.hidden // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
        angles = t.float()[:, None] * freqs[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    def forward(self, z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.inp(z.flatten(1)) + self.time_embedding(self.time_features(t)) + self.class_embedding(labels)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h).view_as(z)


class LatentDiffusion(L.LightningModule):
    """Autoencoder for the first ``autoencoder_steps`` optimiser steps, then the latent DDPM on the frozen encoder's
    latents (scaled to unit variance by ``latent_scale``, measured on the first diffusion batch), with the class
    label dropped to the unconditional one with probability ``uncond_prob``.

    ``edit`` is SDEdit at ``strength`` with ``ddim_steps`` and guidance ``guidance``; ``immunize`` is PhotoGuard's
    encoder or diffusion attack (or random ℓ∞ noise of the same ε, the baseline of Table 4.1).
    """

    def __init__(self, in_chans: int = 1, img_size: int = 28, latent_channels: int = 4, num_classes: int = 10,
                 width: int = 32, hidden: int = 512, depth: int = 3, num_train_timesteps: int = 200,
                 autoencoder_steps: int = 1000, uncond_prob: float = 0.1, lr: float = 1e-3):
        super().__init__()
        if img_size % 4:
            raise ValueError(f"img_size={img_size}: the autoencoder halves twice, use a multiple of 4 (data.img_size)")
        self.save_hyperparameters()
        self.autoencoder = ConvAutoencoder(in_chans, latent_channels, width)
        self.latent_shape = (latent_channels, img_size // 4, img_size // 4)
        self.denoiser = LatentDenoiser(math.prod(self.latent_shape), num_classes, hidden, depth)
        self.scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps)
        self.register_buffer("alphas_cumprod", self.scheduler.alphas_cumprod.clone().float())
        self.register_buffer("latent_scale", torch.tensor(0.0))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Scaled latents of [0, 1] images."""
        return self.autoencoder.encoder(images) * self.latent_scale.clamp_min(1e-8)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.autoencoder.decoder(latents / self.latent_scale.clamp_min(1e-8)))

    def training_step(self, batch, batch_idx):
        images, labels = batch[0], batch[1]
        if self.global_step < self.hparams.autoencoder_steps:
            recon = self.autoencoder.decoder(self.autoencoder.encoder(images))
            loss = F.binary_cross_entropy_with_logits(recon, images)
            self.log("train/recon_loss", loss, prog_bar=True)
            return loss
        with torch.no_grad():
            raw = self.autoencoder.encoder(images)
            if self.latent_scale == 0:
                self.latent_scale.fill_(1.0 / raw.std().item())
        loss = self.diffusion_loss(raw * self.latent_scale, labels)
        self.log("train/diffusion_loss", loss, prog_bar=True)
        return loss

    def diffusion_loss(self, z0: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The ε-MSE of DDPM (Ho et al. 2020, Eq. 14) with labels dropped to unconditional at ``uncond_prob``."""
        t = torch.randint(0, self.hparams.num_train_timesteps, (len(z0),), device=z0.device)
        noise = torch.randn_like(z0)
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        drop = torch.rand(len(labels), device=labels.device) < self.hparams.uncond_prob
        labels = torch.where(drop, torch.full_like(labels, self.hparams.num_classes), labels)
        return F.mse_loss(self.denoiser(a.sqrt() * z0 + (1 - a).sqrt() * noise, t, labels), noise)

    def test_step(self, batch, batch_idx):
        images, labels = batch[0], batch[1]
        recon = self.autoencoder.decoder(self.autoencoder.encoder(images))
        self.log("test/recon_loss", F.binary_cross_entropy_with_logits(recon, images), batch_size=len(images))
        if self.latent_scale > 0:
            self.log("test/diffusion_loss", self.diffusion_loss(self.encode(images), labels), batch_size=len(images))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    def edit(self, images: torch.Tensor, target_labels: torch.Tensor, strength: float = 0.5, ddim_steps: int = 20,
             guidance: float = 2.0, noise: torch.Tensor | None = None) -> torch.Tensor:
        """SDEdit of [0, 1] images towards ``target_labels`` (the prompt); ``noise`` fixes the draw (the thesis
        edits every image with a fixed seed, Table D.1), differentiable in ``images``."""
        z0 = self.encode(images)
        noise = torch.randn_like(z0) if noise is None else noise
        z = sdedit(self.denoiser, z0, target_labels, self.alphas_cumprod, strength, ddim_steps, noise,
                   self.hparams.num_classes, guidance)
        return self.decode(z)

    def immunize(self, images: torch.Tensor, method: str, eps: float, steps: int = 200, target_labels=None,
                 strength: float = 0.5, ddim_steps: int = 4, guidance: float = 2.0, draws: int = 1,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """PhotoGuard's immunisation of ``images`` within ℓ∞ ε (001 §4.3): ``encoder`` pulls E(x + δ) to a grey
        image's latent (Eq. 4.4); ``diffusion`` pulls the edit towards the grey image through ``ddim_steps`` of the
        sampler (Eq. 4.5), each step of the attack with ``draws`` fresh noise draws averaged (the reference
        notebook's 5–10); ``random`` is uniform noise in the ℓ∞ ball (the baseline)."""
        if method not in IMMUNIZATIONS:
            raise ValueError(f"immunization method={method!r}: use one of {IMMUNIZATIONS}")
        if eps == 0:
            return images
        grey = torch.full_like(images, 0.5)
        if method == "random":
            return random_start(images, eps, "linf", generator)
        if method == "encoder":
            with torch.no_grad():
                target = self.encode(grey)
            return encoder_attack(self.encode, images, target, eps, steps)
        if target_labels is None:
            raise ValueError("the diffusion attack edits towards target_labels: pass the classes the edit requests")

        def edit(x: torch.Tensor) -> torch.Tensor:
            return torch.stack([self.edit(x, target_labels, strength, ddim_steps, guidance)
                                for _ in range(draws)]).mean(0)
        return diffusion_attack(edit, images, grey, eps, steps)
