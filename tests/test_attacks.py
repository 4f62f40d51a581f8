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


# ---- ℓ2 PGD, restarts, APGD (issue #32) -----------------------------------------------------------------------------
import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lit_robust.attacks import (apgd, apgd_ce, apgd_checkpoints, apgd_halve, apgd_targeted, dlr_loss,  # noqa: E402
                                margin_loss, pgd, pgd_restarts, robust_correct, targeted_dlr_loss)


def test_l2_pgd_reaches_the_l2_worst_case_of_a_linear_loss():
    """The ℓ2 worst case of w·x in the ball is x + ε·w/‖w‖₂ (reached exactly from x: every step is along w). A stub
    returning x, random noise, a step against the gradient or an ℓ∞ step (sign) ends elsewhere; ‖δ‖₂ ≤ ε."""
    w, x, loss = linear_setup()
    eps = 0.3
    adv = pgd(loss, x, eps, steps=10, norm="l2", random_init=False)
    unit = w / w.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    assert torch.allclose(adv, x + eps * unit, atol=2e-3)
    assert ((adv - x).flatten(1).norm(dim=1) <= eps + 1e-5).all()


def test_restarts_keep_each_samples_best_start():
    """With no ascent steps PGD returns its random start, so three restarts must return, per sample, the start of
    highest score among the three a generator with the same seed draws; a stub keeping the first or last restart
    (or the mean) does not."""
    w, x, loss = linear_setup()
    starts = [pgd(loss, x, 0.1, steps=0, generator=g) for g in [torch.Generator().manual_seed(5)] * 3]
    scores = torch.stack([loss(s) for s in starts])
    best = torch.stack(starts)[scores.argmax(0), torch.arange(len(x))]
    chosen = pgd_restarts(loss, x, 0.1, restarts=3, generator=torch.Generator().manual_seed(5), steps=0)
    assert torch.equal(chosen, best)
    assert not all(torch.equal(best, s) for s in starts)   # the samples did not all prefer the same restart


def test_dlr_losses_match_equations_6_and_7():
    """Hand values: logits (3, 1, 0, -1) with y = 1, t = 0: DLR = (3 − 1)/(3 − 0) (Eq. 6 negated), targeted DLR =
    (3 − 1)/(3 − (0 − 1)/2) (Eq. 7 negated); a correctly classified sample has a negative DLR."""
    logits, y = torch.tensor([[3.0, 1.0, 0.0, -1.0]]), torch.tensor([1])
    assert dlr_loss(logits, y).item() == pytest.approx(2 / 3)
    assert targeted_dlr_loss(logits, y, torch.tensor([0])).item() == pytest.approx(2 / 3.5)
    assert dlr_loss(logits, torch.tensor([0])).item() == pytest.approx(-2 / 3)
    assert margin_loss(logits, y).item() == 2.0
    assert torch.allclose(dlr_loss(5 * logits + 7, y), dlr_loss(logits, y))   # scale and shift invariant


def test_apgd_checkpoints_and_step_halving_follow_section_3_2():
    """The checkpoints of N = 100 (AutoAttack's), and the two halving conditions, each alone and neither."""
    assert apgd_checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]
    improved = torch.tensor([5.0, 20.0, 20.0])
    unchanged = torch.tensor([False, True, False])
    halve = apgd_halve(improved, 22, unchanged, unchanged)
    assert halve.tolist() == [True, True, False]   # too few increases; step and best both unchanged; neither


@pytest.fixture(scope="module")
def trained_mlp():
    """A small MLP trained in well under a second on 10 classes of noisy 8×8 prototypes in [0, 1] (no dataset import: fast);
    it classifies its 128 evaluation images almost perfectly."""
    g = torch.Generator().manual_seed(0)
    prototypes = 0.3 + 0.4 * torch.rand(10, 1, 8, 8, generator=g)
    y = torch.arange(256) % 10
    x = (prototypes[y] + 0.1 * torch.randn(256, 1, 8, 8, generator=g)).clamp(0, 1)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    for _ in range(100):   # plain gradient descent: torch.optim's first step imports torch._dynamo (seconds)
        net.zero_grad()
        F.cross_entropy(net(x), y).backward()
        with torch.no_grad():
            for parameter in net.parameters():
                parameter -= 0.5 * parameter.grad
    return net.eval(), x[:128], y[:128]


def test_attacks_on_a_trained_model_raise_the_loss_beyond_random_noise_stay_valid_and_are_seeded(trained_mlp):
    """PGD (ℓ∞, ℓ2), APGD-CE and APGD-T each raise the cross-entropy above the clean one and above random ±ε
    noise, and misclassify more than noise; stay in the ε-ball and [0, 1]; repeat exactly under the same seed. An
    identity, random or sign-flipped attack fails the first two."""
    net, x, y = trained_mlp
    ce = lambda v: F.cross_entropy(net(v), y, reduction="none")  # noqa: E731
    eps = 0.1
    noise = random_sign(x, eps, generator=torch.Generator().manual_seed(0))
    seeded = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    attacks = {"pgd": lambda: pgd(ce, x, eps, steps=10, generator=seeded()),
               "pgd_l2": lambda: pgd(ce, x, 1.0, steps=10, norm="l2", generator=seeded()),
               "apgd_ce": lambda: apgd_ce(net, x, y, eps, steps=10, generator=seeded()),
               "apgd_t": lambda: apgd_targeted(net, x, y, eps, steps=10, num_targets=2, generator=seeded())}
    with torch.no_grad():
        wrong_noise = (net(noise).argmax(1) != y).float().mean()
    for name, attack in attacks.items():
        adv = attack()
        with torch.no_grad():
            assert ce(adv).mean() > ce(x).mean() + 0.5 and ce(adv).mean() > ce(noise).mean() + 0.5, name
            assert (net(adv).argmax(1) != y).float().mean() > wrong_noise + 0.2, name
        delta = (adv - x).flatten(1)
        radius = 1.0 if name == "pgd_l2" else eps
        assert (delta.norm(dim=1) if name == "pgd_l2" else delta.abs().amax(1)).max() <= radius + 1e-5, name
        assert adv.min() >= 0 and adv.max() <= 1, name
        assert torch.equal(adv, attack()), name


def test_apgd_is_at_least_as_strong_as_pgd_at_equal_iterations(trained_mlp):
    """At 10 iterations, APGD-CE's cross-entropy is at least PGD's (it returns its best point; Croce & Hein Fig. 1)
    and it misclassifies no fewer images; APGD-T (2 targets × 10) finds at least as many as APGD-CE. A stub APGD
    (returning its random start or x) fails."""
    net, x, y = trained_mlp
    ce = lambda v: F.cross_entropy(net(v), y, reduction="none")  # noqa: E731
    eps = 0.06
    with torch.no_grad():
        wrong = lambda v: (net(v).argmax(1) != y).float().mean().item()  # noqa: E731
    by_pgd = pgd(ce, x, eps, steps=10, generator=torch.Generator().manual_seed(1))
    by_apgd = apgd(ce, x, eps, steps=10, generator=torch.Generator().manual_seed(1))
    by_apgd_t = apgd_targeted(net, x, y, eps, steps=10, num_targets=2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert ce(by_apgd).mean() >= ce(by_pgd).mean()
    assert wrong(by_apgd) >= wrong(by_pgd) > wrong(x)
    assert wrong(by_apgd_t) >= wrong(by_apgd) - 1 / len(x)


def test_robust_correct_is_clean_correct_and_unbroken_by_each_attack(trained_mlp):
    """Each attack's column is a subset of the clean one and strictly smaller at ε = 0.1 (an attack that did nothing
    would keep every clean-correct image)."""
    net, x, y = trained_mlp
    correct = robust_correct(net, x, y, 0.1, pgd_steps=5, apgd_steps=5, num_targets=1,
                             generator=torch.Generator().manual_seed(0))
    assert set(correct) == {"clean", "pgd", "apgd-ce", "apgd-t"}
    for attack in ("pgd", "apgd-ce", "apgd-t"):
        assert not (correct[attack] & ~correct["clean"]).any()
        assert correct[attack].sum() < correct["clean"].sum()


def test_square_attack_beats_random_noise_without_gradients_and_stays_valid(trained_mlp):
    """Square's random search (no gradient) misclassifies far more than random ±ε noise of the same size, and its
    points stay in the ε-ball and [0, 1]. A stub returning its stripes start, or accepting every proposal, fails the
    first; a window outside the ball fails the second. The schedule halves p at iterations 1, 5, 20, … of 1000."""
    from lit_robust.attacks import square_fraction, square_linf

    net, x, y = trained_mlp
    assert [square_fraction(i, 1000) for i in (0, 1, 5, 20)] == [0.05, 0.05, 0.025, 0.0125]
    adv = square_linf(net, x, y, 0.1, steps=200, p_init=0.3, generator=torch.Generator().manual_seed(0))
    noise = random_sign(x, 0.1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        wrong = lambda v: (net(v).argmax(1) != y).float().mean().item()  # noqa: E731
        assert wrong(adv) > wrong(noise) + 0.3
    assert (adv - x).abs().max() <= 0.1 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
