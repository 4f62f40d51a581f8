"""Deep CAMA, the causal manipulation augmented model (seed 002, §3.1–3.2, App. A and C).

A generative classifier that follows the causal graph Y → X ← Z, M → X:

    p_θ(x, y, z, m) = p(m) p(z) p(y) p_θ(x | y, z, m)                      (Eq. 1)
    q_φ(z, m | x, y) = q_φ1(z | x, y, m) q_φ2(m | x)                         (Eq. 2)

and, for generic measurement data (§3.2), its Markov blanket version with parents A and co-parents C of Y:

    p_θ(x, y, z, m, a, c) = p(a) p(m) p(z) p(c) p_θ1(y | a) p_θ2(x | y, c, z, m)    (Eq. 9)
    q_φ(z, m | x, y, a, c) = q_φ1(z | x, y, m, a, c) q_φ2(m | x)                   (Eq. 10)

whose Bayes rule p(y | a, x, c) ∝ p(y | a) p(x | y, c) (Eq. 11) ignores how C was set: shifting C changes X only
through the mechanism p(x | y, c) the model has learned. Images use a Bernoulli decoder and a uniform p(y);
measurement rows [a, c, x] (``child_dim`` > 0) a Gaussian decoder over x and an MLP p(y | a). Everything else —
the ELBOs, Eq. 6's importance weights, fine-tuning — is the same code for both.

Clean data is fitted with the intervention ELBO under do(m = 0) (Eq. 3), manipulated data with the joint ELBO
(Eq. 4), mixed by λ (Eq. 5); prediction is Bayes' rule with K importance samples per class (Eq. 6); at test time
only NN_M^p and NN_M^q are fine-tuned on unlabelled manipulated data via the marginal ELBO (Eqs. 7, 8).

The networks follow App. C (MNIST): NN_Y^p, NN_Z^p MLPs [·, 500, 500], NN_M^p [·, 500 × 4], a projection to a
4×4×64 tensor and three stride-2 3×3 deconvolutions (the last to one channel, Bernoulli logits); NN_M^q three
{conv 3×3, max-pool} blocks of 64 channels + MLP [4·4·64, 500, 2·dim m]; q(z|x, y, m) the same CNN with 5×5 filters,
MLP [4·4·64, 500], then with y and m an MLP [500 + dim y + dim m, 500, 2·dim z].
Deviations: the deconvolutions produce 8·⌈s/8⌉ pixels (32 for MNIST's 28) and the output is centre-cropped to the
image size, since three stride-2 steps from 4×4 cannot give 28; the KL terms of the training ELBOs are analytic
(same expectation as the paper's Monte Carlo form, lower variance) while Eq. 6 keeps the sampled importance weights;
the Bernoulli pixel probabilities can be kept in [δ, 1 − δ] (``pixel_floor``, measured reason in the class docstring);
Eq. 6 can refine each class's q(z|x, y, m) on the test image before weighting (``refine_steps``, ditto).
The measurement networks (the paper states no sizes for them) are MLPs of width h = ``hidden``: NN_Y^p, NN_C^p,
NN_Z^p [·, h, h], NN_M^p [·, h, h, h], merged like the image decoder's projection, then [h, h, dim x] to the mean of
x with a learned per-dimension variance; q(m|x) an MLP [dim x, h, h, 2·dim m] on x alone, q(z|·) an MLP
[a + c + x, h, h] on the whole row followed by the image model's head with y and m.
Everything runs in float32: the Bernoulli log-likelihood sums 784 terms per image and decides the class by small
differences, which bf16 would blur.
"""
from __future__ import annotations

import math
from typing import Iterable

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from lit_robust.functional.augment import random_shift

LOG_2PI = math.log(2 * math.pi)


# ----------------------------------------------------------------------------------------------- pure functions
def log_normal(x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, diag(exp(logvar))), summed over the last dimension."""
    return -0.5 * (LOG_2PI + logvar + (x - mean) ** 2 / logvar.exp()).sum(-1)


def kl_to_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) ‖ N(0, I)), summed over the last dimension."""
    return 0.5 * (mean ** 2 + logvar.exp() - 1.0 - logvar).sum(-1)


def bernoulli_log_likelihood(logits: torch.Tensor, x: torch.Tensor, floor: float = 0.0) -> torch.Tensor:
    """log p(x | logits) of a pixel-wise Bernoulli decoder on [0, 1] images, summed over (C, H, W), with pixel
    probabilities p = δ + (1 − 2δ) σ(logits) for ``floor`` δ (a 2δ mixture with a fair coin per pixel), so that no
    pixel costs more than log(1/δ) nats and ∂ log p / ∂x is at most log((1 − δ)/δ) per pixel."""
    x = x.expand_as(logits)
    if floor == 0.0:
        return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(-3).sum(-1)
    log_floor, log_rest = logits.new_tensor(math.log(floor)), math.log1p(-2 * floor)   # 0-dim: broadcast, not copied
    log_p = torch.logaddexp(log_floor, log_rest + F.logsigmoid(logits))
    log_not_p = torch.logaddexp(log_floor, log_rest + F.logsigmoid(-logits))
    return (x * log_p + (1 - x) * log_not_p).flatten(-3).sum(-1)


def reparameterise(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """A sample of N(mean, exp(logvar)) that is differentiable in both parameters."""
    return mean + (0.5 * logvar).exp() * torch.randn_like(mean)


def mlp(sizes: Iterable[int], last_activation: bool = True) -> nn.Sequential:
    """Linear layers of the given widths with ReLU between them (and after the last one if ``last_activation``)."""
    sizes = list(sizes)
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if last_activation or i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


# ------------------------------------------------------------------------------------------------------ networks
class ConvFeatures(nn.Module):
    """Three {conv k×k (SAME), ReLU, 2× max-pool (ceil)} blocks of ``width`` channels, flattened (App. C q nets):
    28×28 → 4×4×64."""

    def __init__(self, in_chans: int, img_size: int, kernel_size: int, width: int = 64):
        super().__init__()
        layers: list[nn.Module] = []
        channels, size = in_chans, img_size
        for _ in range(3):
            layers += [nn.Conv2d(channels, width, kernel_size, padding=kernel_size // 2), nn.ReLU(),
                       nn.MaxPool2d(2, ceil_mode=True)]
            channels, size = width, math.ceil(size / 2)
        self.net = nn.Sequential(*layers, nn.Flatten())
        self.out_features = width * size * size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class RowFeatures(nn.Module):
    """The measurement counterpart of :class:`ConvFeatures`: an MLP [len(columns), hidden] with ReLU on the selected
    ``columns`` of a row."""

    def __init__(self, columns: slice, width: int, hidden: int):
        super().__init__()
        self.columns, self.out_features = columns, hidden
        self.net = mlp([width, hidden])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x[..., self.columns])


def row_layout(parent_dim: int, coparent_dim: int, child_dim: int) -> tuple[slice, slice, slice]:
    """The columns of a measurement row [a, c, x]: parents A, co-parents C, children X of Y (§3.2)."""
    return (slice(0, parent_dim), slice(parent_dim, parent_dim + coparent_dim),
            slice(parent_dim + coparent_dim, parent_dim + coparent_dim + child_dim))


class CamaDecoder(nn.Module):
    """p_θ(x | y, z, m): feature nets NN_Y^p, NN_Z^p, NN_M^p and the shallow NN_merge^p (projection to 4×4×64 and
    three stride-2 deconvolutions). The projection of the concatenated features is written as a sum of three
    linear maps, so that each feature can be computed once and broadcast (classes × samples × batch in Eq. 6)."""

    def __init__(self, num_classes: int, dim_z: int, dim_m: int, in_chans: int, img_size: int, hidden: int = 500,
                 channels: int = 64, pixel_floor: float = 0.0):
        super().__init__()
        self.pixel_floor = pixel_floor
        self.nn_y = mlp([num_classes, hidden, hidden])
        self.nn_z = mlp([dim_z, hidden, hidden])
        self.nn_m = mlp([dim_m, hidden, hidden, hidden, hidden])
        self.base = math.ceil(img_size / 8)
        self.channels, self.img_size = channels, img_size
        projected = channels * self.base * self.base
        self.project_y = nn.Linear(hidden, projected)
        self.project_z = nn.Linear(hidden, projected, bias=False)
        self.project_m = nn.Linear(hidden, projected, bias=False)

        def deconv(c_in, c_out):
            return nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1, output_padding=1)

        self.deconv = nn.Sequential(deconv(channels, channels), nn.ReLU(), deconv(channels, channels), nn.ReLU(),
                                    deconv(channels, in_chans))

    def merge(self, h_y: torch.Tensor, h_z: torch.Tensor, h_m: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits (..., C, H, W) from broadcastable features (..., hidden)."""
        h = F.relu(self.project_y(h_y) + self.project_z(h_z) + self.project_m(h_m))
        lead = h.shape[:-1]
        out = self.deconv(h.reshape(-1, self.channels, self.base, self.base))
        crop = (out.shape[-1] - self.img_size) // 2
        out = out[..., crop:crop + self.img_size, crop:crop + self.img_size]
        return out.reshape(*lead, *out.shape[1:])

    def forward(self, y_onehot: torch.Tensor, z: torch.Tensor, m: torch.Tensor,
                inputs: torch.Tensor | None = None) -> torch.Tensor:
        """Bernoulli logits; ``inputs`` (the images) are not read: an image's parents are y, z and m only."""
        h_y, h_z, h_m = self.nn_y(y_onehot), self.nn_z(z), self.nn_m(m)
        shape = torch.broadcast_shapes(h_y.shape, h_z.shape, h_m.shape)
        return self.merge(h_y.expand(shape), h_z.expand(shape), h_m.expand(shape))

    def log_likelihood(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x | y, z, m), summed over the pixels (``pixel_floor``: see :func:`bernoulli_log_likelihood`)."""
        return bernoulli_log_likelihood(logits, x, self.pixel_floor)


class RowDecoder(nn.Module):
    """p_θ2(x | y, c, z, m) of Eq. 9 on measurement rows [a, c, x]: NN_Y^p, NN_C^p, NN_Z^p, NN_M^p, their features
    merged as W_y h_y + W_c h_c + W_z h_z + W_m h_m (as :class:`CamaDecoder`), then an MLP to the mean of a Gaussian
    over the children x with a learned per-dimension log-variance."""

    def __init__(self, num_classes: int, dim_z: int, dim_m: int, layout: tuple[slice, slice, slice], hidden: int):
        super().__init__()
        self.coparent_columns, self.child_columns = layout[1], layout[2]
        coparent_dim, child_dim = (part.stop - part.start for part in layout[1:])
        self.nn_y, self.nn_z = mlp([num_classes, hidden, hidden]), mlp([dim_z, hidden, hidden])
        self.nn_c, self.nn_m = mlp([coparent_dim, hidden, hidden]), mlp([dim_m, hidden, hidden, hidden])
        self.project_y = nn.Linear(hidden, hidden)
        self.project_c, self.project_z, self.project_m = (nn.Linear(hidden, hidden, bias=False) for _ in range(3))
        self.head = mlp([hidden, hidden, child_dim], last_activation=False)
        self.logvar = nn.Parameter(torch.zeros(child_dim))

    def forward(self, y_onehot: torch.Tensor, z: torch.Tensor, m: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """The mean of x (..., dim x), broadcast over the leading dimensions of y, z, m and the rows ``inputs``."""
        h = F.relu(self.project_y(self.nn_y(y_onehot)) + self.project_c(self.nn_c(inputs[..., self.coparent_columns]))
                   + self.project_z(self.nn_z(z)) + self.project_m(self.nn_m(m)))
        return self.head(h)

    def log_likelihood(self, mean: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """log N(x; mean, diag(exp(logvar))) of the rows' children, summed over them."""
        return log_normal(inputs[..., self.child_columns], mean, self.logvar.expand_as(mean))


class ClassPrior(nn.Module):
    """log p(y): uniform without parents (images, Eq. 1), else p_θ1(y | a) of Eq. 9, an MLP [dim a, hidden, classes]
    of the parent columns."""

    def __init__(self, num_classes: int, parents: slice, hidden: int):
        super().__init__()
        self.num_classes, self.parent_columns = num_classes, parents
        width = parents.stop - parents.start
        self.net = mlp([width, hidden, num_classes], last_activation=False) if width else None

    def forward(self, y_onehot: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """log p(y | a) of the one-hot classes ``y_onehot`` (..., C) for the rows ``inputs``, broadcast."""
        if self.net is None:
            return y_onehot.new_full(y_onehot.shape[:-1], -math.log(self.num_classes))
        return (y_onehot * torch.log_softmax(self.net(inputs[..., self.parent_columns]), dim=-1)).sum(-1)


class GaussianEncoder(nn.Module):
    """q(m | x) (NN_M^q): ``features`` (CNN for images, MLP for rows) + MLP [features, 500, 2·dim] → mean and
    log-variance."""

    def __init__(self, features: nn.Module, dim: int, hidden: int = 500):
        super().__init__()
        self.features = features
        self.head = mlp([self.features.out_features, hidden, 2 * dim], last_activation=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.features(x)).chunk(2, dim=-1)


class ZEncoder(nn.Module):
    """q(z | x, y, m): ``trunk`` (CNN 5×5 for images; for rows an MLP on [a, c, x], Eq. 10) + MLP [features, 500]
    on x, then with y and m an MLP [500 + dim y + dim m, 500, 2·dim z]. ``features`` and ``head`` are separate so
    Eq. 6 runs the trunk once per input for all classes."""

    def __init__(self, trunk: nn.Module, num_classes: int, dim_z: int, dim_m: int, hidden: int = 500):
        super().__init__()
        self.trunk = trunk
        self.embed = mlp([self.trunk.out_features, hidden])
        self.head_net = mlp([hidden + num_classes + dim_m, hidden, 2 * dim_z], last_activation=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.trunk(x))

    def head(self, h_x: torch.Tensor, y_onehot: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = torch.broadcast_shapes(h_x.shape[:-1], y_onehot.shape[:-1], m.shape[:-1])
        inputs = torch.cat([h_x.expand(*shape, -1), y_onehot.expand(*shape, -1), m.expand(*shape, -1)], dim=-1)
        return self.head_net(inputs).chunk(2, dim=-1)


# ------------------------------------------------------------------------------------------------------- module
class DeepCAMA(L.LightningModule):
    """Deep CAMA on [0, 1] images with a Bernoulli decoder (seed 002 §3.1), or on measurement rows [a, c, x] with a
    Gaussian decoder and p(y | a) (§3.2) when ``child_dim`` > 0.

    Args:
        parent_dim, coparent_dim, child_dim: the widths of a measurement row's parents A, co-parents C and children
            X of Y (§3.2; ``in_chans`` and ``img_size`` unused, null in the config); ``child_dim`` 0: images of
            ``in_chans`` × ``img_size`` × ``img_size``.
        pixel_floor: δ of the decoder's pixel probabilities δ + (1 − 2δ) σ(logits) (0 = the paper's plain Bernoulli).
            Deviation, measured on the embedded MNIST digits, whose backgrounds are exact zeros: the plain Bernoulli
            rewards ever more negative background logits (trained: mean −12.9, 1 % below −30), so a 0.05 change of a
            background pixel costs up to 1.5 nats, differently per class. Random ±0.05 sign noise — no attack —
            then dropped accuracy from 97.5 % to 67.5 %, and PGD at ε = 0.05 did no better than that noise. With
            δ > 0 no pixel can weigh more than log((1 − δ)/δ) per unit of change. Trained with δ = 0.01 (the config's
            default): clean accuracy 94.1 % (plain: 93.0 %), random ±0.05 noise 95 %, PGD at ε = 0.05 85 % (plain:
            67 %); δ = 0.02 cost 2.5 points of clean accuracy.
        lam: λ of Eq. 5, the weight of the do(m = 0) ELBO on clean data. The manipulated set D' is the batch
            translated by up to ``augment_shift`` pixels (the paper's augmented training); with ``augment_shift=0``
            D' is the clean batch itself, so that q(m|x) and NN_M^p are trained to encode "no manipulation" under
            the joint ELBO — with λ = 1 (the paper's clean-only case read literally) q(m|x) would stay at its random
            initialisation and Eq. 6, which samples m ~ q(m|x), would feed the decoder values it never saw.
        kl_warmup_steps: training steps over which the KL terms' weight rises linearly to 1. Trained from the
            start at weight 1, the App. C model collapsed q(z|x, y, m) onto the prior within 50 steps (KL(z) ≈ 0.02
            nats) and stayed there: p(x|y) became one template per class and clean accuracy stalled near 81 %.
            The paper states no schedule; warm-up is the standard remedy (Bowman et al. 2016, Sønderby et al. 2016).
        num_samples: K of Eq. 6 at test time (``val_num_samples`` during validation, cheaper).
        refine_steps, refine_lr: Adam steps (and their learning rate) that refine each class's q(z|x, y_c, m) on the
            test image before Eq. 6 weighs its samples (semi-amortised inference, Kim et al. 2018); 0 = the paper's
            encoder output. Deviation, measured on shifted digits: the encoder, trained on centred digits, proposes
            poor z for shifted ones, so Eq. 6's estimate of p(x | y) is loosest exactly off the training manifold.
            With 30 steps at lr 0.05 (the ``cama_digits_shift`` setting; 900 test images, seeds 0 and 2) horizontal
            3 px accuracy went from 2.6 and 4.0 points below the dense DNN to −0.2 and +2.8 (five runs without it:
            −2.6 to −8.4); clean accuracy stayed within 2 points of the DNN; the vertical lead shrank on seed 2
            (3 px: +9.7 → +3.5) but stayed. Costs 30 decoder forward/backward passes per class and image, hence off
            by default.
            Attacks need no gradient through the refinement: at its optimum, d ELBO*/dx = ∂ELBO/∂x (envelope
            theorem), which is what the detached refinement gives.
        ft_steps, ft_lr, ft_batch_size, ft_alpha, ft_intervention: test-time fine-tuning (Eq. 8): Adam steps, its
            learning rate, the batch of unlabelled test and labelled clean images, α, and whether the clean term uses
            the do(m = 0) ELBO (App. Fig. 20) instead of the joint ELBO. Defaults measured on shifted digits: the
            joint ELBO keeps clean accuracy (with the do(m = 0) term, clean images — whose m comes from the tuned
            q(m|x) — lost 7 points), and lr 1e-4 × 100 steps changed nothing.
    """

    def __init__(self, num_classes: int = 10, in_chans: int | None = 1, img_size: int | None = 28, dim_z: int = 64,
                 dim_m: int = 32,
                 hidden: int = 500, pixel_floor: float = 0.0, lam: float = 0.5, augment_shift: int = 0,
                 kl_warmup_steps: int = 0, num_samples: int = 10, val_num_samples: int = 2, refine_steps: int = 0,
                 refine_lr: float = 0.05, lr: float = 1e-3,
                 weight_decay: float = 0.0, ft_steps: int = 200, ft_lr: float = 1e-3, ft_batch_size: int = 32,
                 ft_alpha: float = 0.5, ft_intervention: bool = False, parent_dim: int = 0, coparent_dim: int = 0,
                 child_dim: int = 0):
        super().__init__()
        if not 0.0 <= lam <= 1.0 or not 0.0 <= ft_alpha <= 1.0:
            raise ValueError(f"model.lam={lam} and model.ft_alpha={ft_alpha} are mixing weights: use values in [0, 1]")
        if not 0.0 <= pixel_floor < 0.5:
            raise ValueError(f"model.pixel_floor={pixel_floor} is the decoder's least pixel probability: use [0, 0.5)")
        if refine_steps < 0:
            raise ValueError(f"model.refine_steps={refine_steps}: use 0 (the encoder's q(z|x, y, m) as is) or more")
        if num_samples < 1 or val_num_samples < 1:
            raise ValueError(f"model.num_samples={num_samples}, val_num_samples={val_num_samples}: K must be ≥ 1")
        if min(parent_dim, coparent_dim, child_dim) < 0 or (child_dim == 0 and parent_dim + coparent_dim > 0):
            raise ValueError(f"model.parent_dim={parent_dim}, coparent_dim={coparent_dim}, child_dim={child_dim}: "
                             "measurement rows need child_dim > 0 (and widths ≥ 0); images leave all three 0")
        if child_dim and augment_shift:
            raise ValueError(f"model.augment_shift={augment_shift} translates images: use 0 for measurement rows")
        self.save_hyperparameters()
        layout = row_layout(parent_dim, coparent_dim, child_dim)
        if child_dim:
            self.decoder = RowDecoder(num_classes, dim_z, dim_m, layout, hidden)
            self.q_m = GaussianEncoder(RowFeatures(layout[2], child_dim, hidden), dim_m, hidden)
            whole_row = slice(0, layout[2].stop)
            self.q_z = ZEncoder(RowFeatures(whole_row, layout[2].stop, hidden), num_classes, dim_z, dim_m, hidden)
        else:
            self.decoder = CamaDecoder(num_classes, dim_z, dim_m, in_chans, img_size, hidden, pixel_floor=pixel_floor)
            self.q_m = GaussianEncoder(ConvFeatures(in_chans, img_size, kernel_size=3), dim_m, hidden)
            self.q_z = ZEncoder(ConvFeatures(in_chans, img_size, kernel_size=5), num_classes, dim_z, dim_m, hidden)
        self.prior = ClassPrior(num_classes, layout[0], hidden)
        self.metrics = nn.ModuleDict({f"{s}_acc": MulticlassAccuracy(num_classes, average="micro")
                                      for s in ("val", "test")})

    # -- the selective part of Fig. 4 -----------------------------------------------------------------------------
    def manipulation_parameters(self) -> list[nn.Parameter]:
        """NN_M^p and NN_M^q, the only networks fine-tuned at test time (§3.1, Fig. 4), with NN_M^p ending in
        ``project_m``: NN_merge's first layer acts on [h_y; h_z; h_m] as W_y h_y + W_z h_z + W_m h_m, and W_m h_m
        depends on m alone, so W_m is the m-only part of that layer. Training on clean data teaches W_m to
        ignore h_m's variation; left frozen, fine-tuning NN_M^p alone moved shifted accuracy by < 1 point."""
        return [*self.decoder.nn_m.parameters(), *self.decoder.project_m.parameters(), *self.q_m.parameters()]

    def _onehot(self, y: torch.Tensor) -> torch.Tensor:
        return F.one_hot(y, self.hparams.num_classes).float()

    def _check_inputs(self, x: torch.Tensor) -> None:
        hp = self.hparams
        if hp.child_dim:
            width = hp.parent_dim + hp.coparent_dim + hp.child_dim
            if x.dim() != 2 or x.shape[1] != width:
                raise ValueError(f"DeepCAMA expects rows (B, {width}) of [a, c, x], got {tuple(x.shape)}: set "
                                 "model.parent_dim/coparent_dim/child_dim to the data's")
            return
        if x.dim() != 4 or tuple(x.shape[1:]) != (hp.in_chans, hp.img_size, hp.img_size):
            raise ValueError(f"DeepCAMA expects images (B, {hp.in_chans}, {hp.img_size}, {hp.img_size}), got "
                             f"{tuple(x.shape)}: set model.img_size/in_chans to the data's (or data.img_size)")

    def _elbo_given_m(self, x, y_onehot, h_x, m, kl_m, kl_weight: float = 1.0):
        z_mean, z_logvar = self.q_z.head(h_x, y_onehot, m)
        z = reparameterise(z_mean, z_logvar)
        decoded = self.decoder(y_onehot, z, m, x)
        kl = kl_to_standard_normal(z_mean, z_logvar) + kl_m
        return self.decoder.log_likelihood(decoded, x) + self.prior(y_onehot, x) - kl_weight * kl

    # -- equations -------------------------------------------------------------------------------------------------
    def intervention_elbo(self, x: torch.Tensor, y: torch.Tensor, kl_weight: float = 1.0) -> torch.Tensor:
        """Eq. 3: ELBO(x, y, do(m = 0)) = E_q(z|x,y,m=0)[log p(x|y,z,m=0) p(y) p(z) / q(z|x,y,m=0)], per sample
        (``kl_weight`` < 1 only during the KL warm-up)."""
        m = x.new_zeros(x.shape[0], self.hparams.dim_m)
        return self._elbo_given_m(x, self._onehot(y), self.q_z.features(x), m, 0.0, kl_weight)

    def joint_elbo(self, x: torch.Tensor, y: torch.Tensor, kl_weight: float = 1.0) -> torch.Tensor:
        """Eq. 4: ELBO(x, y) = E_q(z,m|x,y)[log p(x, y, z, m) / q(z, m|x, y)], per sample (one sample of m, z)."""
        m_mean, m_logvar = self.q_m(x)
        m = reparameterise(m_mean, m_logvar)
        return self._elbo_given_m(x, self._onehot(y), self.q_z.features(x), m, kl_to_standard_normal(m_mean, m_logvar),
                                  kl_weight)

    def augmented_objective(self, x_clean, y_clean, x_manip, y_manip, kl_weight: float = 1.0) -> torch.Tensor:
        """Eq. 5: λ E_D[ELBO(x, y, do(m=0))] + (1 − λ) E_D'[ELBO(x, y)] (to be maximised)."""
        lam = self.hparams.lam
        objective = x_clean.new_zeros(())
        if lam > 0:
            objective = lam * self.intervention_elbo(x_clean, y_clean, kl_weight).mean()
        if lam < 1:
            objective = objective + (1 - lam) * self.joint_elbo(x_manip, y_manip, kl_weight).mean()
        return objective

    def kl_weight(self) -> float:
        """The KL warm-up: the weight of the KL terms rises linearly from ~0 to 1 over ``kl_warmup_steps``."""
        warmup = self.hparams.kl_warmup_steps
        return min(1.0, (self.global_step + 1) / warmup) if warmup > 0 else 1.0

    def marginal_elbo(self, x: torch.Tensor) -> torch.Tensor:
        """Eq. 7: ELBO(x) = log Σ_c exp ELBO(x, y_c), per sample; all classes in one batched pass (one m sample per
        image shared by the classes)."""
        c = self.hparams.num_classes
        m_mean, m_logvar = self.q_m(x)
        m = reparameterise(m_mean, m_logvar)
        classes = torch.eye(c, device=x.device).unsqueeze(1)                       # (C, 1, C)
        elbos = self._elbo_given_m(x, classes, self.q_z.features(x), m, kl_to_standard_normal(m_mean, m_logvar))
        return torch.logsumexp(elbos, dim=0)                                        # (C, B) → (B,)

    def predict_log_probs(self, x: torch.Tensor, num_samples: int | None = None,
                          refine_steps: int | None = None) -> torch.Tensor:
        """Eq. 6: log p(y | x) ≈ log-softmax_c log Σ_k p(x|y_c, z_c^k, m^k) p(y_c) p(z_c^k) / q(z_c^k|x, y_c, m^k)
        (for rows, Eq. 11: p(y_c | a) and p(x | y_c, c, z, m) in their places),
        with m^k ~ q(m|x) shared across classes and z_c^k ~ q(z|x, y_c, m^k); batched over (K, C, B). With
        ``refine_steps`` > 0 (default: the hyperparameter), one m ~ q(m|x) per image (Eq. 6's single m^u) and each
        class's q(z|x, y_c, m) refined on x first (``refine_posterior``)."""
        self._check_inputs(x)
        k, c = num_samples or self.hparams.num_samples, self.hparams.num_classes
        m_mean, m_logvar = self.q_m(x)
        refine_steps = self.hparams.refine_steps if refine_steps is None else refine_steps
        refine = refine_steps > 0
        draws = 1 if refine else k
        m = reparameterise(m_mean.expand(draws, -1, -1), m_logvar.expand(draws, -1, -1)).unsqueeze(1)  # (K|1, 1, B, dm)
        classes = torch.eye(c, device=x.device).view(1, c, 1, c)                                 # (1, C, 1, C)
        z_mean, z_logvar = self.q_z.head(self.q_z.features(x), classes, m)                       # (K|1, C, B, dz)
        if refine:
            z_mean, z_logvar = self.refine_posterior(x, classes, m, z_mean, z_logvar, refine_steps)
        z = reparameterise(z_mean.expand(k, -1, -1, -1), z_logvar.expand(k, -1, -1, -1))        # (K, C, B, dz)
        decoded = self.decoder(classes, z, m, x)                                                 # (K, C, B, ...)
        log_w = (self.decoder.log_likelihood(decoded, x) + self.prior(classes, x)
                 + log_normal(z, torch.zeros_like(z), torch.zeros_like(z)) - log_normal(z, z_mean, z_logvar))
        log_px_y = torch.logsumexp(log_w, dim=0) - math.log(k)                                  # (C, B)
        return torch.log_softmax(log_px_y.t(), dim=-1)

    def refine_posterior(self, x, classes, m, z_mean, z_logvar, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Semi-amortised inference (Kim et al. 2018): starting from the encoder's q(z|x, y_c, m), ``steps``
        Adam steps on each (class, image) Gaussian's mean and log-variance maximise the one-sample ELBO
        log p(x|y_c, z, m) − KL(q ‖ p(z)). Network weights stay fixed and get no gradients; the result is
        detached, so gradients of Eq. 6 with respect to x do not flow through the refinement."""
        hp = self.hparams
        with torch.inference_mode(False), torch.enable_grad():      # also inside trainer.test's inference mode
            x, m, classes = x.detach().clone(), m.detach().clone(), classes.clone()
            mean, logvar = z_mean.detach().clone().requires_grad_(), z_logvar.detach().clone().requires_grad_()
            optimizer = torch.optim.Adam([mean, logvar], lr=hp.refine_lr)
            for _ in range(steps):
                z = reparameterise(mean, logvar)
                elbo = (self.decoder.log_likelihood(self.decoder(classes, z, m, x), x)
                        - kl_to_standard_normal(mean, logvar))
                mean.grad, logvar.grad = torch.autograd.grad(-elbo.sum(), [mean, logvar])
                optimizer.step()
        return mean.detach(), logvar.detach()

    def fine_tune_objective(self, x_test, x_clean, y_clean) -> torch.Tensor:
        """Eq. 8: α E_D[ELBO(x, y)] + (1 − α) E_D̃[ELBO(x)] (the clean term is Eq. 3 if ``ft_intervention``)."""
        alpha = self.hparams.ft_alpha
        clean = self.intervention_elbo if self.hparams.ft_intervention else self.joint_elbo
        return alpha * clean(x_clean, y_clean).mean() + (1 - alpha) * self.marginal_elbo(x_test).mean()

    @torch.enable_grad()
    def fine_tune(self, x_test: torch.Tensor, x_clean: torch.Tensor, y_clean: torch.Tensor,
                  steps: int | None = None, lr: float | None = None, generator: torch.Generator | None = None) -> list[float]:
        """Test-time adaptation (§3.1): maximise Eq. 8 with Adam over NN_M^p and NN_M^q only, on unlabelled
        manipulated ``x_test`` and labelled clean data; every other parameter keeps its value. Returns the
        objective per step. Works in place (``fine_tuned_copy`` keeps the original)."""
        hp = self.hparams
        steps, lr = hp.ft_steps if steps is None else steps, hp.ft_lr if lr is None else lr
        if len(x_test) == 0 or len(x_clean) == 0:
            raise ValueError("fine_tune needs unlabelled test images and labelled clean images; got an empty set")
        tuned = self.manipulation_parameters()
        tuned_ids = {id(p) for p in tuned}
        frozen = [p for p in self.parameters() if id(p) not in tuned_ids and p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        optimizer = torch.optim.Adam(tuned, lr=lr)
        was_training = self.training
        self.train()
        history = []
        try:
            for _ in range(steps):
                i = torch.randint(len(x_test), (min(hp.ft_batch_size, len(x_test)),), generator=generator)
                j = torch.randint(len(x_clean), (min(hp.ft_batch_size, len(x_clean)),), generator=generator)
                objective = self.fine_tune_objective(x_test[i].to(self.device), x_clean[j].to(self.device),
                                                     y_clean[j].to(self.device))
                optimizer.zero_grad(set_to_none=True)
                (-objective).backward()
                optimizer.step()
                history.append(objective.item())
        finally:
            for p in frozen:
                p.requires_grad_(True)
            self.train(was_training)
        return history

    def fine_tuned_copy(self, x_test, x_clean, y_clean, **kwargs) -> "DeepCAMA":
        """A fine-tuned copy (same hyperparameters and weights); the model itself is left as it is."""
        model = type(self)(**self.hparams).to(self.device)
        model.load_state_dict(self.state_dict())
        model.fine_tune(x_test, x_clean, y_clean, **kwargs)
        return model.eval()

    # -- Lightning -------------------------------------------------------------------------------------------------
    @override
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Checkpoints that name q(z|·)'s trunk ``q_z.cnn`` (its name when only images were modelled) load too."""
        state = checkpoint.get("state_dict", {})
        for key in [key for key in state if key.startswith("q_z.cnn.")]:
            state["q_z.trunk." + key.removeprefix("q_z.cnn.")] = state.pop(key)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class log-probabilities (Eq. 6) of [0, 1] images."""
        return self.predict_log_probs(x)

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        self._check_inputs(x)
        x_manip = x
        if self.hparams.augment_shift > 0:
            x_manip = random_shift(x, self.hparams.augment_shift)
        objective = self.augmented_objective(x, y, x_manip, y, self.kl_weight())
        loss = -objective
        if not torch.isfinite(loss):
            raise FloatingPointError(f"deep CAMA loss became {loss.item()} at step {self.global_step}; lower model.lr")
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, batch, split: str, num_samples: int, refine_steps: int | None = None) -> None:
        x, y = batch[0], batch[1]
        log_probs = self.predict_log_probs(x, num_samples, refine_steps)
        self.metrics[f"{split}_acc"](log_probs, y)
        self.log(f"{split}/acc", self.metrics[f"{split}_acc"], prog_bar=True)
        self.log(f"{split}/neg_elbo", -self.intervention_elbo(x, y).mean(), sync_dist=True)

    def validation_step(self, batch, batch_idx):
        # model selection with the encoder's q(z) as in training, cheap; refinement is for test-time scoring
        self._evaluate(batch, "val", self.hparams.val_num_samples, refine_steps=0)

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test", self.hparams.num_samples)

    def predict_step(self, batch, batch_idx):
        return self.predict_log_probs(batch[0]).argmax(-1)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
