"""Cheap victims for many targeted-poison trials on CPU: instead of training a network from scratch per trial
(the papers' protocol, which ``train.py experiment=gm_digits|bp_digits`` runs), continue from the attacker's clean
surrogate — the threat models of BP's transfer settings, and the fine-tuning victim of the specs' GM probe."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from lit_robust.models.classifier import ImageClassifier, train_on_tensors
from lit_robust.poisons.surrogate import penultimate_features

VICTIMS = ("linear", "finetune")


def linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, steps: int = 300,
                 lr: float = 0.05, weight_decay: float = 5e-4) -> torch.nn.Linear:
    """A new linear layer trained full-batch with Adam on frozen features (BP's linear-transfer victim)."""
    head = torch.nn.Linear(features.shape[1], num_classes)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        loss = F.cross_entropy(head(features), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return head


@torch.no_grad()
def _features(model: ImageClassifier, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    return torch.cat([penultimate_features(model, chunk) for chunk in images.split(batch_size)])


def victim_predictions(surrogate: ImageClassifier, train_images: torch.Tensor, train_labels: torch.Tensor,
                       eval_images: torch.Tensor, num_classes: int, mode: str = "linear", epochs: int = 1,
                       lr: float = 1e-3, generator: torch.Generator | None = None) -> torch.Tensor:
    """Train a victim from ``surrogate`` on the (poisoned) training set and return its predictions on
    ``eval_images``: ``linear`` = frozen features + new linear head; ``finetune`` = all weights trained ``epochs``."""
    if mode not in VICTIMS:
        raise ValueError(f"victim mode={mode!r}: use one of {VICTIMS}")
    model = copy.deepcopy(surrogate).eval()
    if mode == "linear":
        head = linear_probe(_features(model, train_images), train_labels, num_classes)
        with torch.no_grad():
            return head(_features(model, eval_images)).argmax(-1)
    for p in model.parameters():
        p.requires_grad_(True)
    model = train_on_tensors(train_images, train_labels, num_classes, epochs=epochs, lr=lr, generator=generator,
                            progress=False, model=model)
    with torch.no_grad():
        return model(eval_images).argmax(-1)
