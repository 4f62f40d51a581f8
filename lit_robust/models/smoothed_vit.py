"""Smoothed vision transformer (thesis 001 ch. 1, App. A): a base classifier trained on column/block ablations whose
majority vote over all ablations is certifiably robust to m×m adversarial patches (derandomized smoothing).

The base classifier sees the kept pixels plus a mask channel (``lit_robust.functional.ablations.ablate``). With a timm ViT it
runs our own forward built from timm's parts — patch embedding weights, class/register tokens, position embeddings,
blocks, norm, head — so that tokens whose patch has no kept pixel can be **dropped after the position embeddings are
added** (§1.3.1, Alg. 2; the class token is always kept), and many ablation positions run in one forward pass. Any
other backbone (``small_cnn``, a timm ResNet) is the CNN comparison of §1.2.1 and sees the whole ablated image.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from lit_robust.functional.ablations import (ablate, ablation_masks, ablation_positions, group_by_token_count,
                                             random_ablation_mask, tokens_touched)
from lit_robust.functional.derandomized_smoothing import ablation_votes, smoothed_prediction
from lit_robust.functional.vit_tokens import check_droppable_vit, logits_of_kept_tokens
from lit_robust.machine import stacked_pass_size
from lit_robust.models.classifier import ImageClassifier
from lit_robust.models.nets import create_backbone
from lit_robust.storage.serialization import load_plain


def patch_vectors(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) → (B, T, C·p·p): each p×p token flattened in the order of a Conv2d(kernel = stride = p) weight,
    tokens row-major as timm's patch embedding flattens them."""
    b, c, h, w = images.shape
    patches = images.unfold(2, patch_size, patch_size).unfold(3, patch_size, patch_size)  # (B, C, h/p, w/p, p, p)
    return patches.permute(0, 2, 3, 1, 4, 5).reshape(b, (h // patch_size) * (w // patch_size), -1)


def base_state_dict(state: dict, net: nn.Module) -> dict:
    """Weights for the base network from a plain state dict, a Lightning checkpoint of a ``SmoothedViT`` (keys under
    ``net.``), or a pretrained model without the mask channel: the patch embedding gets a zero weight for the mask
    channel (the pretrained ViT starts out ignoring it) and a head of another class count keeps its fresh
    initialisation — the paper fine-tunes ImageNet checkpoints this way (App. A.1.3)."""
    state = state.get("state_dict", state)
    if any(key.startswith("net.") for key in state):
        state = {key[4:]: value for key, value in state.items() if key.startswith("net.")}
    own = net.state_dict()
    adapted = {}
    for key, value in state.items():
        if key in own and value.dim() == 4 and own[key].dim() == 4 and value.shape[1] + 1 == own[key].shape[1]:
            value = torch.cat([value, value.new_zeros(value.shape[0], 1, *value.shape[2:])], dim=1)
        adapted[key] = value
    for key in ("head.weight", "head.bias"):
        if key in adapted and key in own and adapted[key].shape != own[key].shape:
            adapted[key] = own[key]
    missing = set(own) - set(adapted)
    if missing:
        raise ValueError(f"the weights lack {sorted(missing)[:5]}…: they are not for model.backbone="
                         f"{type(net).__name__} with these backbone_kwargs")
    return adapted


class SmoothedViT(ImageClassifier):
    """Derandomized-smoothing classifier: train the base classifier on random ablations, predict by majority vote.

    Args (beyond ``ImageClassifier``'s optimiser, schedule and augmentation arguments):
        backbone: any timm ViT name (``vit_tiny_patch16_224``, ``vit_small_patch16_224``, …; ``backbone_kwargs`` set
            e.g. ``img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3``) or a CNN name (the comparison).
        in_chans: image channels of the data; the base network gets ``in_chans + 1`` (the mask channel).
        img_size: the network's input side; images and masks are nearest-upsampled to it inside the model (the
            paper's 32 → 224 for CIFAR-10 on ImageNet ViTs, App. A.1.6). ``None``: the data's size.
        ablation, ablation_width, ablation_stride: ``column`` (b = 4 CIFAR-10, 19 ImageNet) or ``block`` (75 on
            ImageNet); the stride of the certification/prediction ablation set (App. A.4).
        token_dropping: drop fully ablated tokens in training and prediction (ViT only). It changes the computation
            (attention over fewer tokens), so it is a mode of the model: the ``Certification`` callback reports both.
        unablated_epochs: first epochs on whole images (mask all ones) — stands in for the paper's ImageNet
            pretraining when a ViT is trained from scratch on little data.
        val_stride: stride of the ablation set used for the smoothed ``val/acc`` (cheaper than certification).
        max_batch: most ablated images per forward pass when many positions are stacked (None: 128 on a CPU,
            1024 on a GPU; :func:`lit_robust.machine.stacked_pass_size`).
        weights_path: weights of the base network (a state dict with the mask channel, or a Lightning checkpoint).
    """

    resizes_inputs = True  # images of any size are upsampled to img_size (the runner skips its img_size check)

    def __init__(self, backbone: str = "vit_tiny_patch16_224", num_classes: int = 10, in_chans: int = 1,
                 backbone_kwargs: dict | None = None, img_size: int | None = None, ablation: str = "column",
                 ablation_width: int = 4, ablation_stride: int = 1, token_dropping: bool = True,
                 unablated_epochs: int = 0, val_stride: int = 1, max_batch: int | None = None,
                 mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.5,), max_shift: int = 0,
                 hflip: bool = False, label_smoothing: float = 0.0, optimizer: str = "adamw", lr: float = 1e-3,
                 weight_decay: float = 5e-4, momentum: float = 0.9, scheduler: str = "cosine",
                 warmup_epochs: int = 0, milestones: Sequence[int] = (100, 150), weights_path: str | None = None):
        # The parent owns metrics, normalisation, augmentation, the optimiser and the training step; its network is a
        # placeholder replaced below by one with the extra mask channel.
        super().__init__(backbone="small_cnn", num_classes=num_classes, in_chans=in_chans, mean=mean, std=std,
                         max_shift=max_shift, hflip=hflip, label_smoothing=label_smoothing, optimizer=optimizer,
                         lr=lr, weight_decay=weight_decay, momentum=momentum, scheduler=scheduler,
                         warmup_epochs=warmup_epochs, milestones=milestones)
        self.save_hyperparameters()
        self.ablation_masks(ablation, (ablation_width, ablation_width), ablation_width)  # validates kind and width
        kwargs = dict(backbone_kwargs or {})
        if img_size is not None and (backbone.startswith("vit") or "img_size" in kwargs):
            kwargs["img_size"] = img_size
        self.net = create_backbone(backbone, num_classes=num_classes, in_chans=in_chans + 1, **kwargs)
        self.is_vit = isinstance(self.net, VisionTransformer)
        if token_dropping:
            check_droppable_vit(self.net)
        if weights_path:
            self.net.load_state_dict(base_state_dict(load_plain(weights_path, "model.weights_path"), self.net))

    # ---- ablation sets -------------------------------------------------------------------------------------------
    @staticmethod
    def ablation_masks(kind: str, size: tuple[int, int], width: int, stride: int = 1) -> torch.Tensor:
        """All masks (A, H, W) of the strided ablation set."""
        return ablation_masks(kind, ablation_positions(kind, size, width, stride), size, width)

    def certification_masks(self, size: tuple[int, int], stride: int | None = None) -> torch.Tensor:
        hp = self.hparams
        return self.ablation_masks(hp.ablation, size, hp.ablation_width, stride or hp.ablation_stride).to(self.device)

    # ---- base classifier on ablations ----------------------------------------------------------------------------
    def _resize(self, images: torch.Tensor) -> torch.Tensor:
        size = self.hparams.img_size
        return images if size is None or images.shape[-1] == size else F.interpolate(images, size=(size, size))

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std

    def _vit_logits(self, images: torch.Tensor, masks: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
        """Logits (n·a, K) of the ViT on n images × a ablations keeping tokens ``token_index`` (a, k) — the same count
        k for every ablation, so the batch is one dense tensor. Ablated pixels are 0 in [0, 1] space before
        normalisation; tokens are embedded with the patch-embedding weights, get their position embedding, then
        the kept ones (and the prefix tokens) go through the blocks (Alg. 2)."""
        vit, p = self.net, self.net.patch_embed.proj.kernel_size[0]
        n, a, k = images.shape[0], masks.shape[0], token_index.shape[1]
        pixel_patches = patch_vectors(self._resize(images), p)  # (n, T, C·p·p)
        mask_patches = patch_vectors(self._resize(masks[:, None]), p)  # (a, T, p·p)
        rows = torch.arange(a, device=masks.device)[:, None]
        mask_kept = mask_patches[rows, token_index]  # (a, k, p·p)
        channels = pixel_patches.shape[-1] // (p * p)
        pixels = pixel_patches[:, token_index].view(n, a, k, channels, p * p)  # (n, a, k, C, p·p)
        ablated = self._normalise_patches(pixels * mask_kept[None, :, :, None])
        vectors = torch.cat([ablated, mask_kept[None, :, :, None].expand(n, -1, -1, -1, -1)], dim=3)
        proj = vit.patch_embed.proj
        tokens = F.linear(vectors.view(n * a, k, -1), proj.weight.flatten(1), proj.bias)  # (n·a, k, D)
        return logits_of_kept_tokens(vit, tokens, token_index.repeat(n, 1))

    def _normalise_patches(self, pixels: torch.Tensor) -> torch.Tensor:
        """Per-channel normalisation of patch vectors (..., C, p·p)."""
        return (pixels - self.mean.view(-1, 1)) / self.std.view(-1, 1)

    def _cnn_logits(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Logits (n·a, K) of a network on every image under every mask (the whole ablated image)."""
        inputs = ablate(images, masks).flatten(0, 1)  # (n·a, C + 1, H, W)
        channels = images.shape[1]
        inputs = torch.cat([self._normalise(inputs[:, :channels]), inputs[:, channels:]], dim=1)
        return self.net(self._resize(inputs))

    def kept_token_groups(self, masks: torch.Tensor, token_dropping: bool = True
                          ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The ablations (A, H, W) grouped by how many ViT tokens they keep: (positions (g,), kept token indices
        (g, k)) per group, so each group runs as one dense tensor; without token dropping, one group keeping all."""
        touched = tokens_touched(self._resize(masks[:, None])[:, 0], self.net.patch_embed.proj.kernel_size[0])
        if not token_dropping:
            touched = torch.ones_like(touched)
        return [(group, torch.nonzero(touched[group])[:, 1].view(len(group), -1))
                for group in group_by_token_count(touched)]

    def ablated_logits(self, images: torch.Tensor, masks: torch.Tensor,
                       token_dropping: bool | None = None) -> torch.Tensor:
        """Base-classifier logits (N, A, K) for every image (N, C, H, W) in [0, 1] under every mask (A, H, W).

        Many positions are stacked into one forward pass, at most ``max_batch`` ablated images per pass. With token
        dropping, positions are grouped by how many tokens they keep so each pass is one dense tensor."""
        token_dropping = self.hparams.token_dropping if token_dropping is None else token_dropping
        masks = masks.to(images.device, images.dtype)
        n, a = images.shape[0], masks.shape[0]
        if self.is_vit:
            groups = self.kept_token_groups(masks, token_dropping)
        else:
            if token_dropping:
                raise ValueError("token dropping needs a ViT backbone: set token_dropping=false for a CNN")
            groups = [(torch.arange(a, device=masks.device), None)]
        max_batch = stacked_pass_size(images.device, self.hparams.max_batch)
        outputs = images.new_empty(n, a, self.hparams.num_classes)
        for group, index in groups:
            for first in range(0, len(group), max_batch):
                positions = group[first:first + max_batch]
                step = max(1, max_batch // len(positions))
                for start in range(0, n, step):
                    chunk = images[start:start + step]
                    logits = (self._vit_logits(chunk, masks[positions], index[first:first + max_batch])
                              if self.is_vit else self._cnn_logits(chunk, masks[positions]))
                    # under bf16 autocast the logits are bf16; the votes only need their argmax
                    logits = logits.view(len(chunk), len(positions), -1)
                    outputs[start:start + step, positions] = logits.to(outputs.dtype)
        return outputs

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Base-classifier logits for [0, 1] images. In training mode the input is the base classifier's training
        ablation — one random position per batch (App. A.1.3), or the whole image during the first
        ``unablated_epochs`` — like dropout, acting only in training; in eval mode, the whole image."""
        size = tuple(images.shape[-2:])
        if self.training and self.current_epoch >= self.hparams.unablated_epochs:
            masks = random_ablation_mask(self.hparams.ablation, size, self.hparams.ablation_width, device=images.device)
        else:
            masks = images.new_ones(1, *size)
        return self.ablated_logits(images, masks)[:, 0]

    @torch.no_grad()
    def smoothed_counts(self, images: torch.Tensor, stride: int | None = None,
                        token_dropping: bool | None = None) -> torch.Tensor:
        """Votes n_c(x) (N, K) over the strided ablation set (Eq. 1.1)."""
        masks = self.certification_masks(tuple(images.shape[-2:]), stride)
        return ablation_votes(lambda x, m: self.ablated_logits(x, m, token_dropping), images, masks,
                              self.hparams.num_classes)

    def predict_step(self, batch, batch_idx):
        """g(x), the smoothed prediction (Eq. 1.1)."""
        return smoothed_prediction(self.smoothed_counts(batch[0]))

    # ---- evaluation (training is ImageClassifier's step on this forward) -------------------------------------
    def _evaluate(self, batch, split: str) -> None:
        """Smoothed accuracy (``val/acc`` at ``val_stride``, ``test/acc`` at the certification stride)."""
        images, labels = batch[0], batch[1]
        counts = self.smoothed_counts(images, self.hparams.val_stride if split == "val" else None)
        self.metrics[f"{split}_acc"](smoothed_prediction(counts), labels)
        self.log(f"{split}/acc", self.metrics[f"{split}_acc"], prog_bar=True)
