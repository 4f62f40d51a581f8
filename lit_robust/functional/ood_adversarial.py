"""Adversarial inputs as problematic inputs for an OOD detector (thesis 004 ch. 5): examples crafted against a
classifier (FGSM/PGD, §5.2.1) and against a VAE encoder (Eq. 5.1), built on ``lit_robust.functional.attacks``."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from lit_robust.functional.attacks import fgsm, pgd_linf

Encoder = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def symmetric_gaussian_kl(mean_a: torch.Tensor, log_var_a: torch.Tensor, mean_b: torch.Tensor,
                          log_var_b: torch.Tensor) -> torch.Tensor:
    """``SKL = KL(a||b) + KL(b||a)`` of two diagonal Gaussians, per row (the objective of Eq. 5.1)."""
    var_a, var_b = log_var_a.exp(), log_var_b.exp()
    diff = (mean_a - mean_b).pow(2)
    return 0.5 * ((var_a + diff) / var_b + (var_b + diff) / var_a - 2.0).sum(-1)


def encoder_attack(encode: Encoder, x: torch.Tensor, eps: float, steps: int = 20, step_size: float | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Eq. 5.1: ``argmax_{||ε||∞ ≤ δ} SKL[q(z|x+ε), q(z|x)]`` by ℓ∞ PGD with a random start (the SKL gradient is
    zero at ε = 0). The thesis does not fix the norm; ℓ∞ matches the classifier attacks."""
    with torch.no_grad():
        ref_mean, ref_log_var = encode(x)

    def loss_fn(x_adv: torch.Tensor) -> torch.Tensor:
        mean, log_var = encode(x_adv)
        return symmetric_gaussian_kl(mean, log_var, ref_mean, ref_log_var)

    return pgd_linf(loss_fn, x, eps, step_size, steps, random_start=True, generator=generator)


def classifier_attack(classifier: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, eps: float,
                      method: str = "fgsm", steps: int = 10) -> torch.Tensor:
    """Untargeted FGSM or ℓ∞ PGD on the cross-entropy of ``classifier`` (§5.2.1; the thesis also runs CW and JSMA)."""
    def loss_fn(x_adv: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(classifier(x_adv), labels, reduction="none")

    if method == "fgsm":
        return fgsm(loss_fn, x, eps)
    if method == "pgd":
        return pgd_linf(loss_fn, x, eps, steps=steps)
    raise ValueError(f"attack method {method!r}: use 'fgsm' or 'pgd'")


def latent_langevin(log_joint: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, steps: int,
                    step_size: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``steps`` single-leapfrog HMC moves without the Metropolis test (= Langevin) on ``log p(x, z)``, batched over
    rows of ``z``: the latent re-evaluation of Algorithm 2 (ch. 5, after [23]). The thesis runs full HMC; one leapfrog
    step per move keeps the cost at one decoder pass and is enough to pull a code out of a hole."""
    z = z.detach()
    for _ in range(steps):
        with torch.enable_grad():
            z_ = z.requires_grad_(True)
            (grad,) = torch.autograd.grad(log_joint(z_).sum(), z_)
        noise = torch.randn(z.shape, generator=generator, device="cpu" if generator is not None else z.device)
        z = (z + 0.5 * step_size ** 2 * grad + step_size * noise.to(z)).detach()
    return z


def restoration_gain(x: torch.Tensor, reconstruction: torch.Tensor, restored: torch.Tensor) -> torch.Tensor:
    """Algorithm 2's gain ``|γ_hmc − γ_no_hmc|`` per image, with γ the structural similarity to the input.

    The thesis uses MS-SSIM; five scales need images ≥ 160 px, so images this small use single-scale SSIM
    (5×5 Gaussian window)."""
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    def per_image(a: torch.Tensor) -> torch.Tensor:
        return ssim(a, x, kernel_size=5, data_range=1.0, reduction="none")

    return (per_image(restored) - per_image(reconstruction)).abs()
