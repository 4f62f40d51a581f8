"""Gradient attacks on inputs in [0, 1] (FGSM, ℓ∞ PGD), batched; ``loss_fn(x)`` returns per-sample losses to
*increase* (e.g. cross-entropy of a classifier, or the negative ELBO of a VAE encoder attack). ``random_sign`` is
their reference: an attack that does no better than random noise of the same size is not using its gradient."""
from __future__ import annotations

from typing import Callable

import torch

LossFn = Callable[[torch.Tensor], torch.Tensor]


def _input_gradient(loss_fn: LossFn, x: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(loss_fn(x).sum(), x)
    return grad


def fgsm(loss_fn: LossFn, x: torch.Tensor, eps: float) -> torch.Tensor:
    """One signed-gradient step of size ``eps`` (Goodfellow et al.), clipped to [0, 1]."""
    return (x + eps * _input_gradient(loss_fn, x).sign()).clamp(0.0, 1.0).detach()


def random_sign(x: torch.Tensor, eps: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each pixel moved by ±``eps`` at random (FGSM's budget without the gradient), clipped to [0, 1]."""
    signs = torch.randint(0, 2, x.shape, generator=generator).to(x.device) * 2 - 1
    return (x + eps * signs).clamp(0.0, 1.0)


def pgd_linf(loss_fn: LossFn, x: torch.Tensor, eps: float, step_size: float | None = None, steps: int = 10,
             random_start: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """Projected gradient ascent in the ℓ∞ ball of radius ``eps`` around ``x`` (Madry et al.), within [0, 1]."""
    step_size = step_size if step_size is not None else 2.5 * eps / max(steps, 1)
    adv = x.detach().clone()
    if random_start:
        noise = torch.rand(x.shape, generator=generator, device=x.device) * 2 - 1
        adv = (adv + eps * noise).clamp(0.0, 1.0)
    for _ in range(steps):
        adv = adv + step_size * _input_gradient(loss_fn, adv).sign()
        adv = torch.min(torch.max(adv, x - eps), x + eps).clamp(0.0, 1.0).detach()
    return adv
