"""Bullseye Polytope (Aghakhani et al. 2021 [AMW21]; thesis 000 Eq. 6.5): clean-label feature collision that puts
the target's feature at the *mean* of the poisons' features (the polytope's centre), so a classifier trained on the
poisons' (correct) labels puts the target in the adversarial class.

Loss (BP Eq. 4 with the uniform coefficients of the "bullseye"): Σ_layers ‖φ(x^π) − (1/P) Σ_i φ(x_i + δ_i)‖² /
‖φ(x^π)‖². Threat models: ``linear`` (linear transfer: frozen extractor, new linear head; φ = the penultimate
feature) and ``finetune`` (end-to-end fine-tuning; BP's multi-layer variant: the sum over the outputs of every block
of the network, here every conv block of ``small_cnn``, and the penultimate feature for other backbones). Adam on δ,
projection onto ‖δ‖∞ ≤ ε and [0, 1] after each step.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from lit_robust.models.classifier import ImageClassifier
from lit_robust.models.nets import SmallCNN
from lit_robust.poisons.crafted import PROGRESS_EVERY, CraftingData, Poisons, project_linf
from lit_robust.poisons.surrogate import penultimate_features, prepare_targeted_attack, targeted_poisons

THREAT_MODELS = ("linear", "finetune")


def feature_maps(model: ImageClassifier, images: torch.Tensor, threat_model: str) -> list[torch.Tensor]:
    """The features BP collides: [penultimate] for linear transfer; every block's output + penultimate for
    fine-tuning (``small_cnn``: the output of each max-pooled conv block)."""
    if threat_model not in THREAT_MODELS:
        raise ValueError(f"threat_model={threat_model!r}: use one of {THREAT_MODELS}")
    if threat_model == "linear" or not isinstance(model.net, SmallCNN):
        return [penultimate_features(model, images)]
    maps, x = [], (images - model.mean) / model.std
    for layer in model.net.features:
        x = layer(x)
        if isinstance(layer, torch.nn.MaxPool2d):
            maps.append(x.flatten(1))
    return maps + [x.flatten(1)]


def bullseye_loss(target_features: list[torch.Tensor], poison_features: list[torch.Tensor]) -> torch.Tensor:
    """Σ_layers ‖φ(x^π) − mean_i φ(x_i + δ_i)‖² / ‖φ(x^π)‖² (BP Eq. 4, uniform coefficients)."""
    return sum((poison.mean(0) - target.squeeze(0)).pow(2).sum() / target.pow(2).sum()
               for target, poison in zip(target_features, poison_features))


def collide_features(model: ImageClassifier, images: torch.Tensor, target_image: torch.Tensor, eps: float,
                     threat_model: str = "linear", steps: int = 1000, lr: float = 0.01,
                     progress: bool = True) -> tuple[torch.Tensor, dict]:
    """Craft δ (P, C, H, W), starting from the clean bases (δ = 0, as BP does). Returns δ and
    {"initial_loss", "final_loss", "relative_distance"} (the last: ‖φ(x^π) − mean φ(poisons)‖ / ‖φ(x^π)‖ of the
    penultimate feature)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        target = [f.detach() for f in feature_maps(model, target_image[None], threat_model)]
    delta = torch.zeros_like(images, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=lr)
    with torch.no_grad():
        initial = float(bullseye_loss(target, feature_maps(model, images, threat_model)))
    bar = tqdm(range(steps), desc=f"bullseye polytope ε={eps:.3f}", disable=not progress, leave=False)
    for step in bar:
        loss = bullseye_loss(target, feature_maps(model, images + delta, threat_model))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            delta.copy_(project_linf(delta, images, eps))
        if progress and step % PROGRESS_EVERY == 0:  # a device sync only every few steps, and only when shown
            bar.set_postfix(loss=f"{loss.item():.4f}")
    with torch.no_grad():
        final = float(bullseye_loss(target, feature_maps(model, images + delta, threat_model)))
        t, pf = penultimate_features(model, target_image[None]), penultimate_features(model, images + delta)
        relative = float((pf.mean(0) - t[0]).norm() / t[0].norm())
    return delta.detach(), {"initial_loss": initial, "final_loss": final, "relative_distance": relative}


def craft_bullseye_polytope(data: CraftingData, *, eps: float = 16 / 255, budget: float = 0.01,
                            threat_model: str = "linear", steps: int = 1000, lr: float = 0.01,
                            target_index: int | None = None, adversarial_class: int | None = None,
                            backbone: str = "small_cnn", surrogate_epochs: int = 10, surrogate_seed: int = 0,
                            surrogate_path: str | None = None, generator: torch.Generator, progress: bool = True
                            ) -> Poisons:
    """BP poisons: ``round(budget × N_train)`` adversarial-class training images perturbed within ε to surround the
    target's feature. The feature extractor is loaded from ``surrogate_path`` or trained on the clean training split;
    its weights are stored in ``Poisons.tensors["extractor_state"]`` so the transfer-learning victim starts from the
    same extractor (``TransferClassifier``)."""
    extractor, target_index, adversarial_class, indices = prepare_targeted_attack(
        data, budget=budget, target_index=target_index, adversarial_class=adversarial_class, backbone=backbone,
        surrogate_epochs=surrogate_epochs, surrogate_seed=surrogate_seed, surrogate_path=surrogate_path,
        generator=generator, progress=progress, desc="bullseye feature extractor")
    delta, info = collide_features(extractor, data.train_images[indices], data.test_images[target_index], eps,
                                   threat_model, steps, lr, progress)
    return targeted_poisons(data, indices, delta, target_index, adversarial_class, info,
                            {"extractor_state": extractor.state_dict()})
