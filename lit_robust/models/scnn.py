"""Structural causal neural networks (thesis 000 §2.3): one sub-network per endogenous node, fed its parents,
chained along the DAG from the input nodes to the target, trained on (1 − η)·L_global + η·L_local (Eq. 2.10).

L_global is the target's MSE when every endogenous node is the sub-networks' chained prediction from the inputs;
L_local sums each endogenous node's MSE predicted from its *observed* parents. One module trains every η of
``etas`` × ``replicas`` seeds at once (:class:`MaskedNodeNets`), so an η sweep is one fit.
"""
from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch

from lit_robust.functional.causal_structure import adjacency_from, mixed_loss, topological_levels
from lit_robust.functional.structural_equations import scnn_verification_grid
from lit_robust.models.node_nets import MaskedNodeNets


class SCNN(L.LightningModule):
    """An SCNN over ``nodes`` with the DAG ``edges`` (``[[parent, child], ...]`` or an adjacency matrix).

    ``inputs`` are the nodes fed from the data when chaining (the exogenous C, T of the exam model); every other
    node is predicted. ``ground_truth`` (``'linear'`` / ``'nonlinear'``) names the exam SEM whose noise-free
    equations give Eq. 2.11's per-node ground-truth errors at test.
    """

    def __init__(self, nodes: Sequence[str], edges, inputs: Sequence[str], target: str,
                 etas: Sequence[float] = (0.0,), replicas: int = 1, hidden: Sequence[int] = (16,),
                 activation: str = "tanh", lr: float = 3e-3, ground_truth: str | None = None, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        nodes = list(nodes)
        missing = [name for name in [*inputs, target] if name not in nodes]
        if missing:
            raise ValueError(f"inputs/target {missing} are not among nodes {nodes}: name nodes of the DAG")
        if not all(0 <= eta <= 1 for eta in etas):
            raise ValueError(f"etas={list(etas)}: η weighs the local loss and lies in [0, 1]")
        adjacency = adjacency_from(nodes, edges)
        self.levels = topological_levels(adjacency)
        self.input_index = [nodes.index(name) for name in inputs]
        self.target_index = nodes.index(target)
        self.endogenous = [i for i in range(len(nodes)) if i not in self.input_index]
        self.register_buffer("etas", torch.tensor(list(etas), dtype=torch.float32).repeat_interleave(replicas))
        models = len(self.etas)
        self.nets = MaskedNodeNets(adjacency.T.expand(models, -1, -1), hidden,
                                   torch.arange(replicas).repeat(len(etas)), activation, seed)

    def chained(self, inputs_from: torch.Tensor) -> torch.Tensor:
        """(M, B, D): every endogenous node predicted from the sub-networks along the DAG, only the input nodes read
        from ``inputs_from`` (B, D); the other columns are zeroed first so nothing else can leak in."""
        keep = torch.zeros(inputs_from.shape[-1], device=inputs_from.device)
        keep[self.input_index] = 1
        values = (inputs_from * keep).expand(len(self.etas), -1, -1)
        for level in self.levels:
            predicted = [i for i in level if i not in self.input_index]
            if predicted:
                update = torch.zeros_like(keep)
                update[predicted] = 1
                values = values * (1 - update) + self.nets(values) * update
        return values

    def losses(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_global, L_local), each (M,): the target's chained MSE, and the summed MSE of every endogenous node
        predicted from its observed parents."""
        global_loss = (self.chained(rows)[..., self.target_index] - rows[:, self.target_index]).pow(2).mean(-1)
        local = (self.nets(rows) - rows).pow(2).mean(1)
        return global_loss, local[:, self.endogenous].sum(-1)

    def training_loss(self, rows: torch.Tensor) -> torch.Tensor:
        """Every model's Eq. 2.10 mix at its own η, summed: each model's parameters get their own gradient."""
        return mixed_loss(*self.losses(rows), self.etas).sum()

    def training_step(self, batch, batch_idx):
        loss = self.training_loss(batch[0])
        self.log("train/loss", loss / len(self.etas), prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.losses(batch[0])[0].mean(), prog_bar=True)

    def test_step(self, batch, batch_idx):
        global_loss = self.losses(batch[0])[0]
        self.log("test/loss", global_loss.mean())
        for eta, value in self.per_eta(global_loss).items():
            self.log(f"test/y_mse/eta{eta:g}", value)

    def on_test_epoch_end(self) -> None:
        if self.hparams.ground_truth is None:
            return
        errors = self.ground_truth_errors()
        for position, node in enumerate(self.endogenous):
            for eta, value in self.per_eta(errors[:, position]).items():
                self.log(f"test/gt/{self.hparams.nodes[node]}/eta{eta:g}", value)

    @torch.no_grad()
    def ground_truth_errors(self) -> torch.Tensor:
        """(M, endogenous nodes): each node's chained prediction's MSE against the noise-free equations on the
        verification grid (Eq. 2.11, per node; their sum is the thesis' L^GT)."""
        truth = scnn_verification_grid(self.hparams.ground_truth).to(self.device)
        return (self.chained(truth) - truth).pow(2).mean(1)[:, self.endogenous]

    def per_eta(self, values: torch.Tensor) -> dict[float, torch.Tensor]:
        """Per-model ``values`` (M,) averaged over the replicas of each η."""
        etas = self.hparams.etas
        return {eta: row.mean() for eta, row in zip(etas, values.view(len(etas), -1))}

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, self.trainer.max_epochs))
        return [optimizer], [schedule]
