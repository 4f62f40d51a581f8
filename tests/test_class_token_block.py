"""The last block computed for the class token alone gives the class-token head the logits of the whole block: the
same numbers (to float rounding) for plain, register-token, QK-norm and layer-scale ViTs, and the whole block where the
head reads more than the class token (average pooling) or the model trains."""
import pytest
import timm
import torch

from lit_robust.functional.vit_tokens import class_token_block, logits_of_kept_tokens, reads_class_token_only

VARIANTS = [{}, {"reg_tokens": 2}, {"qk_norm": True, "init_values": 1e-3}]


def vit(**kwargs):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=64, in_chans=1,
                              **kwargs).eval()
    with torch.no_grad():
        for parameter in model.parameters():  # off timm's initial zeros and ones, so every term matters
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


@pytest.mark.parametrize("kwargs", VARIANTS)
def test_class_token_output_equals_the_whole_blocks(kwargs):
    model = vit(**kwargs)
    x = torch.randn(4, 11 + model.num_prefix_tokens, model.embed_dim)
    with torch.no_grad():
        whole = model.blocks[-1](x)[:, :1]
        alone = class_token_block(model.blocks[-1], x)
    assert alone.shape == (4, 1, model.embed_dim)
    assert torch.allclose(alone, whole, atol=2e-6, rtol=0)
    assert (whole - x[:, :1]).abs().max() > 1e-2  # the block moves the class token: an identity stub fails


@pytest.mark.parametrize("kwargs", VARIANTS)
def test_kept_token_logits_unchanged(kwargs):
    model = vit(**kwargs)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randn(3, 9, model.embed_dim, generator=generator)
    index = torch.stack([torch.randperm(16, generator=generator)[:9] for _ in range(3)])
    with torch.no_grad():
        fast = logits_of_kept_tokens(model, tokens, index)
        model.global_pool = "avg"  # a head reading every token: the whole block runs
        assert not reads_class_token_only(model)
        model.global_pool = "token"
        model.train()
        assert not reads_class_token_only(model)
        model.eval()
        assert reads_class_token_only(model)
        x = model.norm_pre(model.pos_drop(torch.cat([
            (torch.cat([t for t in (model.cls_token, model.reg_token) if t is not None], 1)
             + (0 if model.no_embed_class else model.pos_embed[:, :model.num_prefix_tokens])).expand(3, -1, -1),
            tokens + model.pos_embed[0, model.num_prefix_tokens:][index] if not model.no_embed_class
            else tokens + model.pos_embed[0][index]], 1)))
        reference = model.forward_head(model.norm(model.blocks(x)))
    assert torch.allclose(fast, reference, atol=2e-6, rtol=0)
