"""The attacker's own models: surrogates and feature extractors trained by ``train_on_tensors`` (no Lightning —
crafting is a pure function of data and seed, run once and cached), and the feature map the collision attacks read."""
from __future__ import annotations

import inspect
from pathlib import Path

import torch

from lit_robust.models.classifier import ImageClassifier, train_on_tensors
from lit_robust.storage.cache import fingerprint, load_verified, save_atomic
from lit_robust.storage.serialization import load_plain

# train_on_tensors' recipe (lr, weight decay, batch size, augmentation, schedule): part of every surrogate's cache key
RECIPE = {name: p.default for name, p in inspect.signature(train_on_tensors).parameters.items()
          if p.default is not p.empty and name not in ("progress", "desc", "model")}


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


def load_or_train_surrogate(path: str | None, images: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
                            backbone: str = "small_cnn", epochs: int = 10, seed: int = 0, progress: bool = True,
                            desc: str = "surrogate") -> ImageClassifier:
    """The attacker's surrogate trained on clean data with its own ``seed``, so many trials share one surrogate.

    ``path`` names the cache: the surrogate lives in ``<stem>-<key>.pt`` beside it, ``key`` a fingerprint of
    everything that determines it (images, labels, classes, backbone, epochs, seed, ``RECIPE``), so changing any of
    them trains a new one instead of reusing a stale one. A file at ``path`` itself without a ``.sha256`` sidecar is a
    user-supplied surrogate (a state dict or a Lightning checkpoint of an ``ImageClassifier``), used as it is."""
    model = ImageClassifier(backbone=backbone, num_classes=num_classes, in_chans=images.shape[1])
    if path is not None and Path(path).is_file() and not Path(f"{path}.sha256").exists():
        state = load_plain(path, "surrogate")
        model.load_state_dict(state.get("state_dict", state))
        return model.eval()
    cached = surrogate_cache_path(path, images, labels, num_classes, backbone, epochs, seed) if path else None
    state = load_verified(cached) if cached else None
    if state is not None:
        model.load_state_dict(state)
        return model.eval()
    with torch.random.fork_rng():
        model = train_on_tensors(images, labels, num_classes, backbone=backbone, epochs=epochs,
                                generator=torch.Generator(device=images.device).manual_seed(seed), progress=progress,
                                desc=desc)
    if cached:
        save_atomic(cached, model.state_dict())
    return model


def surrogate_cache_path(path: str | Path, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                         backbone: str, epochs: int, seed: int) -> Path:
    """``<stem>-<key><suffix>`` beside ``path``; ``key`` covers the data and the training recipe."""
    path = Path(path)
    key = fingerprint(tuple(images.shape), images, labels, num_classes, backbone, epochs, seed, RECIPE)
    return path.with_name(f"{path.stem}-{key}{path.suffix or '.pt'}")


def pick_target(test_labels: torch.Tensor, num_classes: int, generator: torch.Generator,
                target_index: int | None = None, adversarial_class: int | None = None) -> tuple[int, int]:
    """A target test image and an adversarial class ≠ its label, drawn at random unless given (Witches' Brew §5 and
    Bullseye Polytope §4 draw both per trial)."""
    if target_index is None:
        target_index = int(torch.randint(0, len(test_labels), (1,), generator=generator))
    if not 0 <= target_index < len(test_labels):
        raise ValueError(f"target_index={target_index} is outside the test split (0..{len(test_labels) - 1})")
    true = int(test_labels[target_index])
    if adversarial_class is None:
        adversarial_class = int(torch.randint(0, num_classes - 1, (1,), generator=generator))
        adversarial_class += adversarial_class >= true
    if adversarial_class == true or not 0 <= adversarial_class < num_classes:
        raise ValueError(f"adversarial_class={adversarial_class} must be a class other than the target's own "
                         f"({true}) in 0..{num_classes - 1}")
    return target_index, adversarial_class


def prepare_targeted_attack(data, *, budget: float, target_index: int | None, adversarial_class: int | None,
                            backbone: str, surrogate_epochs: int, surrogate_seed: int, surrogate_path: str | None,
                            generator: torch.Generator, progress: bool, desc: str):
    """What GM and BP share before optimising: the target and adversarial class, the clean surrogate, and the
    ``round(budget × N_train)`` poison bases drawn from the adversarial class.
    Returns (surrogate, target_index, adversarial_class, poison indices)."""
    from lit_robust.poisons.crafted import choose_indices

    target_index, adversarial_class = pick_target(data.test_labels, data.num_classes, generator, target_index,
                                                  adversarial_class)
    surrogate = load_or_train_surrogate(surrogate_path, data.train_images, data.train_labels, data.num_classes,
                                        backbone=backbone, epochs=surrogate_epochs, seed=surrogate_seed,
                                        progress=progress, desc=desc)
    count = int(round(budget * len(data.train_labels)))
    return surrogate, target_index, adversarial_class, choose_indices(data.train_labels, adversarial_class, count,
                                                                      generator)


def targeted_poisons(data, indices: torch.Tensor, delta: torch.Tensor, target_index: int, adversarial_class: int,
                     info: dict, tensors: dict | None = None):
    """The ``Poisons`` record of a clean-label targeted attack (labels unchanged, bases + δ)."""
    from lit_robust.poisons.crafted import Poisons

    return Poisons(indices=indices, images=(data.train_images[indices] + delta).clamp(0, 1),
                   labels=data.train_labels[indices].clone(), target_class=adversarial_class,
                   target_index=target_index, info={**info, "target_true_class": int(data.test_labels[target_index])},
                   tensors=tensors or {})
