"""Narcissus clean-label backdoor (Zeng et al. 2022 [ZPJ22]; thesis 000 §6.3, Eq. 6.4 with C_δ = {0}, C_ρ = C,
Π = D_train^π, D = D_POOD ∪ D_train^π).

1. Train a surrogate on a public out-of-distribution set (POOD, its own classes) plus the target class as one extra
   class, then warm it up on the target class alone.
2. Synthesise one trigger ρ, ‖ρ‖∞ ≤ ε, that makes target-class images *more* target-like to the surrogate.
3. Poison a fraction of the target class with x + ρ, labels unchanged (clean label). At test time x + k·ρ on
   non-target images (k = 1 in the thesis, k = 3 in the Narcissus paper).

Deviation: the paper minimises cross-entropy to the target class. On digits the surrogate separates the target class
so well that cross-entropy and its gradient are exactly zero in float32 and the trigger never moves (measured; see
specs README), so we minimise the logit margin max_{k≠π} z_k − z_π, which keeps a gradient at any confidence.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from lit_robust.models.classifier import train_on_tensors
from lit_robust.poisons.crafted import PROGRESS_EVERY, CraftingData, Poisons, additive_trigger, choose_indices
from lit_robust.poisons.surrogate import load_or_train_surrogate
from lit_robust.storage.run_paths import expand_path


def logit_margin_loss(logits: torch.Tensor, target_class: int) -> torch.Tensor:
    """Mean over the batch of max_{k≠π} z_k − z_π (negative once every image is classified as π)."""
    target = logits[:, target_class]
    others = logits.clone()
    others[:, target_class] = float("-inf")
    return (others.max(dim=1).values - target).mean()


def public_ood_images(name: str, image_shape) -> tuple[torch.Tensor, torch.Tensor]:
    """The public out-of-distribution set, resized to the victim's image shape, with its own labels:
    ``sklearn8x8`` (scikit-learn's 8×8 digits, the embedded stand-in for the paper's POOD on MNIST-like data) or a
    folder of class sub-folders (e.g. Tiny-ImageNet's ``train/``, the paper's POOD for CIFAR-10)."""
    from pathlib import Path

    from lit_robust.datasets import load_digits_source, resize_images

    channels, height, _ = image_shape
    if name == "sklearn8x8":
        images, labels = load_digits_source(name)
    elif Path(expand_path(name, "data.params.public")).is_dir():
        from torchvision import datasets, transforms

        from lit_robust.datasets import stack_dataset

        folder = datasets.ImageFolder(expand_path(name, "data.params.public"), transform=transforms.Compose(
            [transforms.Resize((height, height)), transforms.ToTensor()]))
        images, labels = stack_dataset(folder)
    else:
        raise ValueError(f"public={name!r}: use 'sklearn8x8' or an existing folder of class sub-folders "
                         "(e.g. tiny-imagenet-200/train)")
    images = resize_images(images, height)
    if images.shape[1] != channels:
        images = images.mean(1, keepdim=True) if channels == 1 else images.expand(-1, channels, -1, -1)
    return images.contiguous(), labels


def synthesize_trigger(model: torch.nn.Module, images: torch.Tensor, target_class: int, eps: float, steps: int,
                       lr: float = 0.01, batch_size: int = 256, generator: torch.Generator | None = None,
                       progress: bool = True) -> tuple[torch.Tensor, list[float]]:
    """argmin_{‖ρ‖∞ ≤ ε} E_x margin(F(x + ρ), π) over target-class images by RAdam (Narcissus' optimiser), projecting
    ρ onto the ε-ball after every step. Returns ρ (C, H, W) and the loss per step."""
    delta = torch.zeros(images.shape[1:], requires_grad=True)
    optimizer = torch.optim.RAdam([delta], lr=lr)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    losses = []
    bar = tqdm(range(steps), desc=f"narcissus trigger ε={eps:.3f}", disable=not progress, leave=False)
    for step in bar:
        batch = images[torch.randperm(len(images), generator=generator)[:batch_size]]
        loss = logit_margin_loss(model(additive_trigger(batch, delta)), target_class)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            delta.clamp_(-eps, eps)
        losses.append(loss.detach())  # read once at the end: no device sync per step
        if progress and step % PROGRESS_EVERY == 0:
            bar.set_postfix(margin=f"{loss.item():.3f}")
    return delta.detach(), torch.stack(losses).tolist() if losses else []


def craft_narcissus(data: CraftingData, *, target_class: int = 0, eps: float = 16 / 255, fraction: float = 1.0,
                    public: str = "sklearn8x8", backbone: str = "small_cnn", surrogate_epochs: int = 10,
                    surrogate_seed: int = 0, surrogate_path: str | None = None, warmup_epochs: int = 5,
                    steps: int = 1000, batch_size: int = 256, lr: float = 0.01, generator: torch.Generator,
                    progress: bool = True) -> Poisons:
    """Narcissus poisons: ``fraction`` of the target class's training images get + ρ, labels unchanged.

    Defaults follow the reference (ε = 16/255, 1,000 trigger rounds, RAdam lr 0.01); the surrogate has
    ``num public classes + 1`` outputs, the last being the target class; it is trained with its own seed and, when
    ``surrogate_path`` is given, cached there (before the warm-up), so runs at several ε share it.
    """
    if not 0 <= target_class < data.num_classes:
        raise ValueError(f"target_class={target_class} is not a class of this data (0..{data.num_classes - 1})")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction={fraction} must be in [0, 1] (a fraction of the target class)")
    pood_images, pood_labels = (t.to(data.train_images.device)
                                for t in public_ood_images(public, data.train_images.shape[1:]))
    target_images = data.train_images[data.train_labels == target_class]
    extra = int(pood_labels.max()) + 1
    surrogate = load_or_train_surrogate(surrogate_path, torch.cat([pood_images, target_images]),
                                        torch.cat([pood_labels, torch.full((len(target_images),), extra)]), extra + 1,
                                        backbone=backbone, epochs=surrogate_epochs, seed=surrogate_seed,
                                        progress=progress, desc="narcissus surrogate (POOD + target)")
    surrogate = train_on_tensors(target_images, torch.full((len(target_images),), extra), extra + 1,
                                epochs=warmup_epochs, lr=1e-4, generator=generator, progress=progress,
                                desc="narcissus warm-up (target)", model=surrogate)
    delta, losses = synthesize_trigger(surrogate, target_images, extra, eps, steps, lr, batch_size,
                                       generator=generator, progress=progress)
    n_target = len(target_images)
    indices = choose_indices(data.train_labels, target_class, int(round(fraction * n_target)), generator)
    images = additive_trigger(data.train_images[indices], delta)
    return Poisons(indices=indices, images=images, labels=data.train_labels[indices].clone(),
                   target_class=target_class, trigger={"kind": "additive", "delta": delta, "eps": eps},
                   info={"margin_first": losses[0] if losses else None, "margin_last": losses[-1] if losses else None,
                         "target_class_size": n_target})
