"""Behaviour of the latent re-evaluation of Algorithm 2 (thesis 004 ch. 5): ``latent_langevin`` and
``restoration_gain`` on models whose posterior is known in closed form (issue #29)."""
import torch

from lit_robust.functional.ood_adversarial import latent_langevin, restoration_gain


def test_latent_langevin_matches_the_closed_form_moments_on_a_gaussian():
    """On log p(z) = −‖z − m‖²/(2s²) one move z ← z + (h²/2)∇log p + h·ξ is the linear Gaussian recursion
    z − m ← (1 − a)(z − m) + h·ξ with a = h²/(2s²), so after n moves from z₀ the rows have mean m + (1 − a)ⁿ(z₀ − m)
    and variance h²(1 − (1 − a)²ⁿ)/(1 − (1 − a)²) — computed here. The sample mean must match within 5 standard
    errors and the variance within 5 of its standard errors, and a few moves (n = 3) must still be off the mode by the
    predicted amount. Catches an identity chain (stays at z₀), a flipped gradient sign (runs away from m), a missing
    or doubled noise term (wrong variance) and random output (shown failing with each of these edits to the
    update line)."""
    m, s, h = torch.tensor([1.0, -2.0, 0.5]), 0.5, 0.3
    a = h ** 2 / (2 * s ** 2)
    rows = 4000
    z0 = torch.full((rows, 3), 3.0)

    def log_joint(z):
        return -(z - m).pow(2).sum(-1) / (2 * s ** 2)

    for n in (3, 25):
        z = latent_langevin(log_joint, z0, n, h, torch.Generator().manual_seed(n))
        mean = m + (1 - a) ** n * (z0[0] - m)
        var = h ** 2 * (1 - (1 - a) ** (2 * n)) / (1 - (1 - a) ** 2)
        assert z.shape == z0.shape
        assert ((z.mean(0) - mean).abs() < 5 * (var / rows) ** 0.5).all(), (n, z.mean(0), mean)
        assert ((z.var(0) / var - 1).abs() < 5 * (2 / rows) ** 0.5).all(), (n, z.var(0), var)


def test_latent_langevin_is_reproducible_from_its_generator():
    """Same generator seed, same chain; another seed, another chain. Catches noise drawn from the global RNG."""
    log_joint = lambda z: -z.pow(2).sum(-1)
    z0 = torch.ones(5, 2)
    a, b = (latent_langevin(log_joint, z0, 4, 0.1, torch.Generator().manual_seed(0)) for _ in range(2))
    c = latent_langevin(log_joint, z0, 4, 0.1, torch.Generator().manual_seed(1))
    torch.manual_seed(123)
    assert torch.equal(a, b) and not torch.equal(a, c)


def _linear_gaussian_model(images: int = 16, side: int = 16, latent: int = 4, noise: float = 0.1):
    """x = 0.5 + B z (B: orthogonal columns of norm 2), z ~ N(0, I), x | z ~ N(0.5 + Bz, σ²I): the posterior of z
    given x is Gaussian, concentrated (σ = 0.1) at ≈ the z that generated x."""
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(side * side, latent, generator=g))[0] * 2.0
    decode = lambda z: (0.5 + z @ basis.T).view(-1, 1, side, side)
    z_true = torch.randn(images, latent, generator=g)
    x = decode(z_true)

    def log_joint(z):
        return -0.5 * z.pow(2).sum(-1) - (decode(z) - x).pow(2).flatten(1).sum(-1) / (2 * noise ** 2)

    return decode, log_joint, x, z_true


def test_restoration_gain_is_larger_for_a_perturbed_latent_than_for_a_clean_one():
    """Algorithm 2 on a linear-Gaussian VAE whose exact log-joint is known: from the true code (clean input) the
    reconstruction already is x and Langevin moves it little, so the gain is small; from a code pushed off by δ
    (‖δ‖ = 3, the encoder fooled) the reconstruction is far from x and Langevin pulls the code back to the posterior,
    so the restored image is closer to x and the gain is larger — for every image. Also the exact values
    γ(x, x, x) = 0 and gain(x, r, x) = gain(x, x, r). Catches an identity chain (gain 0 for both), a flipped
    gradient sign (restored not closer to x), a gain without the abs or with its sign flipped, and a constant or
    random gain (shown failing with each stub)."""
    decode, log_joint, x, z_true = _linear_gaussian_model()
    delta = torch.randn(z_true.shape, generator=torch.Generator().manual_seed(1))
    z_bad = z_true + 3 * delta / delta.norm(dim=1, keepdim=True)
    gains = {}
    for name, z_enc in (("clean", z_true), ("perturbed", z_bad)):
        reconstruction = decode(z_enc)
        restored = decode(latent_langevin(log_joint, z_enc, 30, 0.05, torch.Generator().manual_seed(2)))
        gains[name] = restoration_gain(x, reconstruction, restored)
        if name == "perturbed":
            assert ((restored - x).flatten(1).norm(dim=1) < (reconstruction - x).flatten(1).norm(dim=1)).all()
    assert gains["clean"].shape == (len(x),)
    assert (gains["perturbed"] > gains["clean"]).all(), gains
    torch.testing.assert_close(restoration_gain(x, x, x), torch.zeros(len(x)), atol=1e-6, rtol=0)
    far = decode(z_bad)
    torch.testing.assert_close(restoration_gain(x, far, x), restoration_gain(x, x, far))
    assert (restoration_gain(x, far, x) > 0).all()
