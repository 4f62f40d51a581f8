"""PureEBM: an energy-based model trained by convergent maximum likelihood, used to purify poisoned training images.

Thesis 000, ch. 6 (PureEBM / PureGen-EBM) and App. D.3.1 (Algorithm 2); the potential has the SNGAN ResNet
discriminator shape of the published code. Images enter in [0, 1] and are scaled to [−1, 1] inside.
"""
from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from lit_robust.functional.langevin import langevin_chain
from lit_robust.storage.serialization import check_finite, check_sha256, load_plain

ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "leaky_relu": lambda: nn.LeakyReLU(0.2)}
PRETRAINED = {"digits": "ebm_digits.pt"}


class EBMDivergenceError(RuntimeError):
    """Convergent ML training left its stable regime (NaN, exploding energy gap or gradient norm)."""


class ResidualDownBlock(nn.Module):
    """SNGAN discriminator block: act → conv3×3 → act → conv3×3 (→ avg-pool) plus a 1×1 (→ avg-pool) shortcut.

    ``first`` is SNGAN's "optimised" first block: no activation before the first conv, and the shortcut pools first.
    """

    def __init__(self, in_ch: int, out_ch: int, down: bool, act: str, first: bool = False):
        super().__init__()
        self.first, self.down = first, down
        self.act = ACTIVATIONS[act]()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if (in_ch != out_ch or down) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x if self.first else self.act(x))
        h = self.conv2(self.act(h))
        if self.down:
            h = F.avg_pool2d(h, 2)
            skip = self.shortcut(F.avg_pool2d(x, 2)) if self.first else F.avg_pool2d(self.shortcut(x), 2)
        else:
            skip = self.shortcut(x)
        return h + skip


class EnergyNet(nn.Module):
    """G_θ(x): residual blocks (SNGAN ResNet discriminator shape), activation, global average pool, linear → scalar.

    SNGAN for 32×32 uses channels (128,)*4 with down-sampling in the first two blocks; the CPU default here is
    (8, 16, 32) (2.3× the throughput of (16, 32, 32) on CPU at 28×28). No spectral norm: a convergent EBM's energy scale is set by training, not by a Lipschitz bound, and
    the reference EBM code drops it too. SiLU is the default activation because it gives a smooth ∇ₓG for Langevin
    (ReLU, SNGAN's choice, is available).
    """

    def __init__(self, in_chans: int = 1, channels: Sequence[int] = (8, 16, 32),
                 down: Sequence[bool] = (True, True, False), activation: str = "silu"):
        super().__init__()
        if len(channels) != len(down) or not channels:
            raise ValueError(f"channels={list(channels)} and down={list(down)} must be non-empty and of equal length")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r}: use one of {sorted(ACTIVATIONS)}")
        widths = [in_chans, *channels]
        self.blocks = nn.Sequential(*[ResidualDownBlock(widths[i], widths[i + 1], bool(down[i]), activation,
                                                        first=i == 0) for i in range(len(channels))])
        self.act = ACTIVATIONS[activation]()
        self.head = nn.Linear(channels[-1], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.blocks(x)).mean(dim=(2, 3))).squeeze(1)


class EBM(L.LightningModule):
    """Energy-based model G_θ trained by convergent maximum likelihood (thesis Algorithm 2, App. D.3.1).

    Each update: positives x⁺ + τ_data·ε from the training batch; negatives drawn from a persistent image bank
    (initialised from uniform noise, a ``rejuvenation`` fraction of each draw replaced by fresh noise) advanced by
    ``mcmc_steps`` Langevin steps (Eq. 6.7) and written back; loss (mean G(x⁺) − mean G(x⁻))/T.

    Defaults follow the PureGen reference code (ε = 1.25e-2, T = 1e-4, data noise 1.5e-2, 5 % rejuvenation, Adam
    1e-4) rather than Algorithm 2's SGD 5e-5 over 150,000 updates, which is out of reach on CPU; K = ``mcmc_steps``
    (100 in the paper) may be lowered for CPU budgets (40 reached the same purification on digits, specs README).

    Divergence — non-finite loss, |energy gap| above ``max_energy_gap`` or parameter-gradient norm above
    ``max_grad_norm`` — raises :class:`EBMDivergenceError`; the weights of the last healthy snapshot (taken every
    ``snapshot_every`` updates) are saved to ``<checkpoint dir>/ebm_last_good.ckpt`` first.

    Images passed to :meth:`energy` / :meth:`purify` are in [0, 1]; the network sees [−1, 1].
    """

    def __init__(self, in_chans: int = 1, img_size: int = 28, channels: Sequence[int] = (8, 16, 32),
                 down: Sequence[bool] = (True, True, False), activation: str = "silu",
                 step_size: float = 1.25e-2, temperature: float = 1e-4, mcmc_steps: int = 100,
                 data_noise: float = 1.5e-2, bank_size: int = 1000, rejuvenation: float = 0.05,
                 lr: float = 1e-4, optimizer: str = "adam", max_energy_gap: float = 1e3,
                 max_grad_norm: float = 1e8, snapshot_every: int = 50):
        super().__init__()
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer={optimizer!r}: use 'adam' (reference code) or 'sgd' (Algorithm 2)")
        if not 0.0 <= rejuvenation <= 1.0:
            raise ValueError(f"rejuvenation={rejuvenation}: a fraction in [0, 1]")
        self.save_hyperparameters()
        self.net = EnergyNet(in_chans, channels, down, activation)
        # The persistent bank is part of the state: a resumed fit continues the same chains.
        self.register_buffer("bank", torch.rand(bank_size, in_chans, img_size, img_size) * 2 - 1)
        self._last_good: tuple[int, dict] | None = None

    # ---- energy and sampling -------------------------------------------------------------------------------------
    def forward(self, x_pm1: torch.Tensor) -> torch.Tensor:
        """G_θ(x) for images in [−1, 1]; one energy per sample."""
        return self.net(x_pm1)

    def energy(self, images: torch.Tensor) -> torch.Tensor:
        """G_θ for [0, 1] images (used to rank images by energy, PureGen-FILT)."""
        return self(images * 2 - 1)

    def purify(self, images: torch.Tensor, steps: int = 150, step_size: float | None = None,
               temperature: float | None = None, generator: torch.Generator | None = None,
               record_every: int = 0, bf16: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Mid-run Langevin purification Ψ_T (thesis Algorithm 1, §6.3.4) of [0, 1] images; returns [0, 1] images
        (clamped only at the end, as the reference code does) and the optional trajectory records in [0, 1].

        ``bf16`` evaluates the energy under bf16 autocast (a GPU speed-up); the update itself stays in float32
        because the gradient is divided by T = 1e-4 and summed over hundreds of steps.
        """
        step_size = self.hparams.step_size if step_size is None else step_size
        temperature = self.hparams.temperature if temperature is None else temperature

        def energy_fn(x):
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
                return self(x)

        x, records = langevin_chain(energy_fn, images * 2 - 1, steps, step_size, temperature, generator,
                                    record_every)
        return ((x.clamp(-1, 1) + 1) / 2).detach(), [(r.clamp(-1, 1) + 1) / 2 for r in records]

    # ---- training (Algorithm 2) ----------------------------------------------------------------------------------
    def draw_negatives(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Bank indices and their states, a ``rejuvenation`` fraction replaced by fresh uniform noise."""
        index = torch.randint(0, self.bank.shape[0], (batch_size,), device=self.bank.device)
        start = self.bank[index].clone()
        fresh = torch.rand(batch_size, device=self.bank.device) < self.hparams.rejuvenation
        start[fresh] = torch.rand_like(start[fresh]) * 2 - 1
        return index, start

    def training_step(self, batch, batch_idx):
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        positives = images * 2 - 1 + self.hparams.data_noise * torch.randn_like(images)
        index, start = self.draw_negatives(images.shape[0])
        was_training = self.net.training
        self.net.eval()
        negatives, _ = langevin_chain(self, start, self.hparams.mcmc_steps, self.hparams.step_size,
                                      self.hparams.temperature)
        self.net.train(was_training)
        self.bank[index] = negatives.detach().clamp(-1, 1)
        gap = self(positives).mean() - self(negatives.detach()).mean()
        loss = gap / self.hparams.temperature
        self.check_divergence(gap)
        self.log_dict({"train/energy_gap": gap.detach(), "train/loss": loss.detach()}, prog_bar=True)
        return loss

    def test_step(self, batch, batch_idx):
        """Sanity check of the learned density: mean energy of held-out images vs of uniform noise (lower = likelier)."""
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        self.log_dict({"test/energy_data": self.energy(images).mean(),
                       "test/energy_noise": self.energy(torch.rand_like(images)).mean()})

    def check_divergence(self, gap: torch.Tensor) -> None:
        gap = self.trainer.strategy.reduce(gap.detach(), reduce_op="mean") if self._trainer is not None else gap
        if not torch.isfinite(gap) or gap.abs() > self.hparams.max_energy_gap:
            self.stop_diverged(f"energy gap {gap.item():.4g} (limit ±{self.hparams.max_energy_gap:g})")

    def on_before_optimizer_step(self, optimizer) -> None:
        # Gradients are already synchronised across DDP ranks here, so every rank takes the same decision.
        norms = [p.grad.detach().norm() for p in self.parameters() if p.grad is not None]
        grad_norm = torch.stack(norms).norm() if norms else torch.zeros(())
        self.log("train/grad_norm", grad_norm)
        if not torch.isfinite(grad_norm) or grad_norm > self.hparams.max_grad_norm:
            self.stop_diverged(f"gradient norm {grad_norm.item():.4g} (limit {self.hparams.max_grad_norm:g})")
        if self.global_step % self.hparams.snapshot_every == 0:
            self._last_good = (self.global_step, copy.deepcopy({k: v.detach().cpu() for k, v in
                                                                self.state_dict().items()}))

    def stop_diverged(self, what: str) -> None:
        path = self.last_good_path()
        saved = "no healthy snapshot was taken yet"
        if self._last_good is not None:
            step, state = self._last_good
            self.load_state_dict(state)
            self.trainer.save_checkpoint(path)
            saved = f"the weights of step {step} are kept at {path}"
        raise EBMDivergenceError(
            f"EBM training diverged at step {self.global_step}: {what}; {saved}. Lower model.lr, raise "
            f"model.temperature or model.mcmc_steps, or resume from that checkpoint with ckpt_path=...")

    def last_good_path(self) -> Path:
        callback = self.trainer.checkpoint_callback
        folder = Path(callback.dirpath) if callback is not None and callback.dirpath else Path(
            self.trainer.default_root_dir)
        return folder / "ebm_last_good.ckpt"

    def configure_optimizers(self):
        if self.hparams.optimizer == "sgd":
            return torch.optim.SGD(self.net.parameters(), lr=self.hparams.lr)
        return torch.optim.Adam(self.net.parameters(), lr=self.hparams.lr)

    # ---- shipped weights -----------------------------------------------------------------------------------------
    def export(self, path: str | Path) -> None:
        """Save hyperparameters + network weights only (no bank, no optimizer): the compact form shipped as package
        data and loaded by :meth:`load_exported`; a shipped file's SHA-256 goes into ``weights/SHA256SUMS``
        (checked by :meth:`pretrained`)."""
        hparams = dict(self.hparams)
        torch.save({"hparams": hparams, "net": {k: v.half() if v.is_floating_point() else v
                                                for k, v in self.net.state_dict().items()}}, path)

    @classmethod
    def load_exported(cls, path: str | Path) -> "EBM":
        payload = load_plain(path, "exported EBM weights")
        check_finite(payload["net"], str(path), "exported EBM weights")
        hparams = dict(payload["hparams"], bank_size=1)
        model = cls(**hparams)
        model.net.load_state_dict({k: v.float() for k, v in payload["net"].items()})
        return model.eval()

    @classmethod
    def pretrained(cls, name: str = "digits") -> "EBM":
        """The small EBM shipped with the package (see docs/results.md for the command that reproduced it)."""
        if name not in PRETRAINED:
            raise ValueError(f"pretrained EBM {name!r} does not exist: use one of {sorted(PRETRAINED)}")
        path = resources.files("lit_robust").joinpath("weights", PRETRAINED[name])
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: reinstall lit-robust or train one with "
                                    "`python train.py experiment=ebm_digits` and EBM.export(...)")
        with resources.as_file(path) as local:
            check_sha256(local, shipped_sha256(PRETRAINED[name]),
                         "reinstall lit-robust (pip install --force-reinstall lit-robust), or rebuild the weights with "
                         "`python train.py experiment=ebm_digits` and EBM.export(...)")
            return cls.load_exported(local)


def shipped_sha256(filename: str) -> str:
    """The SHA-256 that ``lit_robust/weights/SHA256SUMS`` (``sha256sum`` format, shipped beside the weights)
    records for ``filename``."""
    sums = resources.files("lit_robust").joinpath("weights", "SHA256SUMS").read_text().split("\n")
    recorded = {name: digest for digest, name in (line.split(maxsplit=1) for line in sums if line.strip())}
    if filename not in recorded:
        raise KeyError(f"lit_robust/weights/SHA256SUMS records no checksum for {filename}: add one "
                       f"(cd lit_robust/weights && sha256sum {filename} >> SHA256SUMS)")
    return recorded[filename]


def load_ebm(source: str) -> EBM:
    """An EBM from ``pretrained:<name>``, an exported ``.pt`` file or a Lightning ``.ckpt``."""
    if source.startswith("pretrained:"):
        return EBM.pretrained(source.split(":", 1)[1])
    if not Path(source).is_file():
        raise FileNotFoundError(f"EBM weights {source!r} not found: pass pretrained:digits, an exported .pt "
                                "or a checkpoint of `train.py experiment=ebm_digits`")
    if source.endswith(".ckpt"):
        # refuse code in the file, and NaN/inf weights, naming it before Lightning reads it
        check_finite(load_plain(source, "EBM checkpoint", mmap=True)["state_dict"], source, "EBM checkpoint")
        return EBM.load_from_checkpoint(source, map_location="cpu", weights_only=True).eval()
    return EBM.load_exported(source)
