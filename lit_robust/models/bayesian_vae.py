"""Bayesian VAE for OOD and adversarial-input detection (thesis 004 ch. 3, 5): a VAE whose **decoder** weights have a
posterior — Bayes by Backprop, SWAG or scale-adapted SGHMC — or none (a classical VAE, ch. 5). Inputs are scored by
how much the importance-sampled log-likelihoods ``log p(x|θ_n)`` of N posterior draws vary (``lit_robust.functional.ood_scores``).
"""
from __future__ import annotations

import math
from typing import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from lit_robust.functional.ood_scores import importance_sampled_log_likelihood, outlier_scores
from lit_robust.models.weight_posteriors import (SWAG, MeanFieldGaussian, ScaleAdaptedSGHMC, SnapshotBank,
                                                 flatten_params, resample_precision, unflatten_draws)

POSTERIORS = ("bbb", "swag", "sghmc", "none")
LOG_2PI = math.log(2 * math.pi)


def mlp(dims: Sequence[int]) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return layers


def build_vae_nets(arch: str, in_chans: int, img_size: int, latent_dim: int,
                   hidden_dims: Sequence[int]) -> tuple[nn.Module, nn.Module]:
    """Encoder (image → 2·latent: mean and log-variance) and decoder (latent → Bernoulli logits image).

    ``mlp``: two fully connected hidden layers (the thesis' grayscale nets, §5.4); ``conv``: two stride-2
    convolutions of 32 and 64 filters and their transposes (the thesis' RGB nets); ``img_size`` must divide by 4.
    """
    dim = in_chans * img_size * img_size
    if arch == "mlp":
        encoder = nn.Sequential(nn.Flatten(), *mlp([dim, *hidden_dims, 2 * latent_dim]))
        decoder = nn.Sequential(*mlp([latent_dim, *reversed(hidden_dims), dim]),
                                nn.Unflatten(-1, (in_chans, img_size, img_size)))
        # the last layer must produce logits; mlp() adds no activation after it
        return encoder, decoder
    if arch == "conv":
        if img_size % 4:
            raise ValueError(f"model.img_size={img_size}: the conv VAE needs a multiple of 4")
        s = img_size // 4
        encoder = nn.Sequential(nn.Conv2d(in_chans, 32, 4, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(),
                                nn.Flatten(), nn.Linear(64 * s * s, hidden_dims[0]), nn.ReLU(),
                                nn.Linear(hidden_dims[0], 2 * latent_dim))
        decoder = nn.Sequential(nn.Linear(latent_dim, hidden_dims[0]), nn.ReLU(), nn.Linear(hidden_dims[0], 64 * s * s),
                                nn.ReLU(), nn.Unflatten(-1, (64, s, s)), nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ReLU(),
                                nn.ConvTranspose2d(32, in_chans, 4, 2, 1))
        return encoder, decoder
    raise ValueError(f"model.arch={arch!r}: use 'mlp' or 'conv'")


def diagonal_gaussian_log_prob(z: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    return -0.5 * (LOG_2PI + log_var + (z - mean).pow(2) / log_var.exp()).sum(-1)


class BayesianVAE(L.LightningModule):
    """VAE with a weight posterior over the decoder (thesis 004 §3.3.1) and ensemble likelihood scoring.

    Args:
        posterior: ``bbb`` | ``swag`` | ``sghmc`` | ``none`` (classical VAE; variation from importance sampling only).
        latent_dim: 10 for MNIST-like data, 20+ for CIFAR/SVHN (§3.4).
        num_draws, num_importance: N posterior draws × S importance samples per input when scoring (Eq. 3.3/3.14).
        eval_seed: fixes the N draws and the latent samples, so scores are reproducible.
        rho_init, mu_init_std, prior_sigma: BBB (thesis: ρ = −3, μ ~ N(0, 0.1)); the weight KL is divided by the
            training-set size N so that the loss is per datapoint (Eq. 3.8 divided by N).
        swag_rank: K snapshots of the low-rank covariance (40, §3.4); also the SGHMC snapshot bank size.
        collect_start, collect_every: epoch at which SWAG/SGHMC start keeping snapshots (default: so that the last
            ``swag_rank`` collections end at ``max_epochs``) and the epoch stride between snapshots.
        sghmc_lr, sghmc_mdecay, sghmc_burn_in_steps, gamma_alpha, gamma_beta: SGHMC over the decoder (§3.4: lr 1e-3,
            momentum decay 0.05, prior N(0, λ⁻¹), λ ~ Γ(1, 1) resampled every epoch); the encoder trains with Adam.

    Training uses manual optimisation so that SGHMC (decoder) and Adam (encoder) step on the same loss.
    Scoring runs in float32: the log-likelihood differences the scores read are small against their magnitude,
    which bf16 (8 bits of mantissa) would erase.
    """

    def __init__(self, posterior: str = "bbb", in_chans: int = 1, img_size: int = 16, latent_dim: int = 10,
                 hidden_dims: Sequence[int] = (400, 400), arch: str = "mlp", lr: float = 1e-3,
                 num_draws: int = 10, num_importance: int = 32, eval_seed: int = 0,
                 rho_init: float = -3.0, mu_init_std: float | None = 0.1, prior_sigma: float = 1.0,
                 swag_rank: int = 40, collect_start: int | None = None, collect_every: int = 1,
                 sghmc_lr: float = 1e-3, sghmc_mdecay: float = 0.05, sghmc_burn_in_steps: int = 3000,
                 gamma_alpha: float = 1.0, gamma_beta: float = 1.0, dataset_size: int | None = None):
        super().__init__()
        if posterior not in POSTERIORS:
            raise ValueError(f"model.posterior={posterior!r}: use one of {POSTERIORS}")
        if num_draws < 2 or num_importance < 2:
            raise ValueError(f"model.num_draws={num_draws} and model.num_importance={num_importance}: the spread "
                             "scores need at least 2 of each")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.encoder, self.decoder = build_vae_nets(arch, in_chans, img_size, latent_dim, hidden_dims)
        num_params = sum(p.numel() for p in self.decoder.parameters())
        self.bbb = MeanFieldGaussian(self.decoder, rho_init, mu_init_std, prior_sigma) if posterior == "bbb" else None
        self.bank = {"swag": lambda: SWAG(num_params, swag_rank),
                     "sghmc": lambda: SnapshotBank(num_params, swag_rank)}.get(posterior, lambda: None)()
        self.register_buffer("precision", torch.ones(()))             # SGHMC's λ
        self.register_buffer("model_entropy", torch.tensor(float("nan")))  # typicality's H (Eq. 3.17)
        self._draws: dict[str, torch.Tensor] | None = None

    # ---- the model ------------------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_var = self.encoder(x).chunk(2, dim=-1)
        return mean, log_var.clamp(-12.0, 8.0)

    def decode(self, z: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Bernoulli logits. ``params=None``: the decoder's own weights, ``z`` (M, L). Else weight draws
        ``name → (N, ...)`` and ``z`` (N, M, L), all draws in one vmapped pass."""
        if params is None:
            return self.decoder(z)
        return vmap(lambda p, zz: functional_call(self.decoder, p, (zz,)))(params, z)

    def decoder_params(self) -> dict[str, torch.Tensor]:
        return dict(self.decoder.named_parameters())

    def log_terms(self, x: torch.Tensor, num_samples: int, params: dict[str, torch.Tensor] | None = None,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(log p(x|z,θ), log p(z), log q(z|x))`` for ``z ~ q(z|x)``, each (N, S, B) (N = 1 without ``params``)."""
        batch = x.shape[0]
        num_draws = 1 if params is None else next(iter(params.values())).shape[0]
        mean, log_var = self.encode(x)
        eps = torch.randn((num_draws, num_samples, *mean.shape), generator=generator,
                          device=mean.device if generator is None else "cpu").to(mean)
        z = mean + (0.5 * log_var).exp() * eps
        log_q = diagonal_gaussian_log_prob(z, mean, log_var)
        log_p = -0.5 * (LOG_2PI + z.pow(2)).sum(-1)
        flat_z = z.reshape(num_draws, num_samples * batch, -1)
        logits = self.decode(flat_z[0], None).unsqueeze(0) if params is None else self.decode(flat_z, params)
        target = x.unsqueeze(0).expand(num_draws * num_samples, *x.shape).reshape(logits.shape)
        log_px_z = -F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(2).sum(-1)
        return log_px_z.view(num_draws, num_samples, batch), log_p, log_q

    def negative_elbo(self, x: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``−L(x)`` of Eq. 3.1 per input, one latent sample (analytic KL to N(0, I))."""
        mean, log_var = self.encode(x)
        z = mean + (0.5 * log_var).exp() * torch.randn_like(mean)
        logits = self.decode(z) if params is None else self.decode(z.unsqueeze(0), params)[0]
        rec = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(-1)
        kl = 0.5 * (mean.pow(2) + log_var.exp() - 1.0 - log_var).sum(-1)
        return rec + kl

    # ---- posterior draws and scores -------------------------------------------------------------------------------
    def posterior_draws(self, num_draws: int, seed: int) -> dict[str, torch.Tensor]:
        """N decoder weight sets ``name → (N, ...)`` drawn with ``seed`` (the same seed gives the same draws)."""
        generator = torch.Generator().manual_seed(seed)
        mu = {k: v.detach() for k, v in self.decoder_params().items()}
        if self.hparams.posterior == "none":
            return {k: v.unsqueeze(0).expand(num_draws, *v.shape) for k, v in mu.items()}
        if self.hparams.posterior == "bbb":
            with torch.no_grad():
                return self.bbb.rsample(mu, num_draws, generator)
        return unflatten_draws(self.bank.sample(num_draws, generator).to(self.device), mu)

    def ensemble_log_likelihoods(self, x: torch.Tensor, seed: int | None = None):
        """``log p(x|θ_n)`` (N, B) by Eq. 3.3 with S importance samples for each of the N cached posterior draws,
        and the decoder terms ``log p(x|z_s, θ_n)`` (N, S, B) for the hole indicator."""
        hp = self.hparams
        seed = hp.eval_seed if seed is None else seed
        if self._draws is None:
            self._draws = self.posterior_draws(hp.num_draws, seed)
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.autocast(device_type=self.device.type, enabled=False):
            log_px_z, log_p, log_q = self.log_terms(x.float(), hp.num_importance, self._draws, generator)
        return importance_sampled_log_likelihood(log_px_z, log_p, log_q), log_px_z

    @torch.no_grad()
    def outlier_scores(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every OOD score of ``lit_robust.functional.ood_scores`` for a batch (higher = more likely OOD). The protocol that the
        ``OODDetection`` callback calls."""
        log_liks, log_px_z = self.ensemble_log_likelihoods(x)
        entropy = None if torch.isnan(self.model_entropy) else self.model_entropy
        return outlier_scores(log_liks, log_px_z, entropy)

    def restoration_gain(self, x: torch.Tensor, steps: int = 20, step_size: float = 0.3) -> torch.Tensor:
        """Algorithm 2 (ch. 5): SSIM gain between the input and its decoding after Langevin/HMC re-evaluation of the
        latent code vs. its plain reconstruction (decoder at its posterior mean). Large gain = an attack whose code
        can be restored; small gain on a flagged input = an outlier."""
        from lit_robust.functional.ood_adversarial import latent_langevin, restoration_gain

        mean, _ = self.encode(x)

        def log_joint(z: torch.Tensor) -> torch.Tensor:
            rec = F.binary_cross_entropy_with_logits(self.decode(z), x, reduction="none").flatten(1).sum(-1)
            return -rec - 0.5 * z.pow(2).sum(-1)

        generator = torch.Generator().manual_seed(self.hparams.eval_seed + 2)
        restored = latent_langevin(log_joint, mean, steps, step_size, generator)
        with torch.no_grad():
            return restoration_gain(x, torch.sigmoid(self.decode(mean)), torch.sigmoid(self.decode(restored)))

    def fit_outlier_scores(self, inlier_scores: dict[str, torch.Tensor]) -> None:
        """Set the typicality test's model entropy H (Eq. 3.17) to the mean negative expected log-likelihood of
        held-out inliers (the ``expected_ll`` score is that negative log-likelihood)."""
        self.model_entropy.fill_(inlier_scores["expected_ll"].mean().item())

    # ---- training -------------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """The training-set size N (weight prior scaling) from the dataset the DataModule's train loader reads."""
        dm = self.trainer.datamodule if self.trainer is not None else None
        if self.hparams.dataset_size is None and dm is not None and stage == "fit":
            self.hparams.dataset_size = len(dm.train_dataloader().dataset)

    def _dataset_size(self) -> int:
        if not self.hparams.dataset_size:
            raise RuntimeError("BayesianVAE needs the training-set size to scale the weight prior: pass "
                               "model.dataset_size or train with a datamodule")
        return int(self.hparams.dataset_size)

    def training_step(self, batch, batch_idx):
        x = batch[0]
        hp = self.hparams
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        if hp.posterior == "bbb":
            params = self.bbb.rsample(self.decoder_params(), 1)
            loss = self.negative_elbo(x, params).mean() + self.bbb.kl(self.decoder_params()) / self._dataset_size()
        else:
            loss = self.negative_elbo(x).mean()
            if hp.posterior == "sghmc":
                sq = sum(p.pow(2).sum() for p in self.decoder.parameters())
                loss = loss + 0.5 * self.precision * sq / self._dataset_size()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} at step {self.global_step}; "
                                     "lower model.lr / model.sghmc_lr")
        for opt in optimizers:
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in optimizers:
            opt.step()
        self._draws = None
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def on_train_epoch_end(self) -> None:
        hp = self.hparams
        if hp.posterior == "sghmc":
            self.precision.fill_(resample_precision(list(self.decoder.parameters()), hp.gamma_alpha,
                                                    hp.gamma_beta).item())
        if self.bank is not None:
            start = hp.collect_start
            if start is None:
                start = max(0, int(self.trainer.max_epochs) - hp.swag_rank * hp.collect_every)
            epoch = self.current_epoch
            if epoch >= start and (epoch - start) % hp.collect_every == 0:
                self.bank.collect(flatten_params(self.decoder_params()))
        self._draws = None

    def _evaluate(self, batch, split: str) -> None:
        self.log(f"{split}/loss", self.negative_elbo(batch[0]).mean(), sync_dist=True, prog_bar=split == "val")

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def on_load_checkpoint(self, checkpoint) -> None:
        self._draws = None

    def configure_optimizers(self):
        hp = self.hparams
        if hp.posterior != "sghmc":
            return torch.optim.Adam(self.parameters(), lr=hp.lr)
        decoder_ids = {id(p) for p in self.decoder.parameters()}
        rest = [p for p in self.parameters() if id(p) not in decoder_ids]
        return [torch.optim.Adam(rest, lr=hp.lr),
                ScaleAdaptedSGHMC(self.decoder.parameters(), lr=hp.sghmc_lr, mdecay=hp.sghmc_mdecay,
                                  num_burn_in_steps=hp.sghmc_burn_in_steps, scale_grad=float(self._dataset_size()))]
