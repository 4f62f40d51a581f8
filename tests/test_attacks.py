"""The attacks of ``lit_robust.functional.attacks`` against losses whose answer is known — a linear loss (worst case x + ε·sign(w),
or x + ε·w/‖w‖₂), one-pixel quadratics (APGD against a transcription of Croce & Hein's Alg. 1) — and against a small
trained MLP (stronger than random noise, seeded, inside the ball and [0, 1])."""
import pytest
import torch
import torch.nn.functional as F

import lit_robust.functional.attacks as attacks
from lit_robust.functional.attacks import (apgd, apgd_ce, apgd_checkpoints, apgd_halve, apgd_targeted, dlr_loss, fgsm,
                                           margin_loss, pgd, pgd_linf, pgd_restarts, project, random_sign,
                                           random_squares, random_start, robust_correct, square_fraction, square_linf,
                                           square_side, steepest_ascent, targeted_dlr_loss)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


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
    noisy = random_sign(x, eps, generator=seeded(1))
    assert torch.allclose((noisy - x).abs(), torch.full_like(x, eps), atol=1e-6)    # every pixel moved by ε
    assert {-1.0, 1.0} <= set(torch.sign(noisy - x).unique().tolist())
    assert (loss(noisy) < worst - 1.0).all()


def test_attacks_stay_in_the_ball_and_in_the_image_range():
    x = torch.tensor([0.0, 0.02, 0.5, 0.99, 1.0]).view(1, 1, 1, 5)
    loss = lambda v: (v * torch.tensor([-1.0, 1.0, 1.0, 1.0, 1.0]).view(1, 1, 1, 5)).flatten(1).sum(-1)
    for adv in (fgsm(loss, x, 0.05), pgd_linf(loss, x, 0.05, steps=3), random_sign(x, 0.05)):
        assert ((adv - x).abs() <= 0.05 + 1e-6).all() and adv.min() >= 0 and adv.max() <= 1


# ---- ℓ2 PGD, restarts, APGD (issue #32) -----------------------------------------------------------------------------
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
    starts = [pgd(loss, x, 0.1, steps=0, generator=g) for g in [seeded(5)] * 3]
    scores = torch.stack([loss(s) for s in starts])
    best = torch.stack(starts)[scores.argmax(0), torch.arange(len(x))]
    chosen = pgd_restarts(loss, x, 0.1, restarts=3, generator=seeded(5), steps=0)
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
    g = seeded(0)
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
    noise = random_sign(x, eps, generator=seeded(0))
    attacks = {"pgd": lambda: pgd(ce, x, eps, steps=10, generator=seeded(3)),
               "pgd_l2": lambda: pgd(ce, x, 1.0, steps=10, norm="l2", generator=seeded(3)),
               "apgd_ce": lambda: apgd_ce(net, x, y, eps, steps=10, generator=seeded(3)),
               "apgd_t": lambda: apgd_targeted(net, x, y, eps, steps=10, num_targets=2, generator=seeded(3))}
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
    by_pgd = pgd(ce, x, eps, steps=10, generator=seeded(1))
    by_apgd = apgd(ce, x, eps, steps=10, generator=seeded(1))
    by_apgd_t = apgd_targeted(net, x, y, eps, steps=10, num_targets=2, generator=seeded(1))
    with torch.no_grad():
        assert ce(by_apgd).mean() >= ce(by_pgd).mean()
    assert wrong(by_apgd) >= wrong(by_pgd) > wrong(x)
    assert wrong(by_apgd_t) >= wrong(by_apgd) - 1 / len(x)


def test_robust_correct_is_clean_correct_and_unbroken_by_each_attack(trained_mlp):
    """Each attack's column is a subset of the clean one and strictly smaller at ε = 0.1 (an attack that did nothing
    would keep every clean-correct image)."""
    net, x, y = trained_mlp
    correct = robust_correct(net, x, y, 0.1, pgd_steps=5, apgd_steps=5, num_targets=1,
                             generator=seeded(0))
    assert set(correct) == {"clean", "pgd", "apgd-ce", "apgd-t"}
    for attack in ("pgd", "apgd-ce", "apgd-t"):
        assert not (correct[attack] & ~correct["clean"]).any()
        assert correct[attack].sum() < correct["clean"].sum()


def test_square_attack_beats_random_noise_without_gradients_and_stays_valid(trained_mlp):
    """Square's random search (no gradient) misclassifies far more than random ±ε noise of the same size, and its
    points stay in the ε-ball and [0, 1]. A stub returning its stripes start, or accepting every proposal, fails the
    first; a window outside the ball fails the second. The schedule halves p at iterations 1, 5, 20, … of 1000."""
    net, x, y = trained_mlp
    assert [square_fraction(i, 1000) for i in (0, 1, 5, 20)] == [0.05, 0.05, 0.025, 0.0125]
    adv = square_linf(net, x, y, 0.1, steps=200, p_init=0.3, generator=seeded(0))
    noise = random_sign(x, 0.1, generator=seeded(0))
    with torch.no_grad():
        wrong = lambda v: (net(v).argmax(1) != y).float().mean().item()  # noqa: E731
        assert wrong(adv) > wrong(noise) + 0.3
    assert (adv - x).abs().max() <= 0.1 + 1e-6 and adv.min() >= 0 and adv.max() <= 1


# ---- random starts, projection, PGD's step and start, APGD against Alg. 1, robust_correct, Square's geometry -------


def test_random_starts_are_uniform_in_the_ball_and_seeded():
    """ℓ∞: each pixel uniform in [x − ε, x + ε] (mean 0, standard deviation ε/√3, both ends reached). ℓ2: a
    Gaussian direction at a uniform radius (mean radius ε/2, never outside the ball, not ±r on every pixel). The same
    generator seed gives the same start."""
    x = torch.full((4, 1, 64, 64), 0.5)
    u = (random_start(x, 0.1, "linf", seeded(0)) - x) / 0.1
    assert u.abs().max() <= 1 + 1e-6 and u.min() < -0.99 and u.max() > 0.99
    assert abs(u.mean().item()) < 0.02 and abs(u.std().item() - 3 ** -0.5) < 0.02
    assert torch.equal(random_start(x, 0.1, "linf", seeded(0)), random_start(x, 0.1, "linf", seeded(0)))
    x = torch.full((2000, 1, 4, 4), 0.5)
    delta = random_start(x, 0.2, "l2", seeded(0)) - x
    radius = delta.flatten(1).norm(dim=1)
    assert radius.max() <= 0.2 + 1e-6 and abs(radius.mean().item() - 0.1) < 0.01
    per_pixel = delta.abs() / radius.view(-1, 1, 1, 1)                # each sample's |δ| over its radius
    assert per_pixel.mean(0).std() < 0.01 and (per_pixel.std(dim=(1, 2, 3)) > 0.05).all()   # isotropic, not ±r


def test_projection_leaves_points_inside_the_ball_where_they_are():
    """P_S is the identity inside the ball (ℓ2 and ℓ∞) and puts outside points on its boundary."""
    x = torch.full((3, 1, 4, 4), 0.5)
    direction = torch.randn(3, 1, 4, 4, generator=seeded(1))
    unit = direction / direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    for radius in (0.05, 0.09):
        assert torch.allclose(project(x + radius * unit, x, 0.1, "l2"), x + radius * unit, atol=1e-7)
    assert torch.allclose((project(x + 0.3 * unit, x, 0.1, "l2") - x).flatten(1).norm(dim=1), torch.full((3,), 0.1))
    inside = x + 0.05 * direction.clamp(-1, 1)
    assert torch.equal(project(inside, x, 0.1, "linf"), inside)


def quadratic(c: torch.Tensor):
    """The per-sample loss −‖v − c‖², maximal at c: sign steps overshoot it and oscillate around it."""
    return lambda v: -((v - c) ** 2).flatten(1).sum(1)


def test_pgd_takes_steps_of_2_5_eps_over_steps_from_x_or_from_a_given_start():
    """Around an optimum 0.3ε from x, PGD-5 without a random start alternates x + α, x, x + α, …: it ends at
    x + α with α = 2.5ε/5 = 0.5ε. A given start is projected into the ball and the ascent starts from it."""
    x, eps = torch.full((1, 1, 1, 1), 0.5, dtype=torch.float64), 0.125
    loss = quadratic(x + 0.3 * eps)
    assert pgd(loss, x, eps, steps=5, random_init=False).item() == 0.5 + 0.5 * eps
    assert pgd(loss, x, eps, steps=0, start=x + 1.0).item() == 0.5 + eps
    assert pgd(loss, x, eps, 0.25 * eps, steps=1, start=x + 1.0).item() == 0.5 + 0.75 * eps   # from x: 0.5 + 0.25ε
    far = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    far[..., 0, 0], far[..., 0, 1] = 0.3, 0.4        # ‖·‖₂ = 0.5: scaled by 0.2/0.5 (ℓ∞ would clip to 0.2, 0.2)
    start = pgd(quadratic(x), x.expand(1, 1, 2, 2), 0.2, steps=0, norm="l2", start=x + far)
    assert torch.allclose(start - x, 0.4 * far, atol=1e-12)
    start = pgd(quadratic(x), x.expand(1, 1, 2, 2), 0.2, steps=0, start=x + far)           # ℓ∞: clipped per pixel
    assert torch.allclose(start - x, far.clamp(max=0.2), atol=1e-12)


def test_the_l2_direction_has_unit_length_whatever_the_gradients_scale():
    grad = torch.randn(3, 1, 4, 4, generator=seeded(0))
    for scale in (1e-3, 1.0, 1e3):
        direction = steepest_ascent(scale * grad, "l2")
        assert torch.allclose(direction.flatten(1).norm(dim=1), torch.ones(3)), scale
    assert torch.equal(steepest_ascent(grad, "linf"), grad.sign())


def test_pgd_linf_is_seeded_pgd_from_a_random_start():
    """:func:`pgd_linf` is ℓ∞ :func:`pgd` with the generator passed through; it starts at a random point by default."""
    x = torch.full((8, 1, 4, 4), 0.5)
    loss = quadratic(x + 0.02)
    assert torch.equal(pgd_linf(loss, x, 0.1, steps=3, generator=seeded(4)),
                       pgd(loss, x, 0.1, steps=3, generator=seeded(4)))
    assert torch.equal(pgd_linf(loss, x, 0.1, steps=0, generator=seeded(4)), random_start(x, 0.1, "linf", seeded(4)))
    assert torch.equal(pgd_linf(loss, x, 0.1, 0.01, steps=3, generator=seeded(4)),
                       pgd(loss, x, 0.1, 0.01, steps=3, generator=seeded(4)))


def test_random_sign_moves_every_pixel_by_eps_within_the_image_range_and_is_seeded():
    x = torch.ones(1, 1, 16, 16)
    noisy = random_sign(x, 0.25, generator=seeded(1))
    assert set(noisy.unique().tolist()) == {0.75, 1.0}     # +ε clipped at 1, −ε kept
    assert torch.equal(random_sign(x, 0.25, generator=seeded(1)), noisy)
    assert not torch.equal(random_sign(x, 0.25, generator=seeded(2)), noisy)


def apgd_reference(f, df, x: float, start: float, eps: float, steps: int, alpha: float = 0.75, rho: float = 0.75):
    """Croce & Hein 2020, Alg. 1, for a single pixel in Python floats (ℓ∞, inside [0, 1]): the step η starts at 2ε,
    momentum α mixes the projected step with the last move, and at a checkpoint w_j where fewer than ρ·(w_j − w_{j−1})
    of the steps i = w_{j−1} … w_j − 1 raised f (f(x(i+1)) > f(x(i))), or neither η nor f_max changed since w_{j−1},
    η halves and x(k+1) ← x_max. Returns x_max and every point at which f is evaluated."""
    def ball(v):
        return min(max(x + min(max(v - x, -eps), eps), 0.0), 1.0)

    def sign(g):
        return (g > 0) - (g < 0)

    eta = 2 * eps
    points = [start, ball(start + eta * sign(df(start)))]       # x(0), x(1)
    visited = list(points)
    best = points[1] if f(points[1]) > f(points[0]) else points[0]
    last, eta_then, f_best_then = 0, eta, f(best)
    checkpoints = apgd_checkpoints(steps)
    for k in range(1, steps):
        z = ball(points[k] + eta * sign(df(points[k])))
        points.append(ball(points[k] + alpha * (z - points[k]) + (1 - alpha) * (points[k] - points[k - 1])))
        visited.append(points[k + 1])
        if f(points[k + 1]) > f(best):
            best = points[k + 1]
        if k in checkpoints:
            increases = sum(f(points[i + 1]) > f(points[i]) for i in range(last, k))
            halve = increases < rho * (k - last) or (eta == eta_then and f(best) == f_best_then)
            eta_then, f_best_then = eta, f(best)
            if halve:
                eta, points[k + 1] = eta / 2, best
                visited.append(best)
            last = k
    return best, visited


def without_repeats(points):
    return [p for i, p in enumerate(points) if i == 0 or p != points[i - 1]]


def test_apgd_follows_algorithm_1_point_by_point():
    """On one-pixel concave quadratics (optimum inside the ball, near its edge, beyond it) the batched APGD evaluates
    the same points, in the same order, as the scalar transcription of Alg. 1 above and returns its x_max: initial
    step 2ε, momentum 0.75, the two halving conditions, the restart from x_max. (The batched code re-evaluates a
    sample's current point when another one restarts: repeated points are dropped on both sides.)"""
    x, eps, steps = 0.5, 0.125, 30
    optima = torch.tensor([0.53, 0.47, 0.61, 0.9], dtype=torch.float64)
    batch = torch.full((len(optima), 1, 1, 1), x, dtype=torch.float64)
    visited = []

    def loss(v):
        visited.append(v.detach().flatten().tolist())
        return quadratic(optima.view(-1, 1, 1, 1))(v)

    best = apgd(loss, batch, eps, steps, generator=seeded(7)).flatten().tolist()
    starts = random_start(batch, eps, "linf", seeded(7)).flatten().tolist()
    distinct = []
    for i, c in enumerate(optima.tolist()):
        expected_best, expected = apgd_reference(lambda v: -(v - c) ** 2, lambda v: -2 * (v - c), x, starts[i], eps,
                                                 steps)
        assert without_repeats([point[i] for point in visited]) == without_repeats(expected), c
        assert best[i] == expected_best, c
        distinct.append(len(without_repeats(expected)))
    assert min(distinct[:3]) > 20 and distinct[3] == 2   # the inner optima are searched for; 0.9 stays at x + ε


def test_apgd_checkpoints_round_up_and_halving_needs_fewer_increases_than_rho_times_the_interval():
    """w_j = ⌈p_j·N⌉ at N = 30 (0.41·30 = 12.3 → 13, not 12); ρ·interval = 0.75·20 = 15 increases are enough not to
    halve; an unchanged step with a changed best is not Condition 2."""
    assert apgd_checkpoints(30) == [0, 7, 13, 18, 21, 24, 27, 28, 30]
    enough, unchanged, changed = torch.tensor([15.0]), torch.tensor([True]), torch.tensor([False])
    assert apgd_halve(enough, 20, unchanged, changed).tolist() == [False]
    assert apgd_halve(enough, 20, changed, unchanged).tolist() == [False]
    assert apgd_halve(torch.tensor([14.0]), 20, changed, changed).tolist() == [True]


def test_apgd_ce_is_apgd_on_each_images_cross_entropy_in_either_norm(trained_mlp):
    net, x, y = trained_mlp
    ce = lambda v: F.cross_entropy(net(v), y, reduction="none")  # noqa: E731
    for norm, eps in (("linf", 0.06), ("l2", 0.5)):
        adv = apgd_ce(net, x, y, eps, steps=5, norm=norm, generator=seeded(2))
        assert torch.equal(adv, apgd(ce, x, eps, steps=5, norm=norm, generator=seeded(2))), norm
    assert (adv - x).flatten(1).norm(dim=1).max() <= 0.5 + 1e-5 and (adv - x).abs().max() > 0.06   # an ℓ2 ball


def test_apgd_targeted_tries_the_least_likely_class_when_asked_for_every_target():
    """A linear model of 4 classes on 8 pixels at 0.5: class 0 is predicted; only class 3, the least likely at the
    clean input (logit 0.3 vs 1.0, 0.5, 0.4), can overtake it within ε = 0.125 (8·0.625 − 3.7 = 1.3). Two targets
    (classes 1 and 2) fail, three succeed, and asking for more than the 3 wrong classes means all 3."""
    weights = torch.zeros(4, 8)
    weights[3] = 1.0
    bias = torch.tensor([1.0, 0.5, 0.4, -3.7])
    logits = lambda v: v.flatten(1) @ weights.T + bias  # noqa: E731
    x, y = torch.full((1, 1, 1, 8), 0.5), torch.tensor([0])
    predicted = {k: logits(apgd_targeted(logits, x, y, 0.125, steps=10, num_targets=k, generator=seeded(0))).argmax(1)
                 for k in (2, 3, 9)}
    assert predicted[2].item() == 0 and predicted[3].item() == 3 and predicted[9].item() == 3


def test_robust_correct_counts_what_each_attack_leaves_correct_and_cascades_apgd_t(trained_mlp):
    """The "pgd" column is whether PGD-k with restarts (kept by the margin) leaves each clean-correct image correct,
    under the same seed; "apgd-t" only attacks what APGD-CE left correct, so it is a subset of "apgd-ce"; an attack
    that is not one of the three is refused by name."""
    net, x, y = trained_mlp
    eps, steps = 0.08, 5
    correct = robust_correct(net, x, y, eps, pgd_steps=steps, apgd_steps=steps, num_targets=1, generator=seeded(0))
    clean = correct["clean"].nonzero()[:, 0]
    ce = lambda v: F.cross_entropy(net(v), y[clean], reduction="none")  # noqa: E731
    adv = pgd_restarts(ce, x[clean], eps, 1, lambda v: margin_loss(net(v), y[clean]), seeded(0), steps=steps)
    expected = torch.zeros_like(correct["clean"])
    expected[clean] = net(adv).argmax(1) == y[clean]
    assert torch.equal(correct["pgd"], expected) and 0 < expected.sum() < len(clean)
    assert not (correct["apgd-t"] & ~correct["apgd-ce"]).any()
    alone = robust_correct(net, x, y, eps, apgd_steps=steps, num_targets=1, attacks=("apgd-t",), generator=seeded(0))
    assert (alone["apgd-t"] & ~correct["apgd-ce"]).any()     # without the cascade APGD-T misses some APGD-CE found
    with pytest.raises(ValueError, match="'fab'"):
        robust_correct(net, x, y, eps, attacks=("pgd", "fab"))


def test_robust_correct_runs_apgd_ce_in_the_given_norm_with_the_given_generator(trained_mlp):
    net, x, y = trained_mlp
    for norm, eps in (("linf", 0.08), ("l2", 0.8)):
        correct = robust_correct(net, x, y, eps, norm, apgd_steps=5, attacks=("apgd-ce",), generator=seeded(1))
        clean = correct["clean"].nonzero()[:, 0]
        adv = apgd_ce(net, x[clean], y[clean], eps, 5, norm, seeded(1))
        assert torch.equal(correct["apgd-ce"][clean], net(adv).argmax(1) == y[clean]), norm
        assert 0 < correct["apgd-ce"].sum() < len(clean), norm
    run = lambda: robust_correct(net, x, y, 0.08, apgd_steps=5, num_targets=2, generator=seeded(1))  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(run().values(), run().values()))


def test_square_schedule_sides_and_windows():
    """p halves after iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 of 10,000; the side is √(p·h·w)
    rounded, between 1 and h − 1; each window is a side × side square and every position inside the image is drawn."""
    thresholds = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
    assert [square_fraction(t, 10000, 0.8) for t in thresholds] == [0.8 / 2 ** j for j in range(9)]
    assert [square_fraction(t + 1, 10000, 0.8) for t in thresholds] == [0.8 / 2 ** j for j in range(1, 10)]
    assert square_side(0, 1000, 0.05, 28, 28) == 6 and square_side(0, 1000, 1.0, 28, 28) == 27
    assert square_side(9999, 10000, 0.05, 28, 28) == 1 and square_side(0, 100, 0.25, 8, 32) == 7
    assert square_side(0, 100, 0.02, 10, 40) == 3       # √(0.02·400) = 2.8
    masks = random_squares(3000, 8, 10, 3, seeded(0))
    rows, cols = masks.any(2), masks.any(1)
    assert (masks.sum((1, 2)) == 9).all() and (rows.sum(1) == 3).all() and (cols.sum(1) == 3).all()
    assert set(rows.float().argmax(1).tolist()) == set(range(6)) and set(cols.float().argmax(1).tolist()) == set(range(8))


def test_square_attack_is_seeded(trained_mlp):
    net, x, y = trained_mlp
    run = lambda seed: square_linf(net, x, y, 0.1, steps=20, p_init=0.3, generator=seeded(seed))  # noqa: E731
    assert torch.equal(run(0), run(0)) and not torch.equal(run(0), run(1))
    binary = (x > 0.5).float()                       # pixels at 0 and 1: both ends of [0, 1] clip
    adv = square_linf(net, binary, y, 0.1, steps=20, p_init=0.3, generator=seeded(0))
    assert adv.min() == 0 and adv.max() == 1 and (adv - binary).abs().max() <= 0.1 + 1e-6


def halving_inputs(monkeypatch, scripted_losses, steps=30, rho=0.75):
    """Runs APGD on one image whose loss at the i-th evaluation is ``scripted_losses(i)`` (zero gradient: the point
    stays put) and returns what each checkpoint passed to :func:`apgd_halve`."""
    seen, calls = [], []

    def spy(improved, interval, step_unchanged, best_unchanged, rho):
        seen.append((improved.item(), interval, step_unchanged.item(), best_unchanged.item(), rho))
        return apgd_halve(improved, interval, step_unchanged, best_unchanged, rho)

    def loss(v):
        calls.append(len(calls))
        return 0 * v.flatten(1).sum(1) + scripted_losses(len(calls) - 1)

    monkeypatch.setattr(attacks, "apgd_halve", spy)
    apgd(loss, torch.full((1, 1, 2, 2), 0.5), 0.1, steps, rho=rho, generator=seeded(0))
    return seen


def test_apgd_feeds_the_halving_rule_the_increases_of_each_interval(monkeypatch):
    """At the checkpoints 7, 13, 18, 21, 24, 27, 28 of N = 30: a loss that rises at every evaluation counts every
    step of the interval as an increase, with the best loss changing and the step kept; a constant loss counts none,
    halves at every checkpoint, so from the second one on the step has changed and the best loss has not. ρ is
    passed through."""
    intervals = [7, 6, 5, 3, 3, 3, 1]
    rising = halving_inputs(monkeypatch, float)     # the i-th evaluation's loss is i
    assert rising == [(float(n), n, True, False, 0.75) for n in intervals]
    constant = halving_inputs(monkeypatch, lambda i: 0.0, rho=0.5)
    assert constant == [(0.0, n, i == 0, True, 0.5) for i, n in enumerate(intervals)]


def test_l2_apgd_and_apgd_t_stay_in_the_l2_ball_and_reach_the_linear_worst_case(trained_mlp):
    w, x, loss = linear_setup()
    adv = apgd(loss, x, 0.3, steps=20, norm="l2", generator=seeded(0))
    unit = w / w.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    assert torch.allclose(adv, x + 0.3 * unit, atol=2e-3)
    net, images, labels = trained_mlp
    adv = apgd_targeted(net, images, labels, 0.5, steps=5, norm="l2", num_targets=2, generator=seeded(0))
    assert (adv - images).flatten(1).norm(dim=1).max() <= 0.5 + 1e-5 and (adv - images).abs().max() > 0.06
