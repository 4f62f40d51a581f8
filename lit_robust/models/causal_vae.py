"""CausalVAE with a latent causal layer, and its CCGM counterfactual variant (thesis 000 ch. 3.3.3 and 3.5, after
[YLC20]), on the Pendulum concepts (θ, sun, shadow length, shadow position).

Each concept owns ``concept_dim`` latent dimensions. CausalVAE (``ccgm=False``): the encoder gives the exogenous
noise ε, the causal layer solves the linear SCM z = Aᵀz + ε, i.e. z = (I − Aᵀ)⁻¹ε (Eq. 3.2), and the decoder sees the
non-linear mask layer's output z_i = g_i(A_i ∘ z) + ε_i (Eq. 3.3). Training loss (reference code, specs README):
Bernoulli reconstruction + 0.3·KL(q(ε|x) ‖ N(0, I)) + KL to the label-conditioned prior N(u_i, I) of each concept,
on z and on the decoder input (u the factors scaled to [−1, 1]) + the label loss ℓ_u (Eq. 3.4) + 3·h(A) + 0.5·h(A)²
with h the acyclicity of Eq. 3.6. CCGM (``ccgm=True``, Eqs. 3.9–3.11): no leakage; the encoder gives
z ~ N(0, I)-regularised, A = G + B with B = 1 on the diagonal of exogenous concepts, and the decoder sees
z'_i = g_i(A_i ∘ z) (parents read from z', so that interventions propagate); ``without_edges``
breaks links of G without retraining (the counterfactual model).

``fixed_dag=True`` fixes A (or G) to the true DAG θ → {length, position} ← sun. The augmented-Lagrangian schedule
of Eqs. 3.7–3.8 is replaced by the reference code's fixed weights (3, 0.5).
"""
from __future__ import annotations

from typing import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from lit_robust.models.deep_cama import kl_to_standard_normal, reparameterise

CONCEPTS = ("theta", "sun", "shadow_length", "shadow_position")
TRUE_EDGES = ((0, 2), (0, 3), (1, 2), (1, 3))
# The reference code's initial graph: pendulum → {light, length, position}, light → {length, position}.
REFERENCE_INIT_EDGES = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3))
# Factor ranges of the generation script's grid (specs README), mapped to [−1, 1].
FACTOR_LOW, FACTOR_HIGH = (-36.0, 54.0, 3.0, 2.0), (38.7, 132.3, 12.6, 19.6)


def acyclicity(adjacency: torch.Tensor) -> torch.Tensor:
    """Eq. 3.6: h(A) = tr[(I + A ∘ A)^n] − n, zero iff the weighted graph A is acyclic."""
    n = adjacency.shape[0]
    eye = torch.eye(n, device=adjacency.device, dtype=adjacency.dtype)
    return torch.trace(torch.linalg.matrix_power(eye + adjacency * adjacency, n)) - n


def linear_scm(adjacency: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Eq. 3.2 solved for z: z = (I − Aᵀ)⁻¹ ε, on (B, n, k) concept blocks."""
    n = adjacency.shape[0]
    eye = torch.eye(n, device=adjacency.device, dtype=adjacency.dtype)
    return torch.einsum("ij,bjk->bik", torch.linalg.inv(eye - adjacency.t()), noise)


def edges_matrix(n: int, edges: Sequence[Sequence[int]]) -> torch.Tensor:
    """An n×n 0/1 adjacency with A[parent, child] = 1."""
    matrix = torch.zeros(n, n)
    for parent, child in edges:
        matrix[parent, child] = 1.0
    return matrix


class ConceptMasks(nn.Module):
    """The non-linear masks g_i(A_i ∘ z) of Eq. 3.3, one small MLP per concept, run for all concepts at once:
    concept i reads the blocks z_j scaled by A[j, i] and returns a ``out_dim`` vector."""

    def __init__(self, concepts: int, in_dim: int, out_dim: int, hidden: int = 32):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(concepts, concepts * in_dim, hidden) / (concepts * in_dim) ** 0.5)
        self.b1 = nn.Parameter(torch.zeros(concepts, hidden))
        self.w2 = nn.Parameter(torch.randn(concepts, hidden, out_dim) / hidden ** 0.5)
        self.b2 = nn.Parameter(torch.zeros(concepts, out_dim))

    def forward(self, adjacency: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """(B, n, in_dim) → (B, n, out_dim); input i is A[:, i] ∘ z flattened."""
        return self.apply_masked(adjacency.t()[None, :, :, None] * z[:, None, :, :])   # (B, i, j, k)

    def apply_masked(self, masked: torch.Tensor) -> torch.Tensor:
        """g_i on precomputed inputs masked[b, i, j] = A[j, i]·(block j as concept i reads it)."""
        hidden = F.elu(torch.einsum("bif,ifh->bih", masked.flatten(2), self.w1) + self.b1)
        return torch.einsum("bih,iho->bio", hidden, self.w2) + self.b2


def conv_encoder(in_chans: int, img_size: int, out_features: int, width: int = 64) -> nn.Sequential:
    """Four stride-2 conv layers and a linear head."""
    layers, channels = [], in_chans
    for _ in range(4):
        layers += [nn.Conv2d(channels, width, 4, stride=2, padding=1), nn.ELU()]
        channels = width
    side = img_size // 16
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(width * side * side, 256), nn.ELU(),
                         nn.Linear(256, out_features))


class ConvDecoder(nn.Module):
    """Two dense layers (written as 1×1 convolutions) to (width, s/16, s/16), then four stride-2 deconvolutions to
    Bernoulli logits.

    With ``groups`` = n the input splits into n equal blocks, each decoded by its own network of ``width`` channels
    (grouped layers, one pass for all), and the n logit maps are averaged: the reference code's per-concept
    decoders (``decode_sep``), which make each concept's block draw its own part of the scene."""

    def __init__(self, in_features: int, in_chans: int, img_size: int, width: int = 64, groups: int = 1):
        super().__init__()
        if in_features % groups:
            raise ValueError(f"ConvDecoder: {in_features} input features do not split into {groups} equal blocks")
        self.side, self.width, self.groups, self.in_chans = img_size // 16, width, groups, in_chans
        g = groups
        self.project = nn.Sequential(nn.Conv2d(in_features, g * 256, 1, groups=g), nn.ELU(),
                                     nn.Conv2d(g * 256, g * width * self.side ** 2, 1, groups=g), nn.ELU())
        layers = []
        for i in range(4):
            layers.append(nn.ConvTranspose2d(g * width, g * (in_chans if i == 3 else width), 4, stride=2, padding=1,
                                             groups=g))
            if i < 3:
                layers.append(nn.ELU())
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        hidden = self.project(z.flatten(1)[:, :, None, None])
        logits = self.net(hidden.view(-1, self.groups * self.width, self.side, self.side))
        return logits.unflatten(1, (self.groups, self.in_chans)).mean(1)


class CausalVAE(L.LightningModule):
    """CausalVAE / CCGM on images with concept labels as targets (``PendulumDataModule`` items ``(image, factors)``).

    Args:
        concept_dim: latent dimensions per concept (reference: 4).
        fixed_dag: fix A (CCGM: G) to the true DAG instead of learning it.
        ccgm: the counterfactual variant of ch. 3.5 (no leakage, A = G + B).
        exogenous: indices of exogenous concepts (B of Eq. 3.10; θ and the sun).
        factor_low, factor_high: factor ranges mapped to [−1, 1] for the label-conditioned prior.
        per_concept_decoders: one decoder per concept block (32 channels each), logits averaged, as the reference
            code's ``decode_sep``; otherwise one joint decoder (64 channels) over all blocks.
    """

    def __init__(self, in_chans: int = 3, img_size: int = 64, concept_dim: int = 4,
                 concepts: Sequence[str] = CONCEPTS, fixed_dag: bool = False, ccgm: bool = False,
                 exogenous: Sequence[int] = (0, 1), factor_low: Sequence[float] = FACTOR_LOW,
                 factor_high: Sequence[float] = FACTOR_HIGH, kl_weight: float = 0.3, label_weight: float = 1.0,
                 dag_weights: Sequence[float] = (3.0, 0.5), per_concept_decoders: bool = True, lr: float = 1e-3):
        super().__init__()
        if img_size % 16:
            raise ValueError(f"model.img_size={img_size}: use a multiple of 16 (e.g. data.img_size=32 or 64)")
        if not (len(factor_low) == len(factor_high) == len(concepts)):
            raise ValueError(f"factor_low/high need one value per concept {list(concepts)}")
        self.save_hyperparameters()
        n, k = len(concepts), concept_dim
        self.encoder = conv_encoder(in_chans, img_size, 2 * n * k)
        self.decoder = ConvDecoder(n * k, in_chans, img_size, **({"width": 32, "groups": n} if per_concept_decoders
                                                                  else {}))
        self.masks = ConceptMasks(n, k, k)
        self.label_masks = ConceptMasks(n, 1, 1)
        true_dag = edges_matrix(n, TRUE_EDGES)
        self.register_buffer("true_dag", true_dag)
        self.register_buffer("exogenous_diag", torch.diag(torch.tensor(
            [1.0 if i in exogenous else 0.0 for i in range(n)])))
        self.register_buffer("off_diagonal", 1.0 - torch.eye(n))
        self.register_buffer("low", torch.tensor(factor_low))
        self.register_buffer("high", torch.tensor(factor_high))
        self.register_buffer("cut", torch.ones(n, n))      # CCGM counterfactual links (1 kept, 0 broken)
        init = true_dag if ccgm else edges_matrix(n, REFERENCE_INIT_EDGES)
        self.dag_param = None if fixed_dag else nn.Parameter(init.clone())

    # -- graph -----------------------------------------------------------------------------------------------------
    def dag(self) -> torch.Tensor:
        """The DAG part: A for CausalVAE, G for CCGM (learned, or the true DAG), without self-loops."""
        graph = self.true_dag if self.dag_param is None else self.dag_param
        return graph * self.off_diagonal * self.cut

    def adjacency(self) -> torch.Tensor:
        """A (CausalVAE) or A = G + B (CCGM, Eq. 3.10)."""
        return self.dag() + self.exogenous_diag if self.hparams.ccgm else self.dag()

    def without_edges(self, edges: Sequence[Sequence[int]]) -> "CausalVAE":
        """CCGM's counterfactual model: a copy with the links parent → child broken, no retraining (§3.5.2)."""
        model = type(self)(**self.hparams).to(self.device)
        model.load_state_dict(self.state_dict())
        for parent, child in edges:
            model.cut[parent, child] = 0.0
        return model

    def normalise(self, factors: torch.Tensor) -> torch.Tensor:
        return 2 * (factors - self.low) / (self.high - self.low) - 1

    def concept_index(self, factor: str | int) -> int:
        names = list(self.hparams.concepts)
        if isinstance(factor, int):
            return factor
        if factor not in names:
            raise ValueError(f"unknown factor {factor!r}: use one of {names}")
        return names.index(factor)

    # -- latent layer ----------------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, k = len(self.hparams.concepts), self.hparams.concept_dim
        mean, logvar = self.encoder(x).view(-1, n, 2 * k).chunk(2, dim=-1)
        return mean, logvar.clamp(-8.0, 4.0)   # an unbounded log-variance overflowed exp() within 7 epochs

    def causal_latents(self, noise: torch.Tensor, clamp: dict[int, torch.Tensor] | None = None):
        """(z, decoder input) from the encoder's sample, with ``clamp`` = {concept: (B, k) value} interventions.

        CausalVAE: z solves z = Aᵀz + ε (Eq. 3.2) with the clamped blocks held fixed (n passes reach the fixed
        point on a DAG); the decoder input is g_i(A_i ∘ z) + ε_i (Eq. 3.3), where an intervened block's ε_i is the
        one its clamped value implies, z_i − (Aᵀz)_i, so that the decoder sees its input in the form it was
        trained on (replacing the whole input by the value drops g_i's offset and draws the wrong concept).
        CCGM: z' = g_i(G_i ∘ z' + B_i ∘ z) (Eq. 3.11), parents read from z', clamped blocks held fixed.
        """
        clamp = clamp or {}
        n = noise.shape[1]

        def hold(z):
            for i, value in clamp.items():
                z = z.clone()
                z[:, i] = value
            return z

        if not self.hparams.ccgm:
            graph = self.dag()
            if not clamp:
                z = linear_scm(graph, noise)
                return z, self.masks(graph, z) + noise
            z = hold(noise)
            for _ in range(n):
                z = hold(torch.einsum("ji,bjk->bik", graph, z) + noise)
            parents = torch.einsum("ji,bjk->bik", graph, z)
            exogenous = noise.clone()
            for i in clamp:
                exogenous[:, i] = z[:, i] - parents[:, i]
            return z, self.masks(graph, z) + exogenous
        graph, diag = self.dag(), self.exogenous_diag
        z_out = hold(torch.zeros_like(noise))
        for _ in range(n):
            masked = graph.t()[None, :, :, None] * z_out[:, None] + diag.t()[None, :, :, None] * noise[:, None]
            z_out = hold(self.masks.apply_masked(masked))
        return noise, z_out

    def intervene(self, x: torch.Tensor, factor: str | int, value: float) -> torch.Tensor:
        """The counterfactual image of do(factor = value) (value in the factor's units): encode (posterior mean),
        clamp the concept's latent block to the normalised value, recompute its descendants only, decode."""
        i = self.concept_index(factor)
        mean, _ = self.encode(x)
        scaled = 2 * (value - self.low[i]) / (self.high[i] - self.low[i]) - 1
        block = torch.full_like(mean[:, i], float(scaled))
        _, decoder_input = self.causal_latents(mean, {i: block})
        return torch.sigmoid(self.decoder(decoder_input))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        mean, _ = self.encode(x)
        return torch.sigmoid(self.decoder(self.causal_latents(mean)[1]))

    # -- losses ----------------------------------------------------------------------------------------------------
    def label_loss(self, labels: torch.Tensor) -> torch.Tensor:
        """Eq. 3.4: Σ_i ‖u_i − f_i(A_i ∘ u)‖² on the normalised labels (CCGM: only concepts with parents)."""
        u = labels.unsqueeze(-1)
        residual = (u - self.label_masks(self.dag(), u)).squeeze(-1) ** 2
        if self.hparams.ccgm:
            residual = residual * (1 - self.exogenous_diag.diagonal())
        return residual.sum(-1).mean()

    def losses(self, x: torch.Tensor, factors: torch.Tensor) -> dict[str, torch.Tensor]:
        u = self.normalise(factors)
        mean, logvar = self.encode(x)
        noise = reparameterise(mean, logvar)
        z, decoder_input = self.causal_latents(noise)
        logits = self.decoder(decoder_input)
        recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(-1).mean()
        kl = kl_to_standard_normal(mean.flatten(1), logvar.flatten(1)).mean()
        # KL(N(c_i, σ²) ‖ N(u_i, I)) up to the σ² terms already in ``kl``: the label-conditioned prior, on the causal
        # layer's z and (as the reference code's mask KL) on the decoder input, so that the decoder reads each
        # concept from its own block; without the second term it drew the rod from the shadow blocks and do(θ)
        # barely moved it. CCGM's decoder input is its concept latent.
        concepts = [decoder_input] if self.hparams.ccgm else [linear_scm(self.dag(), mean), decoder_input]
        prior = sum(0.5 * ((c - u.unsqueeze(-1)) ** 2).sum((1, 2)).mean() for c in concepts)
        h = acyclicity(self.dag())
        out = {"recon": recon, "kl": kl, "label_prior": prior, "label": self.label_loss(u), "h": h}
        out["loss"] = (recon + self.hparams.kl_weight * kl + prior + self.hparams.label_weight * out["label"]
                       + self.hparams.dag_weights[0] * h + self.hparams.dag_weights[1] * h ** 2)
        return out

    # -- Lightning -------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reconstruct(x)

    def training_step(self, batch, batch_idx):
        out = self.losses(batch[0], batch[1])
        if not torch.isfinite(out["loss"]):
            raise FloatingPointError(f"CausalVAE loss became {out['loss'].item()}; lower model.lr")
        self.log_dict({f"train/{k}": v for k, v in out.items()}, prog_bar=False)
        return out["loss"]

    def validation_step(self, batch, batch_idx):
        out = self.losses(batch[0], batch[1])
        self.log("val/loss", out["loss"], prog_bar=True, sync_dist=True)
        self.log("val/recon", out["recon"], sync_dist=True)

    def test_step(self, batch, batch_idx):
        out = self.losses(batch[0], batch[1])
        self.log("test/loss", out["loss"], sync_dist=True)
        self.log("test/recon", out["recon"], sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
