import lightning as L
import pytest
import torch

from lit_robust.datamodules import DigitsDataModule
from lit_robust.models.ebm import EBM, EBMDivergenceError, EnergyNet, load_ebm

# `train.py experiment=ebm_digits` (the shipped model's recipe) runs and its last.ckpt loads with load_ebm:
# tests/test_experiments.py.


def small_ebm(**kwargs) -> EBM:
    torch.manual_seed(0)
    return EBM(img_size=8, channels=(4, 8), down=(True, False), bank_size=32, mcmc_steps=3, **kwargs)


def trainer(tmp_path, steps, callbacks=()):
    return L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                     limit_val_batches=0, default_root_dir=str(tmp_path), callbacks=list(callbacks),
                     enable_checkpointing=False)


def test_energy_net_shapes_and_bad_configs():
    for channels, down in [((4, 8), (True, False)), ((8, 8, 8, 8), (True, True, False, False))]:
        assert EnergyNet(3, channels, down)(torch.rand(5, 3, 32, 32)).shape == (5,)
    with pytest.raises(ValueError, match="equal length"):
        EnergyNet(1, (4, 8), (True,))
    with pytest.raises(ValueError, match="activation='tanh'"):
        EnergyNet(1, activation="tanh")


def test_training_updates_bank_and_weights_and_logs_the_gap(tmp_path):
    ebm = small_ebm()
    bank, weights = ebm.bank.clone(), ebm.net.head.weight.detach().clone()
    t = trainer(tmp_path, 3)
    t.fit(ebm, datamodule=DigitsDataModule(source="sklearn8x8", batch_size=16))
    assert (ebm.bank != bank).flatten(1).any(1).sum() >= 16  # the drawn chains were advanced and written back
    assert ebm.bank.abs().max() <= 1 and not torch.equal(ebm.net.head.weight, weights)
    assert torch.isfinite(t.callback_metrics["train/energy_gap"])


class PoisonWeights(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 3:
            with torch.no_grad():
                pl_module.net.head.bias.fill_(float("nan"))


def test_divergence_stops_with_a_clear_error_and_keeps_the_last_good_weights(tmp_path):
    ebm = small_ebm(snapshot_every=2)
    with pytest.raises(EBMDivergenceError, match="energy gap nan.*weights of step 2 are kept"):
        trainer(tmp_path, 10, [PoisonWeights()]).fit(ebm, datamodule=DigitsDataModule(source="sklearn8x8",
                                                                                     batch_size=16))
    kept = load_ebm(str(tmp_path / "ebm_last_good.ckpt"))
    assert all(torch.isfinite(v).all() for v in kept.net.state_dict().values())


def test_export_roundtrip_and_shipped_model_prefers_digits_to_noise(tmp_path):
    ebm = small_ebm()
    ebm.export(tmp_path / "e.pt")
    again = load_ebm(str(tmp_path / "e.pt"))
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(again.energy(x), ebm.energy(x), atol=1e-2, rtol=1e-2)
    shipped = EBM.pretrained("digits")
    digits = DigitsDataModule()
    digits.setup("fit")
    images = digits.test_dataset.images[:64]
    with torch.no_grad():
        assert shipped.energy(images).mean() < shipped.energy(torch.rand_like(images)).mean() - 0.5
    with pytest.raises(ValueError, match="'cifar'"):
        EBM.pretrained("cifar")


def two_mode_images(n: int, seed: int) -> torch.Tensor:
    """A two-mode toy mixture of 8×8 images: every pixel ≈ 0.2 or every pixel ≈ 0.8 (σ = 0.05), half each."""
    generator = torch.Generator().manual_seed(seed)
    level = torch.where(torch.rand(n, generator=generator) < 0.5, 0.2, 0.8).view(-1, 1, 1, 1)
    return (level + 0.05 * torch.randn(n, 1, 8, 8, generator=generator)).clamp(0, 1)


def data_vs_noise_gap(ebm: EBM) -> float:
    """Mean energy of uniform noise minus that of held-out mixture images (> 0: the data are the likelier)."""
    with torch.no_grad():
        return (ebm.energy(torch.rand(256, 1, 8, 8, generator=torch.Generator().manual_seed(2))).mean()
                - ebm.energy(two_mode_images(256, seed=1)).mean()).item()


def test_training_on_a_two_mode_mixture_lowers_the_datas_energy_against_noise(tmp_path):
    """Convergent ML (Algorithm 2: push G down on data, up on the Langevin negatives) must open an energy gap between
    the mixture and uniform noise far beyond the untrained network's; catches a flipped loss sign (the gap turns
    negative) and a step that does not train the energy."""
    torch.manual_seed(0)
    ebm = EBM(img_size=8, channels=(4, 8), down=(True, False), bank_size=64, mcmc_steps=5, lr=1e-3)
    untrained = data_vs_noise_gap(ebm)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(two_mode_images(512, seed=0)), batch_size=32,
                                         shuffle=True)
    trainer(tmp_path, 150).fit(ebm, loader)
    assert data_vs_noise_gap(ebm) > 5 * abs(untrained)
