import pytest
import torch

from lit_robust.ablations import (ablate, ablation_masks, ablation_positions, group_by_token_count,
                                  random_ablation_mask, tokens_touched)


def test_column_mask_wraps_around_the_right_edge():
    masks = ablation_masks("column", torch.tensor([[0, 6]]), (3, 8), width=4)
    assert masks.shape == (1, 3, 8)
    assert masks[0, 0].tolist() == [1, 1, 0, 0, 0, 0, 1, 1]
    assert torch.equal(masks[0, 0], masks[0, 2])  # every row keeps the same columns


def test_block_mask_wraps_in_both_directions():
    masks = ablation_masks("block", torch.tensor([[3, 3]]), (4, 4), width=2)
    expected = torch.tensor([[1, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 1]], dtype=torch.float32)
    assert torch.equal(masks[0], expected)


def test_positions_follow_the_stride():
    assert ablation_positions("column", (32, 32), 4, stride=1).shape == (32, 2)
    cols = ablation_positions("column", (32, 32), 4, stride=10)
    assert cols[:, 1].tolist() == [0, 10, 20, 30] and cols[:, 0].eq(0).all()
    blocks = ablation_positions("block", (6, 6), 2, stride=3)
    assert blocks.tolist() == [[0, 0], [0, 3], [3, 0], [3, 3]]


def test_every_pixel_is_kept_by_exactly_b_column_ablations():
    masks = ablation_masks("column", ablation_positions("column", (5, 7), 3), (5, 7), 3)
    assert masks.sum(0).eq(3).all()


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="kind"):
        ablation_positions("row", (8, 8), 2)
    with pytest.raises(ValueError, match="width=9"):
        ablation_masks("column", torch.tensor([[0, 0]]), (8, 8), 9)
    with pytest.raises(ValueError, match="divisible"):
        tokens_touched(torch.ones(1, 10, 10), 4)


def test_ablate_zeroes_pixels_and_appends_the_mask_channel():
    images = torch.full((2, 3, 4, 4), 0.7)
    masks = ablation_masks("column", torch.tensor([[0, 1], [0, 3]]), (4, 4), 1)
    out = ablate(images, masks)
    assert out.shape == (2, 2, 4, 4, 4)
    assert out[0, 0, :3, :, 1].eq(0.7).all() and out[0, 0, :3, :, 0].eq(0).all()
    assert torch.equal(out[1, 1, 3], masks[1])


def test_tokens_touched_keeps_exactly_the_patches_a_band_reaches():
    # 8×8 image, 4×4 tokens (2×2 grid, row-major): an aligned band of width 4 touches one token column, an unaligned
    # one two, a band wrapping from column 6 touches columns 1 and 0.
    masks = ablation_masks("column", torch.tensor([[0, 0], [0, 2], [0, 6]]), (8, 8), 4)
    touched = tokens_touched(masks, 4)
    assert touched.tolist() == [[True, False, True, False], [True, True, True, True], [True, True, True, True]]
    aligned = ablation_masks("column", torch.tensor([[0, 4]]), (8, 8), 4)
    assert tokens_touched(aligned, 4).tolist() == [[False, True, False, True]]


def test_grouping_by_token_count_covers_every_position_once():
    masks = ablation_masks("column", ablation_positions("column", (32, 32), 4), (32, 32), 4)
    groups = group_by_token_count(tokens_touched(masks, 4))
    counts = tokens_touched(masks, 4).sum(1)
    assert sorted(torch.cat(groups).tolist()) == list(range(32))
    assert [counts[g].unique().numel() for g in groups] == [1] * len(groups)
    assert sorted(counts[g[0]].item() for g in groups) == [8, 16]  # aligned bands 1 token column, others 2


def test_random_mask_has_the_ablation_width():
    torch.manual_seed(0)
    for _ in range(5):
        mask = random_ablation_mask("block", (8, 8), 3)
        assert mask.shape == (1, 8, 8) and mask.sum() == 9
