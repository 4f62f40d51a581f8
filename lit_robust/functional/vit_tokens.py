"""Token dropping in a timm ViT: a region is left out by not feeding its patch tokens (001 Alg. 2 for
ablations; §5.1.2 and App. E.2 for missingness)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block, VisionTransformer
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
    x = vit.norm_pre(vit.pos_drop(tokens))
    x = class_token_block(vit.blocks[-1], vit.blocks[:-1](x)) if reads_class_token_only(vit) else vit.blocks(x)
    return vit.forward_head(vit.norm(x))


def reads_class_token_only(vit: VisionTransformer) -> bool:
    """Whether the head reads the last block's class token and nothing else (timm's ``global_pool="token"``, a plain
    last :class:`Block`), in evaluation, so the other tokens' outputs of that block need not be computed."""
    return (not vit.training and vit.global_pool == "token" and getattr(vit, "attn_pool", None) is None
            and type(vit.blocks[-1]) is Block and vit.has_class_token)


def class_token_block(block: Block, x: torch.Tensor) -> torch.Tensor:
    """A timm ``Block``'s output at the class token alone, (B, 1, D), for inputs ``x`` (B, N, D) in evaluation: keys
    and values from every token, but the query, attention output, projection, MLP and norms for the class token only —
    all a class-token head reads, at about 7 % fewer FLOPs than the whole last block of a ViT-S on 197 tokens."""
    attn = block.attn
    h = block.norm1(x)
    batch, tokens, _ = h.shape
    width = attn.attn_dim  # qkv's output is [q | k | v], each attn_dim wide
    weight, bias = attn.qkv.weight, attn.qkv.bias
    q = F.linear(h[:, :1], weight[:width], None if bias is None else bias[:width])
    kv = F.linear(h, weight[width:], None if bias is None else bias[width:])
    q = q.reshape(batch, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
    k, v = kv.reshape(batch, tokens, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
    out = attn.norm(out.transpose(1, 2).reshape(batch, 1, width))
    if attn.gate is not None:
        out = out * attn.gate(h[:, :1]).sigmoid()
    cls = x[:, :1] + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(out))))
    return cls + block.drop_path2(block.ls2(block.mlp(block.norm2(cls))))
