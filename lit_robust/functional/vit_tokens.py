"""Token dropping in a timm ViT: a region is left out by not feeding its patch tokens (001 Alg. 2 for
ablations; §5.1.2 and App. E.2 for missingness)."""
from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn


def check_droppable_vit(vit: nn.Module) -> None:
    """Token dropping needs a plain patch embedding (one Conv2d with kernel = stride, no norm) and a fixed grid."""
    if not isinstance(vit, VisionTransformer):
        raise ValueError(f"token dropping needs a timm VisionTransformer, got {type(vit).__name__}: use a vit_* "
                         f"backbone or set model.token_dropping=false")
    proj = vit.patch_embed.proj
    if not (isinstance(proj, nn.Conv2d) and proj.kernel_size == proj.stride and proj.padding == (0, 0)
            and isinstance(vit.patch_embed.norm, nn.Identity) and not vit.dynamic_img_size):
        raise ValueError("this ViT's patch embedding is not one non-overlapping Conv2d without norm (or uses a "
                         "dynamic image size): pick a standard vit_* model")


def logits_of_kept_tokens(vit: VisionTransformer, tokens: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
    """Logits (B, K) of a timm ViT that sees only some of its patch tokens: ``tokens`` (B, k, D) are patch
    embeddings (no position yet) at grid positions ``token_index`` (B, k). Each gets its own position embedding, the
    prefix (class/register) tokens are prepended, and the blocks run on the k + prefix tokens — dropping tokens,
    which is how a ViT leaves a region out (001 Alg. 2 for ablations; §5.1.2 and App. E.2 for missingness)."""
    pos = vit.pos_embed
    if vit.no_embed_class:
        prefix_pos, token_pos = 0, pos[0][token_index]
    else:
        prefix_pos, token_pos = pos[:, :vit.num_prefix_tokens], pos[0, vit.num_prefix_tokens:][token_index]
    tokens = tokens + token_pos
    prefix = [t for t in (vit.cls_token, vit.reg_token) if t is not None]
    if prefix:
        prefix_tokens = torch.cat(prefix, dim=1) + prefix_pos
        tokens = torch.cat([prefix_tokens.expand(len(tokens), -1, -1), tokens], dim=1)
    x = vit.blocks(vit.norm_pre(vit.pos_drop(tokens)))
    return vit.forward_head(vit.norm(x))
