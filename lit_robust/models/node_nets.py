"""One small MLP per variable, for many models at once: the sub-networks of SCNNs (thesis 000 §2.3) and the η
networks of causal structural hypothesis tests (ch. 4), vectorised over models so one process trains every
hypothesis, η and seed together (each model's parameters and Adam state are its own; the summed loss gives each its
own gradient)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

ACTIVATIONS = {"tanh": torch.tanh, "leaky_relu": nn.functional.leaky_relu}


class MaskedNodeNets(nn.Module):
    """``num_models`` × ``num_nodes`` MLPs [num_nodes, *hidden, 1]; node i of model m reads ``x ∘ masks[m, i]``.

    The mask multiplies the first layer's weights, so an input outside a node's mask has exactly zero gradient and
    no influence. Models of the same replica start from the same weights (``replica_of``): hypotheses or η values
    compared within a seed differ only by their structure or loss, not by their initialisation.
    """

    def __init__(self, masks: torch.Tensor, hidden: Sequence[int], replica_of: torch.Tensor, activation: str,
                 seed: int):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r}: use one of {sorted(ACTIVATIONS)}")
        self.activation = ACTIVATIONS[activation]
        self.register_buffer("masks", masks.float().contiguous())   # an expand()ed view cannot be loaded into
        num_nodes = masks.shape[-1]
        widths = [num_nodes, *hidden, 1]
        generator = torch.Generator().manual_seed(seed)
        replicas = int(replica_of.max()) + 1
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            bound = fan_in ** -0.5   # nn.Linear's default range
            weight = (torch.rand(replicas, num_nodes, fan_in, fan_out, generator=generator) * 2 - 1) * bound
            bias = (torch.rand(replicas, num_nodes, fan_out, generator=generator) * 2 - 1) * bound
            self.weights.append(nn.Parameter(weight[replica_of].clone()))
            self.biases.append(nn.Parameter(bias[replica_of].clone()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(M, B, D) predictions of every node of every model from ``x``: (B, D) shared, or (M, B, D) per model."""
        first = self.weights[0] * self.masks.unsqueeze(-1)
        pattern = "bj,mijk->mbik" if x.dim() == 2 else "mbj,mijk->mbik"
        hidden = torch.einsum(pattern, x, first) + self.biases[0].unsqueeze(1)
        for weight, bias in zip(self.weights[1:], self.biases[1:]):
            hidden = torch.einsum("mbik,mikl->mbil", self.activation(hidden), weight) + bias.unsqueeze(1)
        return hidden.squeeze(-1)
