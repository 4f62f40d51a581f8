"""Langevin dynamics on a learned energy: the update that both trains (Algorithm 2) and purifies (Algorithm 1) with an EBM.

Pure tensor functions: they know nothing of Lightning. ``energy_fn(x)`` returns one energy per sample (shape (B,));
lower energy = more likely image.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

EnergyFn = Callable[[torch.Tensor], torch.Tensor]


def energy_gradient(energy_fn: EnergyFn, x: torch.Tensor) -> torch.Tensor:
    """∇ₓ G(x) per sample (the sum over the batch has the per-sample gradients as its gradient).

    Only the input gradient is built: the parameters' ``.grad`` are left untouched, so this is safe inside a training
    step of the energy network itself.
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(energy_fn(x).float().sum(), x)
    return grad


def langevin_step(energy_fn: EnergyFn, x: torch.Tensor, step_size: float, temperature: float,
                  noise: torch.Tensor) -> torch.Tensor:
    """One Langevin update, thesis Eq. (6.7), in the PureGen reference code's parameterisation:

        x ← x − (ε²/2)·∇ₓ G(x)/T + ε·noise,   noise ~ N(0, I).

    Eq. (6.7) reads x − Δτ·∇G + √(2Δτ)·noise; the reference code instead fixes the noise scale ε and tempers the
    energy by T (ε = 1.25e-2, T = 1e-4), which is Eq. (6.7) for the energy G/T at Δτ = ε²/2 and noise ε — the values
    its published EBMs were trained with, so we keep that form.
    """
    grad = energy_gradient(energy_fn, x)
    return x.detach() - (0.5 * step_size ** 2 / temperature) * grad + step_size * noise


def langevin_chain(energy_fn: EnergyFn, x: torch.Tensor, steps: int, step_size: float = 1.25e-2,
                   temperature: float = 1e-4, generator: torch.Generator | None = None,
                   record_every: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``steps`` Langevin updates (Eq. 6.7) from ``x``; the noise is drawn from ``generator`` so that a chain is
    reproducible from its seed whatever process runs it.

    Returns the final state and, if ``record_every`` > 0, the states after every ``record_every`` steps (for the
    thesis' Fig. 6.2 trajectory of ℓ2 distances); the start state is the first record.
    """
    if steps < 0:
        raise ValueError(f"steps={steps}: the number of Langevin steps must be >= 0")
    if not (math.isfinite(step_size) and math.isfinite(temperature) and step_size > 0 and temperature > 0):
        raise ValueError(f"step_size={step_size}, temperature={temperature}: both must be finite numbers > 0")
    records = [x.detach().clone()] if record_every else []
    x = x.detach()
    for step in range(1, steps + 1):
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = langevin_step(energy_fn, x, step_size, temperature, noise)
        if record_every and step % record_every == 0:
            records.append(x.clone())
    return x, records
