"""Adversarial training (thesis 001 ch. 2): the classifier trained on the worst case in an ε-ball around each training
image, found by PGD on the device inside ``training_step`` — Madry et al. 2018 (cross-entropy at the PGD point) or
TRADES (Zhang et al. 2019: clean cross-entropy plus β times the KL between clean and perturbed predictions)."""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from lit_robust.functional.attacks import check_norm, pgd
from lit_robust.models.classifier import ImageClassifier

METHODS = ("pgd", "trades")


def trades_kl(logits_clean: torch.Tensor, logits_adv: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(f(x) ‖ f(x')) between the clean and perturbed softmax predictions (TRADES, Zhang et al. 2019,
    Eq. 5's boundary term with the KL as surrogate loss)."""
    return F.kl_div(F.log_softmax(logits_adv, dim=1), F.log_softmax(logits_clean, dim=1), reduction="none",
                    log_target=True).sum(1)


def trades_loss(logits_clean: torch.Tensor, logits_adv: torch.Tensor, labels: torch.Tensor,
                beta: float) -> torch.Tensor:
    """TRADES objective (Zhang et al. 2019, Eq. 5): mean CE(f(x), y) + β · mean KL(f(x) ‖ f(x'))."""
    return F.cross_entropy(logits_clean, labels) + beta * trades_kl(logits_clean, logits_adv).mean()


def warmed_up_eps(eps: float, epoch: int, warmup_epochs: int) -> float:
    """Linear ε warm-up: ε·(e + 1)/W in epoch e < W (W = ``warmup_epochs``), then ε."""
    return eps * min(1.0, (epoch + 1) / warmup_epochs) if warmup_epochs > 0 else eps


class AdversarialClassifier(ImageClassifier):
    """``ImageClassifier`` trained adversarially; only the training loss differs (validation/test are clean — robust
    accuracy is :class:`~lit_robust.callbacks.AdversarialEvaluation`'s job).

    The attack runs batched on the batch's device with the model in eval mode (BatchNorm uses its running statistics
    and is not updated by the attack's forward passes, as in the TRADES reference code), then the model returns to
    train mode for the loss. Under DDP each rank attacks its own batch: the attack's forward passes call the module
    directly and differentiate only with respect to the input, so no gradient is synchronised for them.

    Args:
        method: ``pgd`` (Madry et al.: CE at the PGD point of the CE) or ``trades`` (PGD on the KL from a point
            0.001·N(0, I) near x, then :func:`trades_loss`).
        norm: ``linf`` or ``l2``; eps: the radius in [0, 1] pixel units.
        attack_steps: PGD iterations during training; attack_step_size: their step at full ε (default 2.5ε/steps),
            scaled with ε during warm-up.
        beta: TRADES' β (1/λ of the paper; 6 in its MNIST/CIFAR experiments).
        eps_warmup_epochs: ε grows linearly over these epochs (:func:`warmed_up_eps`); 0 = full ε from the start.
        **kwargs: :class:`ImageClassifier`'s (backbone, normalisation, optimiser, schedule).
    """

    def __init__(self, method: str = "pgd", norm: str = "linf", eps: float = 0.3, attack_steps: int = 10,
                 attack_step_size: float | None = None, beta: float = 6.0, eps_warmup_epochs: int = 0, **kwargs):
        if method not in METHODS:
            raise ValueError(f"model.method={method!r}: use one of {METHODS}")
        check_norm(norm)
        if eps <= 0 or attack_steps < 1:
            raise ValueError(f"model.eps={eps}, model.attack_steps={attack_steps}: adversarial training needs eps > 0 "
                             "and at least one attack step (use ImageClassifier for standard training)")
        super().__init__(**kwargs)
        self.save_hyperparameters()

    def current_eps(self) -> float:
        return warmed_up_eps(self.hparams.eps, self.current_epoch, self.hparams.eps_warmup_epochs)

    @contextmanager
    def attack_mode(self):
        """Eval mode (BatchNorm's running statistics, no dropout) for the attack's forward passes, then back."""
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    def adversarial_inputs(self, images: torch.Tensor, loss_fn, eps: float, start: torch.Tensor | None = None):
        """PGD in the ε-ball of ``images`` on ``loss_fn``, in :meth:`attack_mode`."""
        hp = self.hparams
        step = (hp.attack_step_size if hp.attack_step_size is not None else 2.5 * hp.eps / hp.attack_steps) \
            * eps / hp.eps
        with self.attack_mode():
            return pgd(loss_fn, images, eps, step, hp.attack_steps, hp.norm, start=start)

    def training_loss(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eps = self.current_eps()
        self.log("train/eps", eps, on_step=False, on_epoch=True)
        if self.hparams.method == "pgd":
            adv = self.adversarial_inputs(images, lambda v: F.cross_entropy(self(v), labels, reduction="none"), eps)
            logits = self(adv)
            return F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing), logits
        with torch.no_grad(), self.attack_mode():
            clean_eval = self(images)   # the attack's fixed target f(x), as in TRADES' reference code
        start = images + 0.001 * torch.randn_like(images)
        adv = self.adversarial_inputs(images, lambda v: trades_kl(clean_eval, self(v)), eps, start=start)
        logits_clean = self(images)
        return trades_loss(logits_clean, self(adv), labels, self.hparams.beta), logits_clean
