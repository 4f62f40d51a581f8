import copy

import lightning as L
import pytest
import torch

from lit_robust import BayesianVAE
from lit_robust.datamodules import OODPairDataModule

TINY = dict(img_size=8, latent_dim=2, hidden_dims=(16,), num_draws=3, num_importance=4, dataset_size=100)


def _data(seed=0):
    return OODPairDataModule(inlier="sklearn_digits", outlier="noise", img_size=8, batch_size=64, seed=seed,
                             num_images=300)


def _trainer(tmp_path, epochs, **kwargs):
    return L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=1, **kwargs)


@pytest.mark.parametrize("posterior", ["bbb", "none"])
def test_posterior_draws_and_scores_are_reproducible_by_seed(posterior):
    torch.manual_seed(0)
    model = BayesianVAE(posterior=posterior, **TINY).eval()
    x = torch.rand(5, 1, 8, 8)
    a, b, c = (model.posterior_draws(3, seed) for seed in (1, 1, 2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    if posterior == "bbb":
        assert not torch.equal(a["0.weight"], c["0.weight"])
    first = model.ensemble_log_likelihoods(x)[0]
    model._draws = None
    assert torch.equal(first, model.ensemble_log_likelihoods(x)[0])
    # every draw's estimate differs: BBB by its weights, the classical VAE by its importance samples (ch. 5)
    assert (first.std(0) > 0).all()


def test_importance_sampled_likelihood_is_at_least_the_elbo():
    torch.manual_seed(0)
    model = BayesianVAE(posterior="none", img_size=8, latent_dim=2, hidden_dims=(16,), num_draws=2,
                        num_importance=256, dataset_size=100)
    x = (torch.rand(64, 1, 8, 8) > 0.5).float()
    log_lik = model.ensemble_log_likelihoods(x)[0].mean(0)
    elbo = -torch.stack([model.negative_elbo(x) for _ in range(20)]).mean(0)
    assert (log_lik.mean() - elbo.mean()).item() > 0.0


def test_bad_posterior_name_is_refused():
    with pytest.raises(ValueError, match="model.posterior"):
        BayesianVAE(posterior="mcdropout")


@pytest.mark.parametrize("posterior", ["swag", "sghmc"])
def test_weight_posterior_state_survives_checkpoint_and_resume(tmp_path, posterior):
    L.seed_everything(0)
    kwargs = dict(TINY, dataset_size=None, swag_rank=3, collect_start=0, sghmc_burn_in_steps=5)
    model = BayesianVAE(posterior=posterior, **kwargs)
    trainer = _trainer(tmp_path, 2)
    trainer.fit(model, datamodule=_data())
    ckpt = tmp_path / "two.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)
    assert saved["state_dict"]["bank.num_seen"].item() == 2
    snapshots_before = model.bank.snapshots.clone()

    resumed = BayesianVAE(posterior=posterior, **kwargs)
    trainer2 = _trainer(tmp_path, 4)
    seen_at_start = {}

    class Probe(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen_at_start["num_seen"] = pl_module.bank.num_seen.item()
            seen_at_start["snapshots"] = pl_module.bank.snapshots.clone()
            seen_at_start["precision"] = pl_module.precision.clone()
            if posterior == "sghmc":
                seen_at_start["sghmc"] = copy.deepcopy(trainer.optimizers[1].state_dict())

    trainer2.callbacks.append(Probe())
    trainer2.fit(resumed, datamodule=_data(), ckpt_path=ckpt)
    assert seen_at_start["num_seen"] == 2
    assert torch.equal(seen_at_start["snapshots"], snapshots_before)
    if posterior == "sghmc":
        restored = seen_at_start["sghmc"]["state"]
        original = saved["optimizer_states"][1]["state"]
        assert int(restored[0]["step"]) == int(original[0]["step"]) > 0
        assert torch.equal(restored[0]["momentum"], original[0]["momentum"])
        # the Gamma-resampled prior precision is restored, not reset to 1
        assert seen_at_start["precision"].item() == saved["state_dict"]["precision"].item() != 1.0
    # the bank kept filling after the resume: 4 epochs → 4 snapshots seen, ring of 3 kept
    assert resumed.bank.num_seen.item() == 4
    draws = resumed.posterior_draws(5, seed=3)
    assert torch.equal(draws["0.weight"], resumed.posterior_draws(5, seed=3)["0.weight"])
