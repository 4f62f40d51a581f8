"""PureGen-DDPM: a denoising diffusion model trained only on the first forward steps, used to purify images.

Thesis 000 ch. 7 (§7.2): ε-prediction U-Net and linear-β 1000-step schedule from ``diffusers`` (``UNet2DModel``,
``DDPMScheduler``, what the published code uses), trained on t ∈ [0, ``train_steps``) with ``train_steps`` = 250
— the PureGen modification: purification never starts beyond t ≈ 75, so the model's capacity goes to the low-noise
end. Images enter in [0, 1] and are scaled to [−1, 1] inside.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel

from lit_robust.storage.serialization import load_plain


def q_sample(scheduler: DDPMScheduler, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Forward diffusion q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I) (DDPM Eq. 4; thesis §2 background on DDPMs)."""
    return scheduler.add_noise(x0, noise, t)


@torch.no_grad()
def diffuse_then_denoise(unet: UNet2DModel, scheduler: DDPMScheduler, x0: torch.Tensor, forward_steps: int,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """PureGen-DDPM purification (§7.2): x_t ~ q(x_t | x_0) at t = ``forward_steps``, then the ancestral reverse
    chain p_θ(x_{s−1} | x_s) for s = t … 1, all randomness from ``generator``. Works in the model's [−1, 1] space."""
    if not 0 <= forward_steps <= scheduler.config.num_train_timesteps:
        raise ValueError(f"forward_steps={forward_steps}: must be in [0, {scheduler.config.num_train_timesteps}]")
    if forward_steps == 0:
        return x0
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x = q_sample(scheduler, x0, torch.full((len(x0),), forward_steps - 1, device=x0.device, dtype=torch.long), noise)
    for s in range(forward_steps - 1, -1, -1):
        eps = unet(x, torch.full((len(x),), s, device=x.device, dtype=torch.long)).sample
        x = scheduler.step(eps, s, x, generator=generator).prev_sample
    return x


class DDPM(L.LightningModule):
    """ε-prediction DDPM on [0, 1] images, trained with the ε-MSE loss on t ∈ [0, ``train_steps``) only.

    The default U-Net is CPU-sized (channels (32, 64, 64), one layer per block, attention only in the lowest block;
    1.1 M parameters; the specs README measured 1.6 s per training step of 128 images at 32×32 on 2 cores);
    ``img_size`` 16 is ≈ 4× cheaper again. ``img_size`` must be divisible by 2^(len(channels) − 1).
    """

    def __init__(self, in_chans: int = 1, img_size: int = 28, channels: Sequence[int] = (32, 64, 64),
                 layers_per_block: int = 1, attention: bool = True, num_train_timesteps: int = 1000,
                 train_steps: int = 250, beta_schedule: str = "linear", lr: float = 2e-4):
        super().__init__()
        if img_size % 2 ** (len(channels) - 1):
            raise ValueError(f"img_size={img_size} is not divisible by 2^{len(channels) - 1}: pick channels with "
                             "fewer levels or resize the data (data.img_size=16 or 32)")
        if not 0 < train_steps <= num_train_timesteps:
            raise ValueError(f"train_steps={train_steps}: must be in (0, {num_train_timesteps}]")
        self.save_hyperparameters()
        down = ["DownBlock2D"] * (len(channels) - 1) + ["AttnDownBlock2D" if attention else "DownBlock2D"]
        up = ["AttnUpBlock2D" if attention else "UpBlock2D"] + ["UpBlock2D"] * (len(channels) - 1)
        self.unet = UNet2DModel(sample_size=img_size, in_channels=in_chans, out_channels=in_chans,
                                block_out_channels=tuple(channels), layers_per_block=layers_per_block,
                                down_block_types=tuple(down), up_block_types=tuple(up),
                                norm_num_groups=min(8, min(channels)))
        self.scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule)

    def training_step(self, batch, batch_idx):
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        x0 = images * 2 - 1
        t = torch.randint(0, self.hparams.train_steps, (len(x0),), device=x0.device)
        noise = torch.randn_like(x0)
        loss = F.mse_loss(self.unet(q_sample(self.scheduler, x0, t, noise), t).sample, noise)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"DDPM loss became {loss.item()} at step {self.global_step}; lower model.lr")
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def test_step(self, batch, batch_idx):
        """ε-MSE on held-out images at random t < train_steps (the training objective, as a sanity check)."""
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        x0 = images * 2 - 1
        t = torch.randint(0, self.hparams.train_steps, (len(x0),), device=x0.device)
        noise = torch.randn_like(x0)
        self.log("test/loss", F.mse_loss(self.unet(q_sample(self.scheduler, x0, t, noise), t).sample, noise))

    def configure_optimizers(self):
        return torch.optim.Adam(self.unet.parameters(), lr=self.hparams.lr)

    def purify(self, images: torch.Tensor, forward_steps: int = 75,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Diffuse-then-denoise purification of [0, 1] images; returns [0, 1] images."""
        self.scheduler.alphas_cumprod = self.scheduler.alphas_cumprod.to(images.device)
        out = diffuse_then_denoise(self.unet, self.scheduler, images * 2 - 1, forward_steps, generator)
        return ((out.clamp(-1, 1) + 1) / 2).float()

    @torch.no_grad()
    def sample_from(self, images: torch.Tensor, forward_steps: int | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """Visual check: restore images from t = ``train_steps`` (the most noise the model was trained on)."""
        return self.purify(images, forward_steps or self.hparams.train_steps, generator)


def load_ddpm(source: str) -> DDPM:
    """A DDPM from a Lightning ``.ckpt`` of ``train.py experiment=ddpm_digits``."""
    if not Path(source).is_file():
        raise FileNotFoundError(f"DDPM checkpoint {source!r} not found: train one with "
                                "`python train.py experiment=ddpm_digits` and pass its checkpoints/last.ckpt")
    load_plain(source, "DDPM checkpoint", mmap=True)  # refuse code in the file with its name, before Lightning
    return DDPM.load_from_checkpoint(source, map_location="cpu", weights_only=True).eval()
