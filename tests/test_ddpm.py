import lightning as L
import pytest
import torch

from lit_robust.datamodules import DigitsDataModule
from lit_robust.ddpm import DDPM, diffuse_then_denoise


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


def test_purify_is_seeded_in_range_and_stays_close_for_few_steps():
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
