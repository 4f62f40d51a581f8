"""Gradient attacks on inputs in [0, 1], batched; ``loss_fn(x)`` returns per-sample losses to *increase* (e.g.
cross-entropy of a classifier, or the negative ELBO of a VAE encoder attack). ``random_sign`` is their reference: an
attack that does no better than random noise of the same size is not using its gradient.

Norms: ``"linf"`` (steps along the gradient's sign, projection by clipping) and ``"l2"`` (steps along the normalised
gradient, projection by rescaling). APGD and its losses follow Croce & Hein 2020, "Reliable evaluation of adversarial
robustness with an ensemble of diverse parameter-free attacks" (Alg. 1, Eqs. 5-7).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

LossFn = Callable[[torch.Tensor], torch.Tensor]
LogitsFn = Callable[[torch.Tensor], torch.Tensor]
NORMS = ("linf", "l2")


def _loss_and_gradient(loss_fn: LossFn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample losses at ``x`` (detached) and the gradient of their sum with respect to ``x``."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(x)
        (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad


def check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise ValueError(f"attack norm {norm!r}: use 'linf' or 'l2'")
    return norm


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A scalar or per-sample (N,) tensor shaped to broadcast over images (N, C, H, W)."""
    return torch.as_tensor(values, dtype=like.dtype, device=like.device).reshape(-1, *[1] * (like.dim() - 1))


def steepest_ascent(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """The unit-norm direction of steepest ascent: sign(∇) for ℓ∞, ∇ / ‖∇‖₂ for ℓ2 (Madry et al. 2018, §2.1)."""
    if norm == "linf":
        return grad.sign()
    return grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).reshape(-1, *[1] * (grad.dim() - 1))


def project(adv: torch.Tensor, x: torch.Tensor, eps, norm: str) -> torch.Tensor:
    """P_S: the closest point to ``adv`` in the ``norm`` ball of radius ``eps`` (scalar or per-sample) around ``x``,
    then clipped to [0, 1] (for ℓ2 the clip after the rescale keeps the ball: it only shrinks |δ|)."""
    eps = _per_sample(eps, x)
    delta = adv - x
    if norm == "linf":
        delta = torch.max(torch.min(delta, eps), -eps)
    else:
        length = _per_sample(delta.flatten(1).norm(dim=1), x)
        delta = delta * (eps / length.clamp_min(1e-12)).clamp(max=1.0)
    return (x + delta).clamp(0.0, 1.0)


def keep_better(best: torch.Tensor, best_score: torch.Tensor, candidate: torch.Tensor,
                score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, the candidate where its score is higher than the best so far, and the updated scores."""
    better = score > best_score
    return torch.where(_per_sample(better, best).bool(), candidate, best), torch.where(better, score, best_score)


def random_start(x: torch.Tensor, eps: float, norm: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """A uniform point of the ℓ∞ ball, or a point of the ℓ2 ball in a Gaussian direction at a uniform radius."""
    noise = torch.rand(x.shape, generator=generator, device="cpu").to(x.device) * 2 - 1
    if norm == "l2":
        direction = steepest_ascent(torch.randn(x.shape, generator=generator).to(x.device), "l2")
        noise = direction * torch.rand(len(x), generator=generator).to(x.device).reshape(-1, *[1] * (x.dim() - 1))
    return project(x + eps * noise, x, eps, norm)


def fgsm(loss_fn: LossFn, x: torch.Tensor, eps: float) -> torch.Tensor:
    """One signed-gradient step of size ``eps`` (Goodfellow et al.), clipped to [0, 1]."""
    return (x + eps * _loss_and_gradient(loss_fn, x)[1].sign()).clamp(0.0, 1.0).detach()


def random_sign(x: torch.Tensor, eps: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each pixel moved by ±``eps`` at random (FGSM's budget without the gradient), clipped to [0, 1]."""
    signs = torch.randint(0, 2, x.shape, generator=generator).to(x.device) * 2 - 1
    return (x + eps * signs).clamp(0.0, 1.0)


def pgd(loss_fn: LossFn, x: torch.Tensor, eps: float, step_size: float | None = None, steps: int = 10,
        norm: str = "linf", random_init: bool = True, generator: torch.Generator | None = None,
        start: torch.Tensor | None = None) -> torch.Tensor:
    """Projected gradient ascent x ← P_S(x + α·d(∇ℓ)) in the ``norm`` ball of radius ``eps`` around ``x``, within
    [0, 1] (Madry et al. 2018, Eq. 2.1 generalised to ℓ2); α defaults to 2.5ε / steps. The ascent starts at
    ``start`` if given, else a random point of the ball (``random_init``), else ``x``."""
    check_norm(norm)
    step_size = step_size if step_size is not None else 2.5 * eps / max(steps, 1)
    if start is not None:
        adv = project(start, x, eps, norm)
    else:
        adv = random_start(x, eps, norm, generator) if random_init else x.detach().clone()
    for _ in range(steps):
        adv = project(adv + step_size * steepest_ascent(_loss_and_gradient(loss_fn, adv)[1], norm), x, eps, norm)
    return adv.detach()


def pgd_linf(loss_fn: LossFn, x: torch.Tensor, eps: float, step_size: float | None = None, steps: int = 10,
             random_start: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """ℓ∞ :func:`pgd` (the signature the OOD attacks and reports call)."""
    return pgd(loss_fn, x, eps, step_size, steps, "linf", random_start, generator)


def pgd_restarts(loss_fn: LossFn, x: torch.Tensor, eps: float, restarts: int = 1, score_fn: LossFn | None = None,
                 generator: torch.Generator | None = None, **pgd_kwargs) -> torch.Tensor:
    """:func:`pgd` from ``restarts`` random starts, keeping per sample the result of the highest ``score_fn``
    (default ``loss_fn``; for robust accuracy pass :func:`margin_loss`, positive exactly when misclassified)."""
    score_fn = score_fn or loss_fn
    best, best_score = None, None
    for _ in range(max(restarts, 1)):
        adv = pgd(loss_fn, x, eps, generator=generator, **pgd_kwargs)
        with torch.no_grad():
            score = score_fn(adv)
        best, best_score = (adv, score) if best is None else keep_better(best, best_score, adv, score)
    return best


# ---- losses on logits -----------------------------------------------------------------------------------------------
def margin_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """max_{i≠y} z_i − z_y: positive exactly when the prediction is wrong (Carlini & Wagner's margin)."""
    true = logits.gather(1, labels[:, None])[:, 0]
    other = logits.scatter(1, labels[:, None], float("-inf")).amax(1)
    return other - true


def dlr_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Difference of Logits Ratio, Croce & Hein 2020 Eq. 6, negated to be a loss to increase:
    (max_{i≠y} z_i − z_y) / (z_π1 − z_π3), with π the classes sorted by decreasing logit (scale- and shift-invariant)."""
    top = logits.sort(dim=1, descending=True).values
    return margin_loss(logits, labels) / (top[:, 0] - top[:, 2] + 1e-12)


def targeted_dlr_loss(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Targeted DLR, Croce & Hein 2020 Eq. 7, negated to be a loss to increase:
    (z_t − z_y) / (z_π1 − (z_π3 + z_π4) / 2)."""
    top = logits.sort(dim=1, descending=True).values
    gap = logits.gather(1, targets[:, None])[:, 0] - logits.gather(1, labels[:, None])[:, 0]
    return gap / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


# ---- APGD (Croce & Hein 2020, Alg. 1) -------------------------------------------------------------------------------
def apgd_checkpoints(steps: int) -> list[int]:
    """The checkpoints w_j = ⌈p_j·N_iter⌉ of §3.2: p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03,
    0.06)."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({math.ceil(round(q * steps, 6)) for q in p if q <= 1})  # round: 0.57·100 is 57.000…01 in floats


def apgd_halve(improved: torch.Tensor, interval: int, step_unchanged: torch.Tensor,
               best_unchanged: torch.Tensor, rho: float = 0.75) -> torch.Tensor:
    """Which samples halve their step at a checkpoint (§3.2): Condition 1, fewer than ρ·(w_j − w_{j−1}) of the steps
    since the last checkpoint increased the loss; Condition 2, neither the step nor the best loss changed since it."""
    return (improved < rho * interval) | (step_unchanged & best_unchanged)


def apgd(loss_fn: LossFn, x: torch.Tensor, eps: float, steps: int = 100, norm: str = "linf", alpha: float = 0.75,
         rho: float = 0.75, generator: torch.Generator | None = None) -> torch.Tensor:
    """Auto-PGD (Croce & Hein 2020, Alg. 1): per-sample step η starting at 2ε, momentum ``alpha``
    x(k+1) = P_S(x(k) + α(z(k+1) − x(k)) + (1 − α)(x(k) − x(k−1))) with z(k+1) = P_S(x(k) + η·d(∇f)); at each
    checkpoint w_j where progress stalled (:func:`apgd_halve` on the increases f(x(i+1)) > f(x(i)) for
    i = w_{j−1} … w_j − 1) η halves and x(k+1) ← x_max. Returns each sample's best point found (x_max)."""
    check_norm(norm)
    n = len(x)
    step = torch.full((n,), 2.0 * eps, device=x.device)
    previous = random_start(x, eps, norm, generator)
    loss, grad = _loss_and_gradient(loss_fn, previous)
    best, best_loss = previous.clone(), loss.clone()
    current = project(previous + _per_sample(step, x) * steepest_ascent(grad, norm), x, eps, norm)
    loss, grad = _loss_and_gradient(loss_fn, current)
    increases = (loss > best_loss).float()   # i = 0
    best, best_loss = keep_better(best, best_loss, current, loss)
    checkpoints = apgd_checkpoints(steps)
    last_checkpoint, step_then, best_then = 0, step.clone(), best_loss.clone()
    for k in range(1, steps):
        z = project(current + _per_sample(step, x) * steepest_ascent(grad, norm), x, eps, norm)
        following = project(current + alpha * (z - current) + (1 - alpha) * (current - previous), x, eps, norm)
        previous, current, last_loss = current, following, loss
        loss, grad = _loss_and_gradient(loss_fn, current)
        best, best_loss = keep_better(best, best_loss, current, loss)
        if k in checkpoints:
            halve = apgd_halve(increases, k - last_checkpoint, step == step_then, best_loss == best_then, rho)
            step_then, best_then = step.clone(), best_loss.clone()
            step = torch.where(halve, step / 2, step)
            current = torch.where(_per_sample(halve, x).bool(), best, current)
            if halve.any():  # x(k+1) ← x_max, with its gradient; the momentum goes on from x(k)
                loss, grad = _loss_and_gradient(loss_fn, current)
            increases.zero_()
            last_checkpoint = k
        increases += (loss > last_loss).float()   # i = k: counted in the interval that starts at this checkpoint
    return best.detach()


def apgd_ce(logits_fn: LogitsFn, x: torch.Tensor, labels: torch.Tensor, eps: float, steps: int = 100,
            norm: str = "linf", generator: torch.Generator | None = None) -> torch.Tensor:
    """APGD on the cross-entropy (Croce & Hein 2020, §3)."""
    loss_fn = lambda v: torch.nn.functional.cross_entropy(logits_fn(v), labels, reduction="none")  # noqa: E731
    return apgd(loss_fn, x, eps, steps, norm, generator=generator)


def apgd_targeted(logits_fn: LogitsFn, x: torch.Tensor, labels: torch.Tensor, eps: float, steps: int = 100,
                  norm: str = "linf", num_targets: int = 9, generator: torch.Generator | None = None) -> torch.Tensor:
    """APGD-T (Croce & Hein 2020, §4): APGD on the targeted DLR loss (Eq. 7) once per target class, the targets being
    the ``num_targets`` most likely wrong classes at the clean input; keeps per sample the point of largest margin
    (:func:`margin_loss`), i.e. a misclassified one when any target succeeded."""
    with torch.no_grad():
        logits = logits_fn(x)
    ranked = logits.scatter(1, labels[:, None], float("-inf")).argsort(dim=1, descending=True)
    num_targets = min(num_targets, logits.shape[1] - 1)
    best, best_score = x.detach().clone(), margin_loss(logits, labels)
    for rank in range(num_targets):
        targets = ranked[:, rank]
        adv = apgd(lambda v: targeted_dlr_loss(logits_fn(v), labels, targets), x, eps, steps, norm,
                   generator=generator)
        with torch.no_grad():
            score = margin_loss(logits_fn(adv), labels)
        best, best_score = keep_better(best, best_score, adv, score)
    return best


# ---- robust accuracy ------------------------------------------------------------------------------------------------
def robust_correct(logits_fn: LogitsFn, x: torch.Tensor, labels: torch.Tensor, eps: float, norm: str = "linf",
                   pgd_steps: int = 20, restarts: int = 1, apgd_steps: int = 100, num_targets: int = 9,
                   attacks: tuple[str, ...] = ("pgd", "apgd-ce", "apgd-t"),
                   generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Per image and attack, whether the prediction stays correct (bool (N,) each) under: ``pgd`` (PGD-k on the CE,
    ``restarts`` starts, worst kept by :func:`margin_loss`), ``apgd-ce``, ``apgd-t``; ``clean`` is added. ``pgd`` and
    ``apgd-ce`` attack every clean-correct image; ``apgd-t`` only those ``apgd-ce`` left correct (AutoAttack's
    cascade, Croce & Hein 2020 §5), so its column is "correct under APGD-CE and APGD-T" and costs little where
    APGD-CE already succeeded."""
    unknown = set(attacks) - {"pgd", "apgd-ce", "apgd-t"}
    if unknown:
        raise ValueError(f"attacks {sorted(unknown)}: use 'pgd', 'apgd-ce' and/or 'apgd-t'")
    with torch.no_grad():
        correct = {"clean": logits_fn(x).argmax(1) == labels}
    for attack in attacks:
        result = (correct["apgd-ce"] if attack == "apgd-t" and "apgd-ce" in correct else correct["clean"]).clone()
        todo = result.nonzero()[:, 0]
        if len(todo):
            xs, ys = x[todo], labels[todo]
            if attack == "pgd":
                ce = lambda v: torch.nn.functional.cross_entropy(logits_fn(v), ys, reduction="none")  # noqa: E731
                adv = pgd_restarts(ce, xs, eps, restarts, lambda v: margin_loss(logits_fn(v), ys), generator,
                                   steps=pgd_steps, norm=norm)
            elif attack == "apgd-ce":
                adv = apgd_ce(logits_fn, xs, ys, eps, apgd_steps, norm, generator)
            else:
                adv = apgd_targeted(logits_fn, xs, ys, eps, apgd_steps, norm, num_targets, generator)
            with torch.no_grad():
                result[todo] = logits_fn(adv).argmax(1) == ys
        correct[attack] = result
    return correct


# ---- Square attack (Andriushchenko et al. 2020, ℓ∞; black-box) ------------------------------------------------------
def square_fraction(iteration: int, steps: int, p_init: float = 0.05) -> float:
    """The share of pixels the square covers at ``iteration`` (§A.2 schedule, given for 10,000 queries and rescaled
    to ``steps``): ``p_init`` halved at iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000."""
    halvings = sum(iteration > round(t * steps / 10000) for t in (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000))
    return p_init / 2 ** halvings


def square_side(iteration: int, steps: int, p_init: float, height: int, width: int) -> int:
    """The side of the square window at ``iteration``: √(p·h·w) pixels for the share p of :func:`square_fraction`,
    at least 1 and at most h − 1 (Andriushchenko et al. 2020, Alg. 1)."""
    return max(1, min(height - 1, round(math.sqrt(square_fraction(iteration, steps, p_init) * height * width))))


def random_squares(n: int, height: int, width: int, side: int, generator: torch.Generator | None = None,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """``n`` boolean masks (n, h, w), each a ``side`` × ``side`` square at a uniformly drawn position inside the
    image."""
    top = torch.randint(0, height - side + 1, (n,), generator=generator).to(device)
    left = torch.randint(0, width - side + 1, (n,), generator=generator).to(device)
    rows, cols = torch.arange(height, device=device), torch.arange(width, device=device)
    in_rows = (rows[None] >= top[:, None]) & (rows[None] < top[:, None] + side)
    in_cols = (cols[None] >= left[:, None]) & (cols[None] < left[:, None] + side)
    return in_rows[:, :, None] & in_cols[:, None, :]


def square_linf(logits_fn: LogitsFn, x: torch.Tensor, labels: torch.Tensor, eps: float, steps: int = 1000,
                p_init: float = 0.05, generator: torch.Generator | None = None) -> torch.Tensor:
    """Square attack (Andriushchenko et al. 2020, Alg. 1, ℓ∞): random search without gradients — start from vertical
    stripes of ±ε, then at each step redraw one random square window of ±ε per channel (side from
    :func:`square_side`) and keep it per sample where :func:`margin_loss` rises. A model that resists gradient
    attacks but not this one masks its gradients."""
    n, c, h, w = x.shape
    draw = lambda *shape: torch.randint(0, 2, shape, generator=generator).to(x.device) * 2 - 1  # noqa: E731
    with torch.no_grad():
        adv = (x + eps * draw(n, c, 1, w)).clamp(0.0, 1.0)
        best = margin_loss(logits_fn(adv), labels)
        for i in range(steps):
            window = random_squares(n, h, w, square_side(i, steps, p_init, h, w), generator, x.device)
            candidate = torch.where(window[:, None], (x + eps * draw(n, c, 1, 1)).clamp(0.0, 1.0), adv)
            adv, best = keep_better(adv, best, candidate, margin_loss(logits_fn(candidate), labels))
    return adv
