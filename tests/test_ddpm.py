from types import SimpleNamespace

import lightning as L
import pytest
import torch

from lit_robust.datamodules import DigitsDataModule
from lit_robust.models.ddpm import DDPM, diffuse_then_denoise


def tiny_ddpm() -> DDPM:
    torch.manual_seed(0)
    return DDPM(img_size=8, channels=(8, 16), attention=False)


def test_training_uses_only_the_first_forward_steps(tmp_path, monkeypatch):
    ddpm = tiny_ddpm()
    seen = []
    forward = ddpm.unet.forward
    monkeypatch.setattr(ddpm.unet, "forward", lambda x, t, *a, **k: (seen.append(t.clone()), forward(x, t))[1])
    L.Trainer(max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False, limit_val_batches=0, default_root_dir=str(tmp_path)).fit(
        ddpm, datamodule=DigitsDataModule(source="sklearn8x8", batch_size=64))
    steps = torch.cat(seen)
    assert steps.max() < 250 and steps.min() >= 0 and len(steps.unique()) > 50


def test_purify_is_seeded_and_in_range():
    ddpm = tiny_ddpm().eval()
    images = torch.rand(6, 1, 8, 8)
    a = ddpm.purify(images, 5, torch.Generator().manual_seed(1))
    b = ddpm.purify(images, 5, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1 and a.shape == images.shape
    assert torch.equal(ddpm.purify(images, 0), images.clamp(0, 1))
    with pytest.raises(ValueError, match="forward_steps=1001"):
        diffuse_then_denoise(ddpm.unet, ddpm.scheduler, images, 1001)


def test_bad_image_size_is_named():
    with pytest.raises(ValueError, match="img_size=28 is not divisible by 2\\^3"):
        DDPM(img_size=28, channels=(8, 8, 8, 8))


class GaussianOptimalDenoiser(torch.nn.Module):
    """The exact ε-predictor E[ε | x_t] for data x_0 ~ N(μ, σ²I) in the model's [−1, 1] space: x_t = √ᾱ x_0 + √(1−ᾱ) ε
    is Gaussian, so E[ε | x_t] = √(1−ᾱ) (x_t − √ᾱ μ) / (ᾱσ² + 1 − ᾱ). Called as the U-Net is: ``net(x, t).sample``."""

    def __init__(self, scheduler, mean: float, std: float, kind: str = "optimal"):
        super().__init__()
        self.alphas_cumprod, self.mean, self.var, self.kind = scheduler.alphas_cumprod, mean, std ** 2, kind

    def forward(self, x, t):
        a = self.alphas_cumprod.to(x.device)[t].view(-1, 1, 1, 1)
        eps = (1 - a).sqrt() * (x - a.sqrt() * self.mean) / (a * self.var + 1 - a)
        return SimpleNamespace(sample={"optimal": eps, "zero": torch.zeros_like(x), "identity": x}[self.kind])


def gaussian_purified(kind: str, start_shift: float, forward_steps: int) -> torch.Tensor:
    """Purify images drawn from N(0.55 + start_shift, 0.1²) (pixel space; N(0.1, 0.2²) in [−1, 1]) with the DDPM whose
    network is ``GaussianOptimalDenoiser`` of the data N(0.55, 0.1²)."""
    ddpm = tiny_ddpm().eval()
    ddpm.unet = GaussianOptimalDenoiser(ddpm.scheduler, mean=0.1, std=0.2, kind=kind)
    images = 0.55 + start_shift + 0.1 * torch.randn(2000, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    return ddpm.purify(images, forward_steps, torch.Generator().manual_seed(1))


@pytest.mark.parametrize("start_shift,forward_steps", [(0.0, 100), (0.25, 1000)])
def test_diffuse_then_denoise_with_the_optimal_denoiser_samples_the_data_distribution(start_shift, forward_steps):
    """With the exact ε-predictor of Gaussian data, the reverse chain (DDPM Eq. 11 steps from ``diffusers``) maps
    x_t back to the data distribution: data stay N(0.55, 0.1²) after 100 steps, and images shifted off it by +0.25 come
    back to it after the full 1000. Catches a wrong q_sample/start step, a reverse chain that does not denoise, and a
    zero or identity network (the same chain without the denoiser's information)."""
    out = gaussian_purified("optimal", start_shift, forward_steps)
    assert out.mean().item() == pytest.approx(0.55, abs=0.01)
    assert out.std().item() == pytest.approx(0.1, rel=0.05)
    for stub in ("zero", "identity"):
        wrong = gaussian_purified(stub, start_shift, forward_steps)
        assert abs(wrong.mean().item() - 0.55) > 0.05 or abs(wrong.std().item() / 0.1 - 1) > 0.25, stub
