"""The ℓ∞ attacks against a linear loss, whose worst case in the ε-ball is known: x + ε·sign(w)."""
import torch

from lit_robust.attacks import fgsm, pgd_linf, random_sign


def linear_setup():
    torch.manual_seed(0)
    w = torch.randn(4, 1, 6, 6)
    x = 0.2 + 0.6 * torch.rand(4, 1, 6, 6)             # inside (0, 1): no clipping within ε = 0.1
    return w, x, lambda v: (w * v).flatten(1).sum(-1)


def test_gradient_attacks_reach_the_worst_case_and_random_noise_does_not():
    w, x, loss = linear_setup()
    eps = 0.1
    worst = loss(x) + eps * w.abs().flatten(1).sum(-1)
    assert torch.allclose(loss(fgsm(loss, x, eps)), worst, atol=1e-4)
    assert torch.allclose(loss(pgd_linf(loss, x, eps, steps=5)), worst, atol=1e-4)
    noisy = random_sign(x, eps, generator=torch.Generator().manual_seed(1))
    assert torch.allclose((noisy - x).abs(), torch.full_like(x, eps), atol=1e-6)    # every pixel moved by ε
    assert {-1.0, 1.0} <= set(torch.sign(noisy - x).unique().tolist())
    assert (loss(noisy) < worst - 1.0).all()


def test_attacks_stay_in_the_ball_and_in_the_image_range():
    x = torch.tensor([0.0, 0.02, 0.5, 0.99, 1.0]).view(1, 1, 1, 5)
    loss = lambda v: (v * torch.tensor([-1.0, 1.0, 1.0, 1.0, 1.0]).view(1, 1, 1, 5)).flatten(1).sum(-1)
    for adv in (fgsm(loss, x, 0.05), pgd_linf(loss, x, 0.05, steps=3), random_sign(x, 0.05)):
        assert ((adv - x).abs() <= 0.05 + 1e-6).all() and adv.min() >= 0 and adv.max() <= 1
