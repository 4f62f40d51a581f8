"""The attacker's own models: a plain training loop for surrogates and feature extractors (no Lightning — crafting
is a pure function of data and seed, run once and cached), and the feature map the collision attacks read."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lit_robust.augment import random_shift
from lit_robust.classifier import ImageClassifier


def train_surrogate(images: torch.Tensor, labels: torch.Tensor, num_classes: int, *, backbone: str = "small_cnn",
                    epochs: int = 10, lr: float = 2e-3, weight_decay: float = 5e-4, batch_size: int = 128,
                    max_shift: int = 2, generator: torch.Generator, progress: bool = True,
                    desc: str = "surrogate", model: ImageClassifier | None = None) -> ImageClassifier:
    """Train (or continue training ``model``) with AdamW + cross-entropy on [0, 1] images; returns it in eval mode.

    The victim's recipe (``ImageClassifier`` with the same normalisation and random-shift augmentation), so the
    surrogate is a grey-box stand-in for the victim as in Witches' Brew §4 and Narcissus §3.
    """
    if model is None:
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        model = ImageClassifier(backbone=backbone, num_classes=num_classes, in_chans=images.shape[1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, -(-len(images) // batch_size))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    model.train()
    bar = tqdm(total=epochs * steps_per_epoch, desc=desc, disable=not progress, leave=False)
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for batch in order.split(batch_size):
            x = random_shift(images[batch], max_shift, generator=generator)
            loss = F.cross_entropy(model(x), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return model.eval()


def penultimate_features(model: ImageClassifier, images: torch.Tensor) -> torch.Tensor:
    """The input to the classifier's last linear layer (the feature space of Bullseye Polytope's linear transfer)."""
    net = model.net
    normalised = (images - model.mean) / model.std
    if hasattr(net, "forward_head"):  # timm models
        return net.forward_head(net.forward_features(normalised), pre_logits=True)
    return net.forward_features(normalised)


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Class predictions of a model in eval mode, batched."""
    model.eval()
    return torch.cat([model(chunk).argmax(-1) for chunk in images.split(batch_size)])
