import json

import lightning as L
import pytest
import torch

from lit_robust import BayesianVAE
from lit_robust.callbacks import MetricsFile, OODDetection
from lit_robust.callbacks.ood_detection import FilteredClassifier
from lit_robust.datamodules import OODPairDataModule
from lit_robust.datasets import stack_dataset


def test_ood_detection_end_to_end(tmp_path):
    L.seed_everything(0)
    dm = OODPairDataModule(inlier="sklearn_digits", outlier="noise", img_size=8, num_images=600, batch_size=64)
    model = BayesianVAE(posterior="bbb", img_size=8, latent_dim=4, hidden_dims=(32,), num_draws=4,
                        num_importance=8, rho_init=-5.0, mu_init_std=None)
    callback = OODDetection(output_dir=str(tmp_path), attack_count=60, attack_steps=3, victim_epochs=8,
                            encoder_eps=0.2, classifier_eps=0.3, restoration_steps=5)
    trainer = L.Trainer(max_epochs=5, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False,
                        callbacks=[callback, MetricsFile(str(tmp_path))], default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm)

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    pairs = {key.split("/")[2] for key in metrics if key.startswith("ood/bbb/") and key.endswith("/auroc")}
    assert pairs == {"noise", "adv_encoder_pgd0.2", "adv_classifier_fgsm0.3"}
    # Algorithm 2's second stage: SSIM gains for every set, gain AUROC for each adversarial set vs the OOD set
    assert all(f"ood/bbb/{p}/restoration_gain" in metrics for p in pairs | {"inliers"})
    assert 0.0 <= metrics["ood/bbb/adv_encoder_pgd0.2_vs_noise/gain_auroc"] <= 1.0
    for score in ("expected_ll", "waic", "typicality", "disagreement", "entropy", "std_ll", "hole_indicator"):
        for metric in ("auroc", "auprc", "fpr80", "rejected"):
            assert 0.0 <= metrics[f"ood/bbb/noise/{score}/{metric}"] <= 1.0
    # uniform noise is far less likely than digits under a Bernoulli decoder
    assert metrics["ood/bbb/noise/expected_ll/auroc"] > 0.95
    assert metrics["adv/victim_clean_acc"] > metrics["adv/victim_adv_acc"]
    assert (tmp_path / "ood_bbb_noise.png").stat().st_size > 1000
    assert "| std_ll |" in (tmp_path / "ood_bbb.md").read_text()
    assert_scores_equal_the_draws_by_hand(metrics, callback, model, dm)

    # thresholds are fitted at the 95 % quantile of validation inliers and survive a state round trip
    restored = OODDetection()
    restored.load_state_dict(callback.state_dict())
    assert restored.thresholds == callback.thresholds
    val_images, _ = stack_dataset(dm.val_dataset)
    noise, _ = stack_dataset(dm.ood_test_dataset)
    filtered = FilteredClassifier(torch.nn.Flatten(), model.eval(), callback.thresholds, "expected_ll")
    _, accepted_val = filtered(val_images)
    _, accepted_noise = filtered(noise)
    assert 0.9 <= accepted_val.float().mean().item() <= 0.99
    assert accepted_noise.float().mean().item() < 0.1


def assert_scores_equal_the_draws_by_hand(metrics: dict, callback: OODDetection, model, dm) -> None:
    """The logged metrics of ``std_ll`` (Eq. 3.19) and ``expected_ll`` (Eq. 3.14) equal ``detection_metrics`` of the
    scores written out here from the model's per-draw log-likelihoods (batches of the callback's size, as it scores
    them), their thresholds the 95 % quantile of the validation inliers' and the rejected share the noise above it;
    and the draws' spread separates the noise from digits. Catches a constant or sign-flipped score, a biased std, a
    threshold from another split or quantile, and metrics of other images."""
    import math

    from lit_robust.functional.ood_scores import detection_metrics

    def by_hand(dataset) -> dict[str, torch.Tensor]:
        images = callback.unit_images(dataset)
        with torch.no_grad():
            log_liks = torch.cat([model.ensemble_log_likelihoods(chunk)[0]
                                  for chunk in images.split(callback.batch_size)], dim=1)
        n = log_liks.shape[0]
        spread = ((log_liks - log_liks.mean(0)) ** 2).sum(0).div(n - 1).sqrt()
        return {"std_ll": spread, "expected_ll": math.log(n) - torch.logsumexp(log_liks, 0)}

    inliers, noise, val = by_hand(dm.test_dataset), by_hand(dm.ood_test_dataset), by_hand(dm.val_dataset)
    for score in ("std_ll", "expected_ll"):
        threshold = torch.quantile(val[score], 0.95).item()
        assert metrics[f"ood/bbb/threshold/{score}"] == pytest.approx(threshold, rel=1e-4)
        expected = detection_metrics(inliers[score], noise[score])
        for metric in ("auroc", "auprc", "fpr80"):
            assert metrics[f"ood/bbb/noise/{score}/{metric}"] == pytest.approx(expected[metric], abs=1e-4)
        assert metrics[f"ood/bbb/noise/{score}/rejected"] == pytest.approx(
            (noise[score] > threshold).float().mean().item(), abs=1e-6)
    assert metrics["ood/bbb/noise/std_ll/auroc"] > 0.6


@pytest.mark.slow
def test_ddp_cpu_end_to_end_matches_the_single_process_metrics(tmp_path):
    """Two gloo ranks score their shards and gather: the same inputs give the same threshold-free metrics as one
    process would (the scores are per input, so sharding changes nothing but the latent noise of each batch)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run = tmp_path / "run"
    overrides = ["experiment=bvae_digits_vs_natural", "trainer=ddp_cpu", "trainer.max_epochs=2",
                 "data.num_images=400", "data.extra_outliers=[noise]", "model.hidden_dims=[32]",
                 "model.num_draws=3", "model.num_importance=4", "callbacks.ood_detection.attack_count=40",
                 "callbacks.ood_detection.attack_steps=2", "callbacks.ood_detection.victim_epochs=1",
                 "callbacks.ood_detection.restoration_steps=2", "+trainer.enable_progress_bar=false",
                 f"hydra.run.dir={run}"]
    subprocess.run([sys.executable, str(root / "train.py"), *overrides], cwd=root, check=True, timeout=900)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["ood/bbb/noise/expected_ll/auroc"] > 0.9
    # both ranks' unpadded shards were gathered: every input counted once
    assert metrics["ood/bbb/inliers/count"] == metrics["ood/bbb/noise/count"] == 80
    assert metrics["ood/bbb/adv_encoder_pgd0.1/count"] == metrics["ood/bbb/adv_classifier_fgsm0.2/count"] == 40


# ---- post-hoc scores of a plain classifier -------------------------------------------------------------------------
CLASSIFIER_SCORES = ["msp", "energy", "mahalanobis", "knn"]


def digits_vs_natural() -> OODPairDataModule:
    return OODPairDataModule(inlier="digits", outlier="natural", img_size=16, num_images=600, batch_size=64)


@pytest.fixture(scope="module")
def trained_classifier():
    """A small CNN trained for 3 epochs on 420 digits: weak (≈ 40 % accuracy), but its features already separate the
    digits from natural-image crops."""
    from lit_robust import ImageClassifier

    L.seed_everything(0)
    model = ImageClassifier(backbone="small_cnn", num_classes=10, in_chans=1, lr=2e-3)
    quiet_trainer(max_epochs=3).fit(model, datamodule=digits_vs_natural())
    return model


def quiet_trainer(callbacks=(), **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                     enable_checkpointing=False, callbacks=list(callbacks), **kwargs)


def classifier_detection(tmp_path, model, **trainer_kwargs) -> dict:
    """``OODDetection(scores=CLASSIFIER_SCORES)`` on digits vs natural crops; the metrics it wrote."""
    callback = OODDetection(scores=CLASSIFIER_SCORES, encoder_eps=None, classifier_eps=None, histograms=False,
                            batch_size=100, output_dir=str(tmp_path), score_options={"knn_k": 10})
    quiet_trainer([callback, MetricsFile(str(tmp_path))], **trainer_kwargs).test(model, datamodule=digits_vs_natural(),
                                                                                 verbose=False)
    return json.loads((tmp_path / "metrics.json").read_text())


def test_classifier_scores_equal_a_direct_computation_fitted_on_the_train_split(tmp_path, trained_classifier):
    """The logged AUROC / FPR95 / AUPR of every score equal ``detection_metrics`` of the scores computed here by hand
    from the CNN's penultimate features (``net.features``) with statistics of the *train* digits: a callback fitting
    on another split, reading other features or scoring with a flipped sign differs."""
    from lit_robust.functional import ood_scores as S

    metrics = classifier_detection(tmp_path, trained_classifier)
    model, dm = trained_classifier.eval(), digits_vs_natural()
    dm.setup("fit"), dm.setup("test")

    def features_and_logits(dataset):
        images, _ = stack_dataset(dataset)
        with torch.no_grad():
            features = model.net.features((images - model.mean) / model.std)
        return features, model(images)

    train_features, _ = features_and_logits(dm.train_dataset)
    means, precision = S.class_gaussians(train_features, stack_dataset(dm.train_dataset)[1])
    bank = torch.nn.functional.normalize(train_features, dim=-1)
    by_hand = {}
    for name, dataset in (("inliers", dm.test_dataset), ("natural", dm.ood_test_dataset)):
        features, logits = features_and_logits(dataset)
        by_hand[name] = {"msp": S.msp_score(logits), "energy": S.energy_score(logits),
                         "mahalanobis": S.mahalanobis_score(features, means, precision),
                         "knn": S.knn_score(features, bank, 10)}
    for score in CLASSIFIER_SCORES:
        expected = S.detection_metrics(by_hand["inliers"][score].float(), by_hand["natural"][score].float())
        for metric in ("auroc", "fpr95", "aupr_in", "auprc"):
            assert metrics[f"ood/scores/natural/{score}/{metric}"] == pytest.approx(expected[metric], abs=1e-6)
    assert metrics["ood/scores/natural/mahalanobis/auroc"] > 0.95  # the feature-space scores separate the pair
    assert metrics["ood/scores/natural/knn/auroc"] > 0.9
    assert metrics["ood/scores/natural/mahalanobis/fpr95"] < 0.2


def test_a_model_without_scores_is_refused_at_test_start_naming_both_options(trained_classifier):
    batches = []
    record = L.Callback()
    record.on_test_batch_start = lambda *args: batches.append(1)
    with pytest.raises(TypeError, match=r"ImageClassifier has no outlier_scores.*scores=\[.*detector="):
        quiet_trainer([OODDetection(), record]).test(trained_classifier, datamodule=digits_vs_natural())
    assert not batches  # refused before the test loop, not after it


def test_a_classifier_scores_callback_sits_beside_a_detector_callback():
    """Two OODDetection in one trainer (README: a fitted VAE's scores and the classifier's own) need their own state
    keys: Lightning refuses two stateful callbacks with one key."""
    L.Trainer(callbacks=[OODDetection(), OODDetection(scores=["msp"])], logger=False)


def test_bad_classifier_score_arguments_are_refused_before_testing():
    with pytest.raises(ValueError, match=r"scores=\['mahalanobis', 'odin2'\]"):
        OODDetection(scores=["mahalanobis", "odin2"])
    with pytest.raises(ValueError, match="fit_split='test'"):
        OODDetection(scores=["knn"], fit_split="test")
    with pytest.raises(ValueError, match=r"score options \['knn'\]: use \[.*'knn_k'"):
        OODDetection(scores=["knn"], score_options={"knn": 5})
    with pytest.raises(ValueError, match="odin_temperature=0: use a positive value"):
        OODDetection(scores=["odin"], score_options={"odin_temperature": 0})


def test_two_gloo_processes_give_the_single_process_classifier_scores(tmp_path, trained_classifier):
    """Two forked gloo ranks extract their shares of the fit features and of every scored set and gather them in
    order: every metric equals one process's (a rank fitting on its own share, or gathering out of order, differs).
    Batches of 100: 420 train digits share 3 / 2 batches, the 60 validation digits leave rank 1 none."""
    single = classifier_detection(tmp_path / "one", trained_classifier)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a forked rank must not wait on the parent's OpenMP threads
    try:
        ddp = classifier_detection(tmp_path / "ddp", trained_classifier, devices=2, strategy="ddp_fork")
    finally:
        torch.set_num_threads(threads)
    ood = {key: value for key, value in single.items() if key.startswith("ood/")}
    assert ood and {key: ddp[key] for key in ood} == pytest.approx(ood, abs=1e-6)
