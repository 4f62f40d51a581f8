"""Approximate posteriors over a network's weights (thesis 004 §3.3.1): Bayes by Backprop, SWAG and scale-adapted
SGHMC, each able to draw N weight sets at once as a dict ``name → (N, *shape)`` that ``torch.func.functional_call``
+ ``vmap`` evaluate in one batched pass (see ``lit_robust.models.bayesian_vae``).

All state (ρ, SWAG moments and deviations, SGHMC snapshots, the prior precision) lives in registered parameters or
buffers, so it is saved in checkpoints and restored on resume; the SGHMC optimizer's own state (τ, g, v̂, momentum)
travels in the optimizer state dict.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def flatten_params(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """One vector of all tensors of ``params`` in their dict order."""
    return torch.cat([p.detach().reshape(-1) for p in params.values()])


def unflatten_draws(flat: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """(N, P) draws back to ``name → (N, *shape)`` following the shapes of ``like``."""
    out, start = {}, 0
    for name, p in like.items():
        out[name] = flat[:, start:start + p.numel()].reshape(flat.shape[0], *p.shape)
        start += p.numel()
    if start != flat.shape[1]:
        raise ValueError(f"draws have {flat.shape[1]} values but the parameters need {start}")
    return out


def gaussian_kl(mu: torch.Tensor, sigma: torch.Tensor, prior_sigma: float) -> torch.Tensor:
    """``KL(N(μ, σ²) || N(0, σ_p²))`` summed over all elements (closed form)."""
    return (torch.log(prior_sigma / sigma) + (sigma.pow(2) + mu.pow(2)) / (2 * prior_sigma ** 2) - 0.5).sum()


class MeanFieldGaussian(nn.Module):
    """Bayes by Backprop (Blundell et al. 2015; thesis Eqs. 3.4–3.8): ``q(θ) = Π N(μ, σ²)``, ``σ = softplus(ρ)``.

    μ *is* the wrapped module's own parameters (so the module used as-is is the posterior mean); this class adds one
    ρ per parameter. Initialisation as in §3.4: ``μ ~ N(0, mu_init_std)`` (``None`` keeps PyTorch's default init),
    ``ρ = rho_init`` (the thesis uses −3; smaller starts closer to a point estimate).

    Deviation: the prior is one Gaussian ``N(0, prior_sigma²)`` with a closed-form KL instead of the scale mixture of
    Eq. 5.16 — the measured recipe in ``specs/README.md`` uses N(0, 1), and the closed form has no sampling noise.
    """

    def __init__(self, module: nn.Module, rho_init: float = -3.0, mu_init_std: float | None = 0.1,
                 prior_sigma: float = 1.0):
        super().__init__()
        if prior_sigma <= 0:
            raise ValueError(f"prior_sigma={prior_sigma} must be positive")
        self.prior_sigma = prior_sigma
        self.names = [name for name, _ in module.named_parameters()]
        if mu_init_std is not None:
            with torch.no_grad():
                for p in module.parameters():
                    p.normal_(0.0, mu_init_std)
        self.rho = nn.ParameterList([nn.Parameter(torch.full_like(p, rho_init)) for p in module.parameters()])

    def sigmas(self) -> list[torch.Tensor]:
        return [F.softplus(rho) for rho in self.rho]

    def rsample(self, mu: dict[str, torch.Tensor], num_draws: int = 1,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """``num_draws`` reparameterised draws ``μ + σ ε`` (differentiable in μ and ρ), ``name → (N, *shape)``."""
        out = {}
        for (name, m), sigma in zip(mu.items(), self.sigmas()):
            eps = torch.randn((num_draws, *m.shape), generator=generator, dtype=m.dtype,
                              device=m.device if generator is None else "cpu").to(m.device)
            out[name] = m.unsqueeze(0) + sigma.unsqueeze(0) * eps
        return out

    def kl(self, mu: dict[str, torch.Tensor]) -> torch.Tensor:
        """``KL(q(θ|λ) || p(θ))``: the ``log q − log p`` term of Eq. 3.8 in closed form."""
        return sum(gaussian_kl(m, s, self.prior_sigma) for m, s in zip(mu.values(), self.sigmas()))


class SnapshotBank(nn.Module):
    """A ring of the last ``capacity`` flattened weight vectors; posterior draws are snapshots chosen by seed.

    Serves SGHMC (the chain's samples after burn-in are the posterior draws); ``SWAG`` overrides how snapshots are
    stored and sampled. Preallocated buffers, so checkpoints hold the whole bank.
    """

    def __init__(self, num_params: int, capacity: int):
        super().__init__()
        if capacity < 2:
            raise ValueError(f"capacity={capacity}: a posterior needs at least 2 snapshots")
        self.capacity = capacity
        self.register_buffer("snapshots", torch.zeros(capacity, num_params))
        self.register_buffer("num_seen", torch.zeros((), dtype=torch.long))

    @property
    def num_stored(self) -> int:
        return int(min(self.num_seen.item(), self.capacity))

    def collect(self, flat: torch.Tensor) -> None:
        self.snapshots[int(self.num_seen.item()) % self.capacity] = flat.to(self.snapshots)
        self.num_seen += 1

    def _require(self, minimum: int) -> None:
        if self.num_stored < minimum:
            raise RuntimeError(f"the weight posterior holds {self.num_stored} snapshots (need {minimum}); train "
                               "past the collection start (model.collect_start) or lower it")

    def sample(self, num_draws: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(N, P) draws: snapshots in a seeded random order (cycling when N exceeds the bank)."""
        self._require(1)
        stored = self.num_stored
        order = torch.cat([torch.randperm(stored, generator=generator)
                           for _ in range(math.ceil(num_draws / stored))])[:num_draws]
        return self.snapshots[order.to(self.snapshots.device)]


class SWAG(SnapshotBank):
    """SWAG (Maddox et al. 2019; thesis Eqs. 3.11–3.12): ``N(θ_SWA, ½(Σ_diag + Σ_lowrank))``.

    Running first and second moments over every collected snapshot; the low-rank part from the deviations
    ``θ_i − θ_SWA`` of the last K (= ``capacity``, 40 in §3.4) snapshots. Sampling as the reference code with
    ``scale = 0.5``: ``θ = θ_SWA + √scale (σ_diag ⊙ ε₁ + Dᵀε₂ / √(K−1))``.
    """

    def __init__(self, num_params: int, capacity: int = 40, scale: float = 0.5):
        super().__init__(num_params, capacity)
        self.scale = scale
        self.register_buffer("mean", torch.zeros(num_params))
        self.register_buffer("sq_mean", torch.zeros(num_params))

    def collect(self, flat: torch.Tensor) -> None:
        flat = flat.to(self.mean)
        n = float(self.num_seen.item())
        self.mean.mul_(n / (n + 1)).add_(flat / (n + 1))
        self.sq_mean.mul_(n / (n + 1)).add_(flat.pow(2) / (n + 1))
        super().collect(flat - self.mean)

    def sample(self, num_draws: int, generator: torch.Generator | None = None) -> torch.Tensor:
        self._require(2)
        k = self.num_stored
        var = (self.sq_mean - self.mean.pow(2)).clamp_min(1e-30)
        eps1 = torch.randn((num_draws, var.numel()), generator=generator).to(var)
        eps2 = torch.randn((num_draws, k), generator=generator).to(var)
        low_rank = eps2 @ self.snapshots[:k] / math.sqrt(k - 1)
        return self.mean + math.sqrt(self.scale) * (var.sqrt() * eps1 + low_rank)


class ScaleAdaptedSGHMC(torch.optim.Optimizer):
    """Scale-adapted SGHMC (Springenberg et al. 2016, as in pybnn; thesis §3.3.1, §3.4: lr 1e-3, momentum decay 0.05).

    Samples ``θ ∝ exp(−U(θ))`` (Eq. 3.9) from noisy gradients of ``U/N``; ``scale_grad = N`` restores the full-data
    potential of Eq. 3.10. During the first ``num_burn_in_steps`` steps the preconditioner ``v̂`` (a running estimate
    of the squared gradient) and its averaging window τ adapt; afterwards they stay fixed so the chain is a proper
    sampler. The momentum, preconditioner and step counter live in ``self.state`` (saved with the optimizer).
    Under DDP the gradients are all-reduced and every rank draws the same noise (Lightning seeds all ranks alike and
    they make the same random calls), so the ranks' chains stay identical.
    """

    def __init__(self, params, lr: float = 1e-3, mdecay: float = 0.05, num_burn_in_steps: int = 3000,
                 scale_grad: float = 1.0, epsilon: float = 1e-16):
        if lr <= 0 or not 0 < mdecay < 1:
            raise ValueError(f"lr={lr} must be > 0 and mdecay={mdecay} in (0, 1)")
        super().__init__(params, dict(lr=lr, mdecay=mdecay, num_burn_in_steps=num_burn_in_steps,
                                      scale_grad=scale_grad, epsilon=epsilon))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mdecay, eps = group["lr"], group["mdecay"], group["epsilon"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.long)
                    for key, fill in (("tau", 1.0), ("g", 1.0), ("v_hat", 1.0), ("momentum", 0.0)):
                        state[key] = torch.full_like(p, fill)
                state["step"] += 1
                tau, g, v_hat, momentum = state["tau"], state["g"], state["v_hat"], state["momentum"]
                grad = p.grad * group["scale_grad"]
                if int(state["step"]) <= group["num_burn_in_steps"]:
                    tau_inv = 1.0 / (tau + 1.0)
                    tau.add_(1.0 - tau * g.pow(2) / (v_hat + eps))
                    g.add_(tau_inv * (grad - g))
                    v_hat.add_(tau_inv * (grad.pow(2) - v_hat))
                minv = 1.0 / (v_hat.sqrt() + eps)
                noise_var = (2.0 * lr ** 2 * mdecay * minv - lr ** 4).clamp_min(1e-16)
                momentum.add_(-(lr ** 2) * minv * grad - mdecay * momentum + noise_var.sqrt() * torch.randn_like(p))
                p.add_(momentum)
        return loss


def resample_precision(params: list[torch.Tensor], alpha: float = 1.0, beta: float = 1.0) -> torch.Tensor:
    """Gibbs step for the weight precision λ of ``p(θ) = N(0, λ⁻¹)`` under the hyperprior ``Γ(α, β)`` (§3.4,
    α = β = 1, resampled each epoch): ``λ ~ Γ(α + P/2, β + ||θ||²/2)``."""
    num = sum(p.numel() for p in params)
    sq = sum(p.detach().pow(2).sum() for p in params)
    return torch.distributions.Gamma(torch.tensor(alpha + num / 2.0), (beta + sq / 2.0).cpu()).sample()
