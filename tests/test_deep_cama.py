"""Deep CAMA: the equations on tensors, the selective fine-tuning, and a tiny end-to-end report on 8×8 digits."""
import json
import math

import lightning as L
import pytest
import torch
from torch.distributions import Bernoulli, Normal, kl_divergence

from lit_robust.callbacks import AdversarialRobustnessReport, MetricsFile, ShiftRobustnessReport
from lit_robust.datamodules import DigitsDataModule, TensorImageDataset
from lit_robust.models import deep_cama
from lit_robust.models.deep_cama import DeepCAMA, bernoulli_log_likelihood, kl_to_standard_normal, log_normal
from lit_robust.models.nets import create_backbone


def tiny(**kwargs) -> DeepCAMA:
    torch.manual_seed(0)
    return DeepCAMA(img_size=8, hidden=32, dim_z=4, dim_m=3, **kwargs)


@pytest.fixture
def deterministic(monkeypatch):
    """Replace every sample by its mean, so that Monte Carlo estimates become exact functions."""
    monkeypatch.setattr(deep_cama, "reparameterise", lambda mean, logvar: mean)


def test_density_helpers_match_torch_distributions():
    x, mean, logvar = torch.randn(5, 4), torch.randn(5, 4), torch.randn(5, 4)
    std = (0.5 * logvar).exp()
    assert torch.allclose(log_normal(x, mean, logvar), Normal(mean, std).log_prob(x).sum(-1), atol=1e-5)
    assert torch.allclose(kl_to_standard_normal(mean, logvar), kl_divergence(Normal(mean, std), Normal(0, 1)).sum(-1),
                          atol=1e-5)
    logits, images = torch.randn(3, 1, 8, 8), torch.randint(0, 2, (3, 1, 8, 8)).float()
    expected = Bernoulli(logits=logits).log_prob(images).flatten(1).sum(-1)
    assert torch.allclose(bernoulli_log_likelihood(logits, images), expected, atol=1e-4)


def test_pixel_floor_bounds_each_pixels_weight():
    logits = torch.tensor([-40.0, -5.0, 0.0, 5.0, 40.0]).view(1, 1, 1, 5)
    images = torch.tensor([0.0, 0.3, 1.0, 0.0, 0.05]).view(1, 1, 1, 5)
    delta = 0.01
    p = delta + (1 - 2 * delta) * torch.sigmoid(logits)
    expected = (images * p.log() + (1 - images) * (1 - p).log()).sum()
    assert torch.allclose(bernoulli_log_likelihood(logits, images, delta), expected.view(1), atol=1e-5)
    # however confident the decoder, |∂ log p / ∂x| of a pixel stays within log((1 − δ)/δ) = 4.6 (plain: |logit| = 40)
    x = torch.zeros(1, 1, 1, 5, requires_grad=True)
    (grad,) = torch.autograd.grad(bernoulli_log_likelihood(logits, x, delta).sum(), x)
    assert grad.abs().max() <= math.log((1 - delta) / delta) + 1e-5
    assert grad.abs().max() > 4.0
    with pytest.raises(ValueError, match="pixel_floor"):
        tiny(pixel_floor=0.5)


def test_kl_warmup_weighs_only_the_kl_terms_and_reaches_one(deterministic):
    model = tiny(kl_warmup_steps=4)
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 10, (6,))
    m_mean, m_logvar = model.q_m(x)
    z_mean, z_logvar = model.q_z.head(model.q_z.features(x), model._onehot(y), m_mean)
    kl = (kl_to_standard_normal(z_mean, z_logvar) + kl_to_standard_normal(m_mean, m_logvar)).mean()
    gap = model.joint_elbo(x, y, kl_weight=0.25).mean() - model.joint_elbo(x, y).mean()
    assert gap.item() == pytest.approx(0.75 * kl.item(), rel=1e-4) and kl.item() > 0
    assert model.kl_weight() == 0.25                        # global_step 0 of 4
    assert tiny().kl_weight() == 1.0                        # no warm-up: the paper's ELBO from the first step


def test_architecture_follows_appendix_c():
    model = DeepCAMA()  # MNIST sizes
    widths = lambda net: [m.out_features for m in net if isinstance(m, torch.nn.Linear)]
    assert widths(model.decoder.nn_y) == [500, 500] and widths(model.decoder.nn_z) == [500, 500]
    assert widths(model.decoder.nn_m) == [500] * 4
    assert model.decoder.project_y.out_features == 4 * 4 * 64
    strides = [m.stride for m in model.decoder.deconv if isinstance(m, torch.nn.ConvTranspose2d)]
    assert strides == [(2, 2)] * 3
    assert model.q_m.features.out_features == 4 * 4 * 64 and model.q_z.trunk.out_features == 4 * 4 * 64
    x = torch.rand(2, 1, 28, 28)
    assert model.decoder(torch.eye(10)[:2], torch.randn(2, 64), torch.randn(2, 32)).shape == (2, 1, 28, 28)
    log_probs = model.predict_log_probs(x, num_samples=2)
    assert log_probs.shape == (2, 10)
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(2), atol=1e-5)


def test_marginal_elbo_is_logsumexp_of_joint_elbos(deterministic):
    model = tiny().eval()
    x = torch.rand(6, 1, 8, 8)
    per_class = torch.stack([model.joint_elbo(x, torch.full((6,), c)) for c in range(10)])
    assert torch.allclose(model.marginal_elbo(x), torch.logsumexp(per_class, 0), atol=1e-3)


def eq6_by_hand(model: DeepCAMA, x: torch.Tensor, m_noise: torch.Tensor, z_noise: torch.Tensor) -> torch.Tensor:
    """Eq. 6 written out with torch.distributions, one class at a time, from standard-normal draws
    ``m_noise`` (K, B, dm) and ``z_noise`` (K, C, B, dz): m^k ~ q(m|x), z_c^k ~ q(z|x, y_c, m^k),
    log p(x|y_c) ≈ log (1/K) Σ_k p(x|y_c, z_c^k, m^k) p(y_c) p(z_c^k) / q(z_c^k|x, y_c, m^k), softmax over c."""
    k, c = z_noise.shape[:2]
    m_mean, m_logvar = model.q_m(x)
    m = m_mean + (0.5 * m_logvar).exp() * m_noise
    log_px_y = []
    for label in range(c):
        y = torch.eye(c)[label].expand(len(x), c)
        z_mean, z_logvar = model.q_z.head(model.q_z.features(x), y, m)
        q_z = Normal(z_mean, (0.5 * z_logvar).exp())
        z = q_z.loc + q_z.scale * z_noise[:, label]
        log_w = (Bernoulli(logits=model.decoder(y, z, m)).log_prob(x.expand(k, *x.shape)).flatten(2).sum(-1)
                 + math.log(1 / c) + Normal(0.0, 1.0).log_prob(z).sum(-1) - q_z.log_prob(z).sum(-1))
        log_px_y.append(torch.logsumexp(log_w, 0) - math.log(k))
    return torch.log_softmax(torch.stack(log_px_y, 1), 1)


def test_bayes_prediction_is_eq_6_with_sampled_importance_weights():
    """``predict_log_probs`` against Eq. 6 by hand on the same draws (common random numbers: the global generator
    replayed, m first, then z), with real sampling; the decoder is sharpened so that the classes and samples differ.
    Catches sampling only the means, the mean of log-weights (an ELBO) instead of log-mean-exp, a missing
    p(z)/q(z|·) ratio or prior, and m drawn per class; K = 1 under two seeds must differ (the weights are sampled)."""
    model = tiny().eval()
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.mul_(2.0)
    x = (torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) > 0.6).float()
    k = 64
    with torch.no_grad():
        torch.manual_seed(1)
        predicted = model.predict_log_probs(x, k)
        torch.manual_seed(1)
        m_noise, z_noise = torch.randn(k, 4, model.hparams.dim_m), torch.randn(k, 10, 4, model.hparams.dim_z)
        by_hand = eq6_by_hand(model, x, m_noise, z_noise)
        one, other = model.predict_log_probs(x, 1), model.predict_log_probs(x, 1)
    assert torch.allclose(predicted, by_hand, atol=1e-4)
    assert (one - other).abs().max() > 0.05


def test_intervention_elbo_ignores_q_m(deterministic):
    """Eq. 3 sets do(m = 0): the inference network q(m|x) plays no part; Eq. 4 depends on it."""
    model = tiny().eval()
    x, y = torch.rand(4, 1, 8, 8), torch.arange(4)
    before_do, before_joint = model.intervention_elbo(x, y), model.joint_elbo(x, y)
    with torch.no_grad():
        for p in model.q_m.parameters():
            p.add_(0.5)
    assert torch.allclose(model.intervention_elbo(x, y), before_do)
    assert not torch.allclose(model.joint_elbo(x, y), before_joint)


def test_refined_posterior_raises_every_class_elbo_and_leaves_the_weights_alone(deterministic):
    """``refine_posterior`` ascends the ELBO of each (class, image) q(z|x, y_c, m) from the encoder's output; the
    network gets no gradients, and Eq. 6 runs with it inside inference mode (as in ``trainer.test``)."""
    model = tiny(refine_steps=20, refine_lr=0.05).eval()
    x = (torch.rand(6, 1, 8, 8) > 0.7).float()
    classes = torch.eye(10).view(1, 10, 1, 10)
    m = model.q_m(x)[0].unsqueeze(0).unsqueeze(0)

    def elbo(mean, logvar):
        return (bernoulli_log_likelihood(model.decoder(classes, mean, m), x)
                - kl_to_standard_normal(mean, logvar))

    with torch.no_grad():
        start = model.q_z.head(model.q_z.features(x), classes, m)
    refined = model.refine_posterior(x, classes, m, *start, steps=20)
    with torch.no_grad():
        gain = elbo(*refined) - elbo(*start)                                  # (1, C, B)
    assert gain.min() > 0                                                   # no refinement: gain 0
    assert all(p.grad is None for p in model.parameters())
    with torch.inference_mode():
        log_probs = model.predict_log_probs(x, 3)
    assert log_probs.shape == (6, 10) and torch.allclose(log_probs.exp().sum(-1), torch.ones(6), atol=1e-5)
    with pytest.raises(ValueError, match="refine_steps"):
        tiny(refine_steps=-1)


def test_fine_tuning_updates_only_manipulation_networks():
    model = tiny(ft_lr=1e-2, ft_batch_size=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    history = model.fine_tune(torch.rand(8, 1, 8, 8), torch.rand(8, 1, 8, 8), torch.randint(10, (8,)), steps=2)
    assert len(history) == 2 and all(math.isfinite(h) for h in history)
    tuned = {f"decoder.{net}.{k}" for net in ("nn_m", "project_m")
             for k, _ in getattr(model.decoder, net).named_parameters()}
    tuned |= {f"q_m.{k}" for k, _ in model.q_m.named_parameters()}
    for name, value in model.state_dict().items():
        changed = not torch.equal(value, before[name])
        assert changed == (name in tuned), name
    assert all(p.requires_grad for p in model.parameters())  # frozen parameters are released again


def test_bad_images_name_the_fix():
    with pytest.raises(ValueError, match="img_size"):
        tiny().predict_log_probs(torch.rand(2, 1, 28, 28))
    with pytest.raises(ValueError, match="lam"):
        DeepCAMA(lam=1.5)


def test_dense_baseline_is_the_appendix_c_mlp():
    """The discriminative DNN baseline (002 App. C): flatten, then Linear → ReLU → Dropout with widths 512-256-126-512
    and rates 0.25/0.25/0.25/0.5, then a linear head. In eval mode its logits equal that MLP written out here from
    the layers' own weights; in train mode dropout makes two passes differ. Catches a constant or random output, a
    flipped sign, a missing ReLU, layers in another order, and dropout that never drops."""
    torch.manual_seed(0)
    net = create_backbone("dense", num_classes=10, in_chans=1, img_size=8)
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 512), (512, 256), (256, 126), (126, 512),
                                                                   (512, 10)]
    assert [m.p for m in net.modules() if isinstance(m, torch.nn.Dropout)] == [0.25, 0.25, 0.25, 0.5]
    x = torch.rand(3, 1, 8, 8)
    hidden = x.reshape(3, 64)
    for layer in linears[:-1]:
        hidden = (hidden @ layer.weight.T + layer.bias).clamp_min(0)
    by_hand = hidden @ linears[-1].weight.T + linears[-1].bias
    with torch.no_grad():
        logits = net.eval()(x)
        first, second = net.train()(x), net(x)
    assert logits.shape == (3, 10) and torch.allclose(logits, by_hand, atol=1e-5)
    assert (first - second).abs().max() > 1e-3


def test_training_raises_the_elbo_and_reports_run(tmp_path):
    torch.manual_seed(0)
    data = DigitsDataModule(source="sklearn8x8", batch_size=64, seed=0)
    model = tiny(lr=3e-3, ft_steps=1, ft_batch_size=4, num_samples=2, refine_steps=2)
    data.setup()
    for split, size in (("train_dataset", 256), ("val_dataset", 64), ("test_dataset", 100)):
        full = getattr(data, split)
        setattr(data, split, TensorImageDataset(full.images[:size], full.targets[:size]))
    x, y = data.train_dataset.images[:64], data.train_dataset.targets[:64]
    with torch.no_grad():
        start = model.intervention_elbo(x, y).mean().item()
    baselines = {"dnn": {"backbone": "dense", "backbone_kwargs": {"img_size": 8}, "max_epochs": 12},
                 "cnn": {"backbone": "small_cnn", "max_epochs": 12}}
    shift = ShiftRobustnessReport(str(tmp_path), shifts=[0, 1, 2], baselines=baselines, eval_size=20,
                                  cache_dir=str(tmp_path / "cache"))
    adversarial = AdversarialRobustnessReport(str(tmp_path), epsilons=[0.2], attacks=["noise", "fgsm", "pgd"],
                                              pgd_steps=1, attack_samples=1, baselines=baselines, eval_size=10,
                                              ft_size=8, cache_dir=str(tmp_path / "cache"))
    trainer = L.Trainer(max_steps=12, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0,
                        callbacks=[shift, adversarial, MetricsFile(str(tmp_path))])
    trainer.fit(model, datamodule=data)
    with torch.no_grad():
        assert model.intervention_elbo(x, y).mean().item() > start + 5
    trainer.test(model, datamodule=data)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert_report_measures_the_baselines(metrics, data, baselines, tmp_path / "cache")
    assert metrics["shift/vertical/ft_images"] == 10  # 10 % of the test split
    assert (tmp_path / "shift_accuracy.png").stat().st_size > 1000
    assert (tmp_path / "adversarial_accuracy.png").stat().st_size > 1000
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2   # the second report reused the baselines


def assert_report_measures_the_baselines(metrics: dict, data, baselines: dict, cache) -> None:
    """The reports' numbers of the (deterministic) baselines equal accuracies recomputed here from the cached weights
    on the images the reports evaluate (the test split in the reports' seed-0 order: shifts on images 10…29, after the
    10 % fine-tuning pool; attacks on images 0…9). Catches numbers from other images or models, swapped shift
    directions or attack names; and FGSM must beat the clean accuracy of a trained baseline (an attack that does not
    lower it is not using its gradient)."""
    from lit_robust import ImageClassifier
    from lit_robust.functional.attacks import fgsm
    from lit_robust.functional.shifts import translate
    from lit_robust.storage.cache import load_verified

    images, labels = data.test_dataset.images, data.test_dataset.targets
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    images, labels = images[order], labels[order]
    shift_x, shift_y, adv_x, adv_y = images[10:30], labels[10:30], images[:10], labels[:10]
    for name, spec in baselines.items():
        spec = {k: v for k, v in spec.items() if k != "max_epochs"}
        (path,) = cache.glob(f"{name}-*.pt")
        model = ImageClassifier(**spec)
        model.load_state_dict(load_verified(path))
        model.eval()
        acc = lambda x, y: (model(x).argmax(-1) == y).float().mean().item()
        with torch.no_grad():
            for s in (0, 1, 2):
                assert metrics[f"shift/vertical_{s}px/{name}"] == pytest.approx(acc(translate(shift_x, dy=s), shift_y))
                assert metrics[f"shift/horizontal_{s}px/{name}"] == pytest.approx(acc(translate(shift_x, dx=s), shift_y))
            clean = acc(adv_x, adv_y)
        attacked = fgsm(lambda v: torch.nn.functional.cross_entropy(model(v), adv_y, reduction="none"), adv_x, 0.2)
        with torch.no_grad():
            assert metrics[f"adv/clean/{name}"] == pytest.approx(clean)
            assert metrics[f"adv/fgsm_eps0.2/{name}"] == pytest.approx(acc(attacked, adv_y))
        assert metrics[f"adv/fgsm_eps0.2/{name}"] < clean, name



def eq8_objective(model: DeepCAMA, x_test, x_clean, y_clean, draws: int = 2) -> tuple[float, float]:
    """Eq. 8 and its Eq. 7 term (the marginal ELBO of the shifted images) on fixed sets, averaged over ``draws``
    Monte Carlo draws with a fixed seed: the same noise before and after fine-tuning (common random numbers), so a
    difference is the weights' doing, not the sampling's."""
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(123)
        eq8 = sum(model.fine_tune_objective(x_test, x_clean, y_clean).item() for _ in range(draws)) / draws
        eq7 = sum(model.marginal_elbo(x_test).mean().item() for _ in range(draws)) / draws
    return eq8, eq7


def test_eq8_fine_tuning_on_shifted_digits_raises_its_objective_on_held_out_images():
    """Seed 002 §3.1, Eq. 8: test-time fine-tuning of NN_M^p and NN_M^q on unlabelled shifted images, with labelled
    clean ones, must raise α E_D[ELBO(x, y)] + (1 − α) E_D̃[ELBO(x)] — measured on *held-out* images (other shifted
    digits, validation digits), so the gain is not memorised batches. 15 Adam steps on 8×8 digits translated 2 px
    right raise Eq. 8 by ≥ 1 nat per image and its Eq. 7 term on the shifted images by ≥ 1.5 (4.4 and 5.0 when
    written); the untouched original keeps its value.

    Fails on stubs, each checked by hand when the test was written: a no-op ``fine_tune`` (no optimizer step, or
    ``steps`` ignored) leaves both gains at exactly 0 (same weights, same draws); a flipped sign
    (``objective.backward()`` instead of ``(-objective).backward()``, i.e. descending Eq. 8) makes them negative or
    NaN; tuning the wrong networks is caught by ``test_fine_tuning_updates_only_manipulation_networks``. The model is
    untrained (a trained one costs minutes on CPU): this checks that the update ascends Eq. 8, not how far."""
    from lit_robust.functional.shifts import translate

    data = DigitsDataModule(source="sklearn8x8", batch_size=64, seed=0)
    data.setup()
    test = data.test_dataset.images
    shifted_tune, shifted_held_out = translate(test[:50], dx=2), translate(test[100:150], dx=2)
    clean_tune = (data.train_dataset.images[:256], data.train_dataset.targets[:256])
    clean_held_out = (data.val_dataset.images[:50], data.val_dataset.targets[:50])
    model = tiny(ft_lr=3e-2, ft_batch_size=16, ft_alpha=0.5)
    before = eq8_objective(model, shifted_held_out, *clean_held_out)
    tuned = model.fine_tuned_copy(shifted_tune, *clean_tune, steps=15, generator=torch.Generator().manual_seed(0))
    after = eq8_objective(tuned, shifted_held_out, *clean_held_out)
    gain_eq8, gain_eq7 = after[0] - before[0], after[1] - before[1]
    assert gain_eq8 >= 1.0 and gain_eq7 >= 1.5, (gain_eq8, gain_eq7)
    assert eq8_objective(model, shifted_held_out, *clean_held_out) == before    # the original is left alone


def test_a_checkpoint_naming_the_z_trunk_q_z_cnn_loads(tmp_path):
    """Image checkpoints whose q(z|x, y, m) CNN is stored under ``q_z.cnn`` restore into ``q_z.trunk``."""
    source = tiny()
    state = {key.replace("q_z.trunk.", "q_z.cnn."): value for key, value in source.state_dict().items()}
    assert any(key.startswith("q_z.cnn.") for key in state)
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": dict(source.hparams),
                "pytorch-lightning_version": L.__version__}, path)
    restored = DeepCAMA.load_from_checkpoint(path, weights_only=True)
    assert all(torch.equal(value, source.state_dict()[key]) for key, value in restored.state_dict().items())
