import json

import lightning as L
import pytest
import torch

from lit_robust import BayesianVAE
from lit_robust.callbacks import MetricsFile, OODDetection
from lit_robust.callbacks.ood_detection import FilteredClassifier
from lit_robust.datamodules import OODPairDataModule
from lit_robust.datamodules.base import stack_dataset


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
