import pytest
import torch

from lit_robust.functional.ablations import (ablate, ablation_masks, ablation_positions, group_by_token_count,
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
    assert [counts[g].unique().tolist() for g in groups] == [[8], [16]]  # aligned bands 1 token column, others 2


def test_random_mask_has_the_ablation_width():
    torch.manual_seed(0)
    for _ in range(5):
        mask = random_ablation_mask("block", (8, 8), 3)
        assert mask.shape == (1, 8, 8) and mask.sum() == 9


def kept_by_formula(kind: str, position: tuple[int, int], size: tuple[int, int], width: int) -> torch.Tensor:
    """Pixel (r, c) is kept iff it lies within ``width`` of the start, counted modulo the image side (§1.1.1)."""
    (r0, c0), (height, w) = position, size
    rows = torch.arange(height)[:, None]
    cols = torch.arange(w)[None, :]
    keep = (cols - c0) % w < width
    if kind == "block":
        keep = keep & ((rows - r0) % height < width)
    return keep.expand(height, w).float()


@pytest.mark.parametrize("kind,width,stride", [("column", 3, 1), ("column", 2, 4), ("block", 2, 1), ("block", 3, 2)])
def test_masks_of_every_position_on_a_non_square_image_match_the_wrap_around_formula(kind, width, stride):
    size = (5, 7)
    positions = ablation_positions(kind, size, width, stride)
    rows = list(range(0, 5, stride)) if kind == "block" else [0]
    assert positions.tolist() == [[r, c] for r in rows for c in range(0, 7, stride)]
    masks = ablation_masks(kind, positions, size, width)
    assert masks.dtype == torch.float32
    for mask, position in zip(masks, positions.tolist()):
        assert torch.equal(mask, kept_by_formula(kind, position, size, width)), position


def test_width_and_stride_bounds_follow_the_image_sides():
    assert ablation_masks("column", torch.tensor([[0, 0]]), (4, 8), 8).eq(1).all()  # width = w: keeps all
    assert ablation_masks("block", torch.tensor([[0, 0]]), (4, 8), 4).sum() == 16  # width = the shorter side
    with pytest.raises(ValueError, match=r"^ablation width=5 does not fit a 4×8 image"):
        ablation_masks("block", torch.tensor([[0, 0]]), (4, 8), 5)
    with pytest.raises(ValueError, match=r"^ablation width=0 does not fit"):
        ablation_positions("column", (4, 8), 0)
    with pytest.raises(ValueError, match=r"^ablation stride=0: use a positive integer"):
        ablation_positions("column", (4, 8), 2, stride=0)
    with pytest.raises(ValueError, match=r"^ablation kind='row': use one of \('column', 'block'\)"):
        random_ablation_mask("row", (4, 8), 2)


def test_random_masks_reach_every_position_and_follow_their_generator():
    def draws(seed):
        generator = torch.Generator().manual_seed(seed)
        return torch.stack([random_ablation_mask("block", (3, 5), 1, generator) for _ in range(200)])

    masks = draws(0)
    assert masks.shape == (200, 1, 3, 5) and masks.sum((1, 2, 3)).eq(1).all()
    assert masks.sum(0).gt(0).all()  # all 15 start positions drawn
    torch.manual_seed(123)
    assert torch.equal(draws(0), masks) and not torch.equal(draws(1), masks)
    columns = torch.stack([random_ablation_mask("column", (3, 5), 2, torch.Generator().manual_seed(s))
                           for s in range(40)])
    assert columns.sum((1, 2, 3)).eq(6).all() and columns[:, 0, 0].sum(0).gt(0).all()


def test_ablate_keeps_each_pixel_times_its_mask_and_names_bad_shapes():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 4, 5, generator=generator, dtype=torch.float64)
    masks = ablation_masks("block", torch.tensor([[0, 0], [3, 4]]), (4, 5), 2)
    out = ablate(images, masks)
    assert out.shape == (2, 2, 4, 4, 5) and out.dtype == torch.float64
    for n in range(2):
        for a in range(2):
            assert torch.equal(out[n, a, :3], images[n] * masks[a].double())
            assert torch.equal(out[n, a, 3], masks[a].double())
    for bad_images, bad_masks in [(images[0], masks), (images, masks[0]), (images, torch.ones(2, 4, 4)),
                                  (images, torch.ones(2, 5, 5))]:
        with pytest.raises(ValueError, match=r"^images \(.*\) and masks \(.*\): expected \(N, C, H, W\)"):
            ablate(bad_images, bad_masks)


def test_tokens_touched_equals_any_kept_pixel_per_patch_on_a_non_square_image():
    generator = torch.Generator().manual_seed(2)
    masks = (torch.rand(4, 8, 12, generator=generator) < 0.05).float()
    touched = tokens_touched(masks, 4)
    brute = [[bool(masks[a, 4 * i:4 * i + 4, 4 * j:4 * j + 4].any()) for i in range(2) for j in range(3)]
             for a in range(4)]
    assert touched.tolist() == brute
    for size in [(8, 10), (10, 8)]:
        with pytest.raises(ValueError, match="do not split into 4×4 tokens"):
            tokens_touched(torch.ones(1, *size), 4)
