"""PhotoGuard: SDEdit with DDIM recovers the latent when the denoiser is exact, the attacks move what they target
(more than random noise of the same ε) and ε = 0 moves nothing; the latent editor trains in its two stages."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lit_robust import LatentDiffusion
from lit_robust.functional.attacks import random_start
from lit_robust.functional.photoguard import ddim_timesteps, diffusion_attack, encoder_attack, sdedit

ALPHAS = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 200), 0)


def test_ddim_timesteps_start_at_the_strength_and_end_at_zero():
    assert ddim_timesteps(0.5, 200, 4) == [99, 66, 33, 0]
    assert ddim_timesteps(1.0, 200, 1) == [199]
    with pytest.raises(ValueError, match="strength=1.5"):
        ddim_timesteps(1.5, 200, 4)


def test_sdedit_with_the_exact_noise_returns_the_clean_latent():
    z0, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)

    def oracle(z, t, labels):   # ε̂ that inverts the forward process of this z0 exactly (guidance doubles the batch)
        a = ALPHAS[t].view(-1, 1, 1, 1)
        return (z - a.sqrt() * torch.cat([z0] * (len(z) // len(z0)))) / (1 - a).sqrt()
    out = sdedit(oracle, z0, torch.zeros(3, dtype=torch.long), ALPHAS, 0.6, 5, noise, null_label=10, guidance=2.0)
    assert torch.allclose(out, z0, atol=1e-4)
    wrong = sdedit(lambda z, t, y: torch.zeros_like(z), z0, torch.zeros(3, dtype=torch.long), ALPHAS, 0.6, 5, noise, 10)
    assert not torch.allclose(wrong, z0, atol=1e-2)


def test_guidance_extrapolates_from_the_unconditional_noise():
    z = torch.randn(2, 3)

    def denoiser(z, t, labels):   # class 10 (unconditional) predicts 0, the others 1
        return (labels != 10).float()[:, None].expand_as(z)
    out = sdedit(denoiser, z, torch.tensor([1, 2]), ALPHAS, 0.01, 1, torch.zeros_like(z), null_label=10, guidance=3.0)
    a = ALPHAS[1]
    assert torch.allclose(out, (a.sqrt() * z - (1 - a).sqrt() * 3.0) / a.sqrt(), atol=1e-5)


def _linear_encoder() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8))


def test_encoder_attack_pulls_the_latent_to_the_target_within_eps():
    encode, images = _linear_encoder(), torch.rand(6, 1, 8, 8) * 0.5 + 0.25
    target = encode(torch.full_like(images, 0.5)).detach()
    attacked = encoder_attack(encode, images, target, eps=0.1, steps=30)
    noisy = random_start(images, 0.1, "linf", torch.Generator().manual_seed(0))
    distance = lambda x: (encode(x) - target).pow(2).sum().item()  # noqa: E731
    assert (attacked - images).abs().max() <= 0.1 + 1e-6
    assert distance(attacked) < 0.5 * distance(noisy)
    assert torch.equal(encoder_attack(encode, images, target, eps=0.0, steps=5), images)


def test_diffusion_attack_pulls_the_edit_to_the_target():
    images, target = torch.rand(4, 1, 8, 8), torch.zeros(4, 1, 8, 8)

    def edit(x):   # a differentiable "editor": blur, then brighten
        return torch.nn.functional.avg_pool2d(x, 3, 1, 1) * 1.5
    attacked = diffusion_attack(edit, images, target, eps=0.05, steps=20)
    noisy = random_start(images, 0.05, "linf", torch.Generator().manual_seed(0))
    assert (edit(attacked) - target).pow(2).sum() < (edit(noisy) - target).pow(2).sum() - 1.0


def test_latent_editor_trains_its_autoencoder_then_its_denoiser_and_immunizes():
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(64, 1, 12, 12, generator=g) > 0.7).float()
    data = DataLoader(TensorDataset(images, torch.randint(0, 3, (64,), generator=g)), batch_size=32)
    model = LatentDiffusion(img_size=12, num_classes=3, width=8, hidden=32, depth=1, num_train_timesteps=50,
                            autoencoder_steps=30, lr=3e-3)
    before = model.autoencoder.state_dict()["encoder.0.weight"].clone()
    L.Trainer(max_steps=40, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0).fit(model, data)
    assert not torch.equal(before, model.autoencoder.state_dict()["encoder.0.weight"])
    assert model.latent_scale > 0                      # the diffusion stage started
    edited = model.edit(images[:4], torch.tensor([0, 1, 2, 0]), strength=0.5, ddim_steps=3)
    assert edited.shape == images[:4].shape and 0 <= edited.min() and edited.max() <= 1
    assert torch.equal(model.immunize(images[:4], "encoder", eps=0.0), images[:4])
    immunized = model.immunize(images[:4], "diffusion", eps=8 / 255, steps=2, target_labels=torch.tensor([0, 1, 2, 0]),
                               ddim_steps=2)
    assert 0 < (immunized - images[:4]).abs().max() <= 8 / 255 + 1e-6
    with pytest.raises(ValueError, match="method='blur'"):
        model.immunize(images[:4], "blur", eps=0.1)
    with pytest.raises(ValueError, match="target_labels"):
        model.immunize(images[:4], "diffusion", eps=0.1)
