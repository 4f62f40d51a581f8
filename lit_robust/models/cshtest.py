"""Causal structural hypothesis testing (thesis 000 ch. 4, App. B): every hypothesis is a structural prior
S = G + B (Eq. 4.1) whose row i selects the inputs of variable i's η network, x̂ᵢ = ηᵢ(Sᵢ ∘ x) (Eq. 4.2), trained on
‖x − x̂‖² (Eq. 4.3); hypotheses are ranked by that loss on held-out, deliberately out-of-distribution data.

CSVHTEST (App. B, 2137–2151) puts the same η networks between per-variable encoders and decoders:
zᵢ = f_enc(xᵢ), ẑᵢ = ηᵢ(Sᵢ ∘ z), x̂ᵢ = f_dec(ẑᵢ), trained on MSE + λ_KL·KL(q(z) ‖ N(0, 1)) + λ_latent·‖z − ẑ‖².

All hypotheses × ``replicas`` seeds train in one module (:class:`MaskedNodeNets`); replicas of different
hypotheses start from the same weights, so within a seed only the structure differs.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

import lightning as L
import torch

from lit_robust.functional.causal_structure import adjacency_from, structural_prior
from lit_robust.models.deep_cama import kl_to_standard_normal, mlp, reparameterise
from lit_robust.models.node_nets import MaskedNodeNets


class ReconstructionModels(L.LightningModule):
    """Lightning plumbing shared by models ranked by reconstruction loss: ``names`` (one per model group),
    ``per_model_loss`` (M,) group-major, ``training_loss`` summed over models; tests log each group's mean."""

    names: list[str]

    def per_model_loss(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def training_loss(self, rows: torch.Tensor) -> torch.Tensor:
        return self.per_model_loss(rows).sum()

    def training_step(self, batch, batch_idx):
        loss = self.training_loss(batch[0])
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.per_model_loss(batch[0]).mean(), prog_bar=True)

    def test_step(self, batch, batch_idx):
        per_group = self.per_model_loss(batch[0]).view(len(self.names), -1).mean(1)
        self.log("test/loss", per_group.mean())
        for name, value in zip(self.names, per_group):
            self.log(f"test/loss/{name}", value)

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, self.trainer.max_epochs))
        return [optimizer], [schedule]


class CSHTest(ReconstructionModels):
    """Hypotheses ``{name: edges}`` over ``nodes`` (edges ``[[parent, child], ...]`` or an adjacency matrix), each
    with the exogenous variables ``exogenous`` (B's diagonal: they are reconstructed from themselves)."""

    def __init__(self, nodes: Sequence[str], hypotheses: Mapping[str, object], exogenous: Sequence[str],
                 replicas: int = 1, hidden: Sequence[int] = (16, 16), activation: str = "leaky_relu",
                 lr: float = 1e-2, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        nodes = list(nodes)
        unknown = [name for name in exogenous if name not in nodes]
        if unknown or not hypotheses:
            raise ValueError(f"exogenous {unknown} are not among nodes {nodes}" if unknown else
                             "hypotheses is empty: give at least one {name: [[parent, child], ...]}")
        self.names = list(hypotheses)
        exogenous_mask = torch.tensor([float(name in exogenous) for name in nodes])
        priors = torch.stack([structural_prior(adjacency_from(nodes, edges), exogenous_mask)
                              for edges in hypotheses.values()])
        self.register_buffer("priors", priors)
        masks = priors.repeat_interleave(replicas, dim=0)
        self.replica_of = torch.arange(replicas).repeat(len(self.names))
        self.nets = MaskedNodeNets(masks, hidden, self.replica_of, activation, seed)

    def reconstruction(self, rows: torch.Tensor) -> torch.Tensor:
        """(M, B, D) x̂ of every model (Eq. 4.2); models are hypothesis-major."""
        return self.nets(rows)

    def per_model_loss(self, rows: torch.Tensor) -> torch.Tensor:
        """(M,) ‖x − x̂‖² per model (Eq. 4.3, the mean over rows and variables)."""
        return (self.reconstruction(rows) - rows).pow(2).mean((1, 2))

    def generate(self, rows: torch.Tensor, noise: torch.Tensor,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """(M, B, D) rows generated through every model's η networks, CCGM's use of its causal layer as a generator
        (thesis 000 §3.6.4): exogenous columns are taken from ``rows`` (B, D); every other column is ηᵢ(Sᵢ ∘ x) plus
        its ``noise`` ((B, D) or (M, B, D), e.g. resampled residuals), children computed from generated parents.
        ``transform`` maps the generated rows before their children read them (a binary treatment from a
        continuous score); D passes settle any DAG of D nodes."""
        exogenous = self.nets.masks.diagonal(dim1=-2, dim2=-1).bool().unsqueeze(1)       # (M, 1, D)
        generated = rows.expand(len(self.replica_of), -1, -1)
        for _ in range(rows.shape[-1]):
            generated = torch.where(exogenous, generated, self.nets(generated) + noise)
            generated = transform(generated) if transform is not None else generated
        return generated

    def without_edges(self, edges: Sequence[Sequence[str]]) -> "CSHTest":
        """The counterfactual model of CCGM (thesis 000 §3.5.2): a copy whose η networks no longer read the given
        parents — each ``[parent, child]`` link cut in every hypothesis, no retraining."""
        model = copy.deepcopy(self)
        nodes = list(self.hparams.nodes)
        for parent, child in edges:
            model.nets.masks[:, nodes.index(child), nodes.index(parent)] = 0.0
        return model


class CSVHTest(CSHTest):
    """CSHTEST between per-variable variational encoders and decoders [1, *coder_hidden, 1]: the η networks act on
    the latents; ``kl_weight`` and ``latent_weight`` are the thesis' unstated λs."""

    def __init__(self, nodes: Sequence[str], hypotheses: Mapping[str, object], exogenous: Sequence[str],
                 replicas: int = 1, hidden: Sequence[int] = (16, 16), activation: str = "leaky_relu",
                 lr: float = 1e-2, seed: int = 0, coder_hidden: Sequence[int] = (4, 4), kl_weight: float = 1e-3,
                 latent_weight: float = 1.0):
        super().__init__(nodes, hypotheses, exogenous, replicas, hidden, activation, lr, seed)
        own_column = torch.eye(len(nodes)).expand(len(self.replica_of), -1, -1)
        self.encoder = MaskedNodeNets(own_column, coder_hidden, self.replica_of, activation, seed + 1)
        self.decoder = MaskedNodeNets(own_column, coder_hidden, self.replica_of, activation, seed + 2)
        self.log_var = torch.nn.Parameter(torch.full((len(self.replica_of), 1, len(nodes)), -4.0))

    def reconstruct(self, rows: torch.Tensor, sample: bool) -> tuple[torch.Tensor, ...]:
        """(x̂, z, ẑ, μ) per model: z drawn around μ = f_enc(x) when ``sample``, else μ itself."""
        mean = self.encoder(rows)
        latent = reparameterise(mean, self.log_var.expand_as(mean)) if sample else mean
        predicted = self.nets(latent)
        return self.decoder(predicted), latent, predicted, mean

    def reconstruction(self, rows: torch.Tensor) -> torch.Tensor:
        return self.reconstruct(rows, sample=False)[0]

    def training_loss(self, rows: torch.Tensor) -> torch.Tensor:
        reconstruction, latent, predicted, mean = self.reconstruct(rows, sample=True)
        kl = kl_to_standard_normal(mean, self.log_var.expand_as(mean))
        loss = (reconstruction - rows).pow(2).mean((1, 2)) + self.hparams.kl_weight * kl.mean(1) \
            + self.hparams.latent_weight * (latent - predicted).pow(2).mean((1, 2))
        return loss.sum()


class BottleneckAutoencoder(ReconstructionModels):
    """The "similarly sized" NN / VAE baselines of Table 4.1, whose inputs the thesis does not define; ours: an
    autoencoder of all variables through a ``bottleneck``-wide code, [D, *hidden, bottleneck, *hidden reversed, D]
    (``variational``: a Gaussian code with an N(0, I) prior, KL weighted ``kl_weight``), ``replicas`` seeds at once.
    With the bottleneck as wide as the exogenous variables it can learn the true mechanism, or any other."""

    def __init__(self, num_variables: int, bottleneck: int = 2, hidden: Sequence[int] = (16,),
                 variational: bool = False, kl_weight: float = 1e-3, replicas: int = 1, lr: float = 1e-2,
                 seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.names = ["vae" if variational else "autoencoder"]
        code = 2 * bottleneck if variational else bottleneck
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.encoders = torch.nn.ModuleList(mlp([num_variables, *hidden, code], last_activation=False)
                                                for _ in range(replicas))
            self.decoders = torch.nn.ModuleList(mlp([bottleneck, *reversed(hidden), num_variables],
                                                    last_activation=False) for _ in range(replicas))

    def reconstruct(self, rows: torch.Tensor, sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(R, B, D) reconstructions and (R, B) KL terms (zero without ``variational``)."""
        outputs, kls = [], []
        for encoder, decoder in zip(self.encoders, self.decoders):
            code = encoder(rows)
            kl = torch.zeros(len(rows), device=rows.device)
            if self.hparams.variational:
                mean, log_var = code.chunk(2, dim=-1)
                code = reparameterise(mean, log_var) if sample else mean
                kl = kl_to_standard_normal(mean, log_var)
            outputs.append(decoder(code))
            kls.append(kl)
        return torch.stack(outputs), torch.stack(kls)

    def per_model_loss(self, rows: torch.Tensor) -> torch.Tensor:
        return (self.reconstruct(rows, sample=False)[0] - rows).pow(2).mean((1, 2))

    def training_loss(self, rows: torch.Tensor) -> torch.Tensor:
        reconstruction, kl = self.reconstruct(rows, sample=True)
        return ((reconstruction - rows).pow(2).mean((1, 2)) + self.hparams.kl_weight * kl.mean(1)).sum()
