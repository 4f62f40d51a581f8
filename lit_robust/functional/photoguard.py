"""PhotoGuard (Salman et al. 2023, "Raising the cost of malicious AI-powered image editing"; thesis 001 ch. 4):
imperceptible ℓ∞ perturbations that make a latent diffusion model's edits of an image fail, and the SDEdit edit they
are measured on. Pure functions of an encoder, a denoiser and the noise schedule; differentiable throughout, as the
diffusion attack backpropagates through the sampler.
"""
from __future__ import annotations

from typing import Callable

import torch

from lit_robust.functional.attacks import pgd

# ε̂(z_t, t, labels) → predicted noise; labels may hold the unconditional class
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def guided_noise(denoiser: Denoiser, z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, null_label: int,
                 guidance: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): ε̂_∅ + w·(ε̂_y − ε̂_∅); w = 1 is the conditional model alone."""
    if guidance == 1.0:
        return denoiser(z, t, labels)
    both = denoiser(torch.cat([z, z]), torch.cat([t, t]), torch.cat([labels, torch.full_like(labels, null_label)]))
    conditional, unconditional = both.chunk(2)
    return unconditional + guidance * (conditional - unconditional)


def ddim_timesteps(strength: float, num_train_timesteps: int, steps: int) -> list[int]:
    """The decreasing timesteps of an SDEdit edit: from ⌊strength·T⌋ − 1 down to 0 in ``steps`` even strides."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"edit strength={strength}: use a value in (0, 1] (the fraction of the noise schedule)")
    start = max(int(strength * num_train_timesteps) - 1, 0)
    count = max(1, min(steps, start + 1))
    return torch.linspace(start, 0, count).round().long().unique_consecutive().tolist()


def sdedit(denoiser: Denoiser, z0: torch.Tensor, labels: torch.Tensor, alphas_cumprod: torch.Tensor, strength: float,
           steps: int, noise: torch.Tensor, null_label: int, guidance: float = 1.0) -> torch.Tensor:
    """SDEdit image-to-image in latent space (Meng et al. 2022; PhotoGuard's img2img, 001 §4.2): diffuse the latent
    to t = strength·T, z_t = √ᾱ_t z_0 + √(1 − ᾱ_t) ε, then deterministic DDIM steps (Song et al. 2021, Eq. 12 with
    σ = 0) conditioned on ``labels`` (the "prompt") back to t = 0."""
    timesteps = ddim_timesteps(strength, len(alphas_cumprod), steps)
    a = alphas_cumprod.to(z0.device, z0.dtype)
    z = a[timesteps[0]].sqrt() * z0 + (1 - a[timesteps[0]]).sqrt() * noise
    for i, t in enumerate(timesteps):
        eps = guided_noise(denoiser, z, torch.full((len(z),), t, device=z.device), labels, null_label, guidance)
        z0_hat = (z - (1 - a[t]).sqrt() * eps) / a[t].sqrt()
        if i + 1 < len(timesteps):
            z = a[timesteps[i + 1]].sqrt() * z0_hat + (1 - a[timesteps[i + 1]]).sqrt() * eps
    return z0_hat


def encoder_attack(encode: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, target_latents: torch.Tensor,
                   eps: float, steps: int, step_size: float | None = None) -> torch.Tensor:
    """PhotoGuard's encoder attack (Eq. 4.4; Alg. 4 as standard PGD): x + δ with ‖δ‖∞ ≤ ε whose latent E(x + δ)
    is as close as possible to ``target_latents`` (the latent of a grey image), so that the editor "sees" the target
    instead of the image."""
    def loss(x: torch.Tensor) -> torch.Tensor:     # increased by PGD: the negative squared latent distance
        return -(encode(x) - target_latents).flatten(1).pow(2).sum(1)
    return pgd(loss, images, eps, step_size, steps, "linf", random_init=True)


def diffusion_attack(edit: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, target_images: torch.Tensor,
                     eps: float, steps: int, step_size: float | None = None) -> torch.Tensor:
    """PhotoGuard's diffusion attack (Eq. 4.5; Alg. 5): x + δ with ‖δ‖∞ ≤ ε whose *edit* f(x + δ) — the whole
    encode → diffuse → denoise → decode chain, backpropagated through — is as close as possible to
    ``target_images``."""
    def loss(x: torch.Tensor) -> torch.Tensor:
        return -(edit(x) - target_images).flatten(1).pow(2).sum(1)
    return pgd(loss, images, eps, step_size, steps, "linf", random_init=True)
