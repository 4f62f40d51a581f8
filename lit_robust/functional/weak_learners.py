"""Many small classifiers trained at once: the weak learners of the backdoor-filtering paper (seed 003, §4.2, §5).

ISPL (Algorithm 2) and boosting over homogeneous sets (Algorithm 1) train dozens of independent models, each on its
own subset of the training set. Here they are one ``EnsembleMLP`` whose parameters carry a leading *member* axis, so
every member's forward and backward pass is one batched matrix product (``torch.baddbmm``) rather than a Python loop
over models. Members never share gradients: the loss is the sum of the members' mean losses.

Deviation from the paper: the paper's weak learners are PreActResNet-18s trained 40 epochs with SGD. On the 2-core CPU
this project targets, 24 ResNets × 40 epochs (plus the ISPL rounds) would take hours, so the weak learners default to
a one-hidden-layer MLP on the flattened pixels, trained with Adam. A dirty-label trigger is a fixed pixel pattern, which
such a learner picks up as readily as a CNN does, and "weak" is all the theory asks of it (Property 4.7).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class EnsembleMLP(nn.Module):
    """``members`` independent MLPs (inputs → hidden ReLU → classes) evaluated as one batched product.

    ``forward(x)`` takes ``x`` of shape (members, batch, in_features) and returns logits (members, batch, classes);
    ``features(x)`` returns the hidden activations, the representation the spectral-signature and activation-clustering
    baselines analyse. Initialisation matches ``nn.Linear`` member by member.
    """

    def __init__(self, members: int, in_features: int, num_classes: int, hidden: int = 256):
        super().__init__()
        if members < 1 or in_features < 1 or num_classes < 2 or hidden < 1:
            raise ValueError(f"EnsembleMLP(members={members}, in_features={in_features}, num_classes={num_classes}, "
                             f"hidden={hidden}): need members, in_features, hidden ≥ 1 and num_classes ≥ 2")
        self.members, self.in_features, self.num_classes, self.hidden = members, in_features, num_classes, hidden
        bound1, bound2 = 1.0 / math.sqrt(in_features), 1.0 / math.sqrt(hidden)
        self.w1 = nn.Parameter(torch.empty(members, in_features, hidden).uniform_(-bound1, bound1))
        self.b1 = nn.Parameter(torch.empty(members, 1, hidden).uniform_(-bound1, bound1))
        self.w2 = nn.Parameter(torch.empty(members, hidden, num_classes).uniform_(-bound2, bound2))
        self.b2 = nn.Parameter(torch.empty(members, 1, num_classes).uniform_(-bound2, bound2))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(torch.baddbmm(self.b1, x, self.w1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.b2, self.features(x), self.w2)


def flatten_images(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) images in [0, 1] → (N, C·H·W) inputs centred at 0 (the MLP's input)."""
    return images.flatten(1).float() * 2.0 - 1.0


def index_sets(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean membership masks (members, n) → padded index sets (members, max size) and their sizes (members,).

    Padding repeats index 0 and is never read by ``fit_members`` (positions wrap modulo each member's size).
    """
    sizes = masks.sum(1)
    if bool((sizes == 0).any()):
        raise ValueError(f"a member has an empty training set (sizes {sizes.tolist()}); every subset needs ≥ 1 sample")
    order = torch.argsort((~masks).to(torch.int8), dim=1, stable=True)  # members' own indices first, ascending
    return order[:, : int(sizes.max())], sizes


def _autocast(device: torch.device):
    """bf16 autocast on CUDA only: on CPU, bf16 matmuls are slower than fp32 on most hosts."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def fit_members(model: EnsembleMLP, inputs: torch.Tensor, labels: torch.Tensor, sets: torch.Tensor,
                sizes: torch.Tensor | None = None, epochs: int = 4, batch_size: int = 64, lr: float = 1e-3,
                weight_decay: float = 0.0, generator: torch.Generator | None = None) -> EnsembleMLP:
    """Train member ``e`` on ``inputs[sets[e, :sizes[e]]]`` for ``epochs`` passes (the procedure A of Algorithm 2).

    Every epoch draws a fresh random order of each member's own set; a member with a smaller set than the largest
    wraps around its order, so it sees at least ``epochs`` passes. All members step together (one Adam optimiser over
    the stacked parameters; Adam is element-wise, so members stay independent).
    """
    members, max_size = sets.shape
    if members != model.members:
        raise ValueError(f"{members} index sets for an ensemble of {model.members} members")
    sizes = torch.full((members,), max_size, device=sets.device) if sizes is None else sizes.to(sets.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(max_size / batch_size)
    padding = torch.arange(max_size, device=sets.device)[None] >= sizes[:, None]
    model.train()
    for _ in range(epochs):
        keys = torch.rand(members, max_size, generator=generator, device=sets.device).masked_fill_(padding, 2.0)
        order = sets.gather(1, torch.argsort(keys, dim=1))
        for step in range(steps_per_epoch):
            positions = torch.arange(step * batch_size, min((step + 1) * batch_size, max_size), device=sets.device)
            batch = order.gather(1, positions[None] % sizes[:, None])  # (members, b)
            with _autocast(inputs.device):
                logits = model(inputs[batch])
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels[batch].flatten(), reduction="none")
            optimizer.zero_grad(set_to_none=True)
            loss.view(members, -1).mean(1).sum().backward()
            optimizer.step()
    return model


@torch.no_grad()
def member_logits(model: EnsembleMLP, inputs: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
    """Every member's logits on every input: (members, n, classes)."""
    model.eval()
    chunks = []
    for start in range(0, len(inputs), batch_size):
        x = inputs[start:start + batch_size]
        with _autocast(inputs.device):
            chunks.append(model(x.expand(model.members, *x.shape)).float())
    return torch.cat(chunks, dim=1)


def member_losses(model: EnsembleMLP, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy of every member on every sample: (members, n) — R_emp of Algorithm 2, line 6."""
    logits = member_logits(model, inputs)
    return F.cross_entropy(logits.flatten(0, 1), labels.repeat(model.members), reduction="none").view(model.members, -1)


@torch.no_grad()
def member_features(model: EnsembleMLP, inputs: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
    """Hidden activations of every member on every input: (members, n, hidden)."""
    model.eval()
    return torch.cat([model.features(inputs[s:s + batch_size].expand(model.members, -1, -1))
                      for s in range(0, len(inputs), batch_size)], dim=1)
