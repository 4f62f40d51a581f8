"""Witches' Brew gradient matching (Geiping et al. 2021 [GFH21]; thesis 000 Eq. 6.5): clean-label poisons from the
adversarial class whose training gradient points where the target's adversarial gradient points.

Loss (Witches' Brew Eq. 3): 1 − ⟨∇_θ L(F(x^π), y^adv), ∇_θ Σ_i L(F(x_i + δ_i), y_i)⟩ / (‖·‖ ‖·‖), over all
parameters as one vector, on a fixed surrogate in eval mode; optimised with *signed* Adam (the gradient w.r.t. δ is
replaced by its sign), step decays ×0.1 at 3/8, 5/8, 7/8 of the steps, projection onto ‖δ‖∞ ≤ ε and [0, 1] after
each step, differentiable augmentation (random shift, optional flip) of the poisons during crafting, and R random
restarts of which the one with the lowest final loss is kept.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lit_robust.functional.augment import random_hflip, random_shift
from lit_robust.poisons.crafted import PROGRESS_EVERY, CraftingData, Poisons, project_linf
from lit_robust.poisons.surrogate import prepare_targeted_attack, targeted_poisons


def parameter_gradient(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                       create_graph: bool = False) -> list[torch.Tensor]:
    """∇_θ of the summed cross-entropy of a batch (the quantity both sides of Eq. 6.5 are made of)."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = F.cross_entropy(model(images), labels, reduction="sum")
    return list(torch.autograd.grad(loss, params, create_graph=create_graph))


def gradient_matching_loss(poison_grad: list[torch.Tensor], target_grad: list[torch.Tensor]) -> torch.Tensor:
    """1 − cos(∇ poison loss, ∇ adversarial target loss) over all parameters as one vector (Witches' Brew Eq. 3)."""
    dot = sum((p * t).sum() for p, t in zip(poison_grad, target_grad))
    poison_norm = torch.sqrt(sum(p.pow(2).sum() for p in poison_grad))
    target_norm = torch.sqrt(sum(t.pow(2).sum() for t in target_grad))
    return 1 - dot / (poison_norm * target_norm)


def matching_loss_of(model, images, labels, delta, target_grad, max_shift=0, hflip=False, generator=None):
    """The matching loss of poisons ``images + δ`` (optionally after differentiable augmentation)."""
    poisoned = images + delta
    if max_shift:
        poisoned = random_shift(poisoned, max_shift, generator=generator)
    if hflip:
        poisoned = random_hflip(poisoned, generator=generator)
    return gradient_matching_loss(parameter_gradient(model, poisoned, labels, create_graph=True), target_grad)


def match_gradients(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, target_image: torch.Tensor,
                    adversarial_class: int, eps: float, restarts: int = 8, steps: int = 250, lr: float | None = None,
                    max_shift: int = 2, hflip: bool = False, generator: torch.Generator | None = None,
                    progress: bool = True) -> tuple[torch.Tensor, dict]:
    """Craft δ (P, C, H, W) for poisons ``images`` (labels unchanged). Returns the best restart's δ and
    {"restart_losses": final un-augmented loss per restart, "best_restart", "initial_loss", "final_loss"}.

    ``lr`` defaults to 0.1·ε (signed-Adam steps are ≈ lr, so ten steps cross the ε-ball).
    """
    model.eval()
    target_grad = [g.detach() for g in parameter_gradient(model, target_image[None], torch.tensor([adversarial_class]))]
    lr = 0.1 * eps if lr is None else lr
    milestones = [int(steps * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    best, restart_losses, initial = None, [], None
    bar = tqdm(total=restarts * steps, desc=f"gradient matching ε={eps:.3f}", disable=not progress, leave=False)
    for restart in range(restarts):
        init = (torch.rand(images.shape, generator=generator) * 2 - 1) * eps
        delta = project_linf(init, images, eps).requires_grad_(True)
        if restart == 0:
            initial = float(matching_loss_of(model, images, labels, delta, target_grad).detach())
        optimizer = torch.optim.Adam([delta], lr=lr)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
        for step in range(steps):
            loss = matching_loss_of(model, images, labels, delta, target_grad, max_shift, hflip, generator)
            (grad,) = torch.autograd.grad(loss, delta)
            delta.grad = grad.sign()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                delta.copy_(project_linf(delta, images, eps))
            bar.update()
            if progress and step % PROGRESS_EVERY == 0:  # a device sync only every few steps, and only when shown
                bar.set_postfix(restart=restart, loss=f"{loss.item():.3f}")
        final = float(matching_loss_of(model, images, labels, delta, target_grad).detach())
        restart_losses.append(final)
        if best is None or final < min(restart_losses[:-1]):
            best = delta.detach().clone()
    bar.close()
    best_restart = min(range(restarts), key=restart_losses.__getitem__)
    return best, {"restart_losses": restart_losses, "best_restart": best_restart, "initial_loss": initial,
                  "final_loss": restart_losses[best_restart]}


def craft_gradient_matching(data: CraftingData, *, eps: float = 16 / 255, budget: float = 0.01, restarts: int = 8,
                            steps: int = 250, lr: float | None = None, max_shift: int = 2, hflip: bool = False,
                            target_index: int | None = None, adversarial_class: int | None = None,
                            backbone: str = "small_cnn", surrogate_epochs: int = 10, surrogate_seed: int = 0,
                            surrogate_path: str | None = None, generator: torch.Generator, progress: bool = True
                            ) -> Poisons:
    """Witches' Brew poisons: ``round(budget × N_train)`` adversarial-class training images perturbed within ε so
    that training on them moves one test image (``target_index``, random by default) to ``adversarial_class``.

    Defaults are the paper's CIFAR-10 settings (ε = 16/255, 1 %, 8 restarts × 250 steps). The surrogate is trained on
    the clean training split with its own seed (shared by all trials) or loaded from ``surrogate_path``.
    """
    surrogate, target_index, adversarial_class, indices = prepare_targeted_attack(
        data, budget=budget, target_index=target_index, adversarial_class=adversarial_class, backbone=backbone,
        surrogate_epochs=surrogate_epochs, surrogate_seed=surrogate_seed, surrogate_path=surrogate_path,
        generator=generator, progress=progress, desc="gradient-matching surrogate")
    images, labels = data.train_images[indices], data.train_labels[indices]
    delta, info = match_gradients(surrogate, images, labels, data.test_images[target_index], adversarial_class, eps,
                                  restarts, steps, lr, max_shift, hflip, generator, progress)
    return targeted_poisons(data, indices, delta, target_index, adversarial_class, info)
