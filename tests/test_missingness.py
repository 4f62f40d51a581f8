"""Missingness bias (``lit_robust.functional.missingness_bias``, ``callbacks.MissingnessReport``, ``augment.random_region_removal``;
thesis 001 ch. 5) on hand-built models and tiny ViTs, so the file runs in seconds. Each docstring names the stub the
test catches; the stubs were run by hand against these tests."""
from __future__ import annotations

import json
import math

import lightning as L
import pytest
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader

from lit_robust.callbacks import MissingnessReport
from lit_robust.callbacks.missingness import module_vit
from lit_robust.datasets import TensorImageDataset
from lit_robust.functional.ablations import keep_masks, region_masks
from lit_robust.functional.augment import random_region_removal
from lit_robust.functional.missingness_bias import (blackout_logits, dropped_token_logits, gradient_saliency,
                                                    missingness_statistics, region_scores, removal_order,
                                                    removal_predictions, removed_counts)
from lit_robust.models.classifier import ImageClassifier

VIT = dict(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, depth=1, num_heads=2)


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **VIT).eval()


def test_regions_tile_the_image_row_major_like_vit_tokens():
    """Four 4×4 regions of an 8×8 image: disjoint, covering every pixel once, region 1 the top-right patch (timm's
    token order). A column-major grid or overlapping regions fail."""
    regions = region_masks((8, 8), 4)
    assert regions.shape == (4, 8, 8)
    assert torch.equal(regions.sum(0), torch.ones(8, 8))
    assert regions[1, :4, 4:].eq(1).all() and regions[1].sum() == 16
    with pytest.raises(ValueError, match="does not split"):
        region_masks((8, 8), 3)


def test_saliency_orders_regions_by_the_pixels_the_model_reads():
    """A linear model reading only the bottom-left region with large weights and the top-left with small ones:
    least-salient-first removes the two unread regions first and the bottom-left last; most-salient-first the
    reverse. A random or sign-flipped order (stubs) puts the bottom-left elsewhere."""
    weights = torch.zeros(2, 1, 8, 8)
    weights[0, 0, 4:, :4] = 5.0   # region 2, read strongly by class 0
    weights[0, 0, :4, :4] = 0.5   # region 0, read weakly
    model = lambda x: (x[:, None] * weights[None]).flatten(2).sum(-1)  # noqa: E731
    images = torch.rand(3, 1, 8, 8) + 0.1
    scores = region_scores(gradient_saliency(model, images), 4)
    least = removal_order(scores, "least_salient")
    most = removal_order(scores, "most_salient")
    assert least[:, -1].eq(2).all() and least[:, -2].eq(0).all()
    assert set(least[0, :2].tolist()) == {1, 3}
    assert most[:, 0].eq(2).all() and most[:, 1].eq(0).all()
    first = removal_order(scores, "random", torch.Generator().manual_seed(1))
    again = removal_order(scores, "random", torch.Generator().manual_seed(1))
    assert torch.equal(first, again) and torch.equal(first.sort(1).values, torch.arange(4).expand(3, -1))


def test_keep_masks_remove_the_first_regions_of_each_images_order():
    """Counts 0, 1, 3 of two images with different orders: the masks zero exactly those regions, per image. Masks
    that ignore the order (the same regions for every image) or remove the last regions fail."""
    regions = region_masks((8, 8), 4)
    orders = torch.tensor([[2, 0, 3, 1], [1, 3, 0, 2]])
    keep = keep_masks(orders, [0, 1, 3], regions)
    assert keep.shape == (2, 3, 8, 8)
    assert keep[:, 0].eq(1).all()
    for image in range(2):
        for f, count in enumerate([0, 1, 3]):
            expected = 1 - regions[orders[image, :count]].sum(0)
            assert torch.equal(keep[image, f], expected)
    assert removed_counts(64, [0.25, 0.5]) == [16, 32]


def test_blackout_zeroes_exactly_the_removed_pixels():
    """The blacked-out forward equals the model on the image with the removed pixels set to 0 and the rest kept (a
    stub that ignores the mask, or blacks out the kept part, differs)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    images = torch.rand(2, 1, 8, 8)
    keep = keep_masks(torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]]), [2], region_masks((8, 8), 4))[:, 0]
    expected = model(torch.where(keep[:, None].bool(), images, torch.zeros_like(images)))
    assert torch.allclose(blackout_logits(model)(images, keep), expected)


def test_dropped_tokens_ignore_the_removed_pixels_and_differ_from_black_ones():
    """On a ViT with 4 tokens: all kept equals the plain forward; with two tokens dropped, changing the removed
    pixels changes nothing but changing a kept pixel does; and the result differs from blacking the same pixels
    out (black tokens still enter attention). A stub that ignores the mask, or blacks out instead of dropping,
    fails one of these."""
    vit = tiny_vit()
    logits = dropped_token_logits(vit, lambda x: x)
    images = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(logits(images, torch.ones(2, 8, 8)), vit(images), atol=1e-5)
        keep = keep_masks(torch.tensor([[0, 3, 1, 2], [1, 2, 0, 3]]), [2], region_masks((8, 8), 4))[:, 0]
        dropped = logits(images, keep)
        noisy = torch.where(keep[:, None].bool(), images, torch.rand_like(images))
        assert torch.allclose(logits(noisy, keep), dropped, atol=1e-6)
        moved = images + 0.5 * keep[:, None]
        assert not torch.allclose(logits(moved, keep), dropped, atol=1e-3)
        assert not torch.allclose(blackout_logits(vit)(images, keep), dropped, atol=1e-3)


def test_statistics_on_hand_built_predictions():
    """Four images, original classes (0, 0, 1, 2), after removal (0, 1, 1, 1): images 0 and 2 unchanged (1/2);
    class shares 1/4, 3/4, 0 and entropy −(¼ ln ¼ + ¾ ln ¾). Counting changed instead of unchanged, or the entropy
    in bits, gives other numbers."""
    original = torch.tensor([0, 0, 1, 2])
    predictions = torch.stack([original, torch.tensor([0, 1, 1, 1])], 1)
    stats = missingness_statistics(predictions, original, 3)
    assert stats["unchanged"].tolist() == [1.0, 0.5]
    assert stats["class_shares"][1].tolist() == [0.25, 0.75, 0.0]
    assert stats["entropy"][1].item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))


def test_batched_removal_predictions_equal_one_image_at_a_time():
    """The stacked passes (all images of a fraction at once) give the per-image loop's predictions, on a ViT whose
    dropped tokens differ per image (a batch that mixes up images' masks fails)."""
    vit = tiny_vit()
    logits = dropped_token_logits(vit, lambda x: x)
    images = torch.rand(5, 1, 8, 8)
    orders = torch.stack([torch.randperm(4, generator=torch.Generator().manual_seed(i)) for i in range(5)])
    keep = keep_masks(orders, [0, 1, 2, 3], region_masks((8, 8), 4))
    with torch.no_grad():
        batched = removal_predictions(logits, images, keep)
        single = torch.cat([removal_predictions(logits, images[i:i + 1], keep[i:i + 1]) for i in range(5)])
    assert torch.equal(batched, single)


def test_region_removal_augmentation_blacks_out_whole_regions_per_image():
    """Half of the 16 regions of each 16×16 image go black, whole regions only, and different ones per image (a
    stub that removes nothing, pixels instead of regions, or the same regions for the batch fails)."""
    images = torch.rand(6, 1, 16, 16) + 0.5
    out = random_region_removal(images, 4, 0.5, torch.Generator().manual_seed(0))
    black = (out == 0).float()
    per_region = torch.nn.functional.avg_pool2d(black, 4).flatten(1)  # (6, 16) shares of black pixels
    assert set(per_region.unique().tolist()) == {0.0, 1.0}
    assert per_region.sum(1).eq(8).all()
    assert len({tuple(row.tolist()) for row in per_region}) > 1
    assert torch.equal(out[black == 0], images[black == 0])


class TensorData(L.LightningDataModule):
    def __init__(self, dataset):
        super().__init__()
        self.test_dataset = dataset

    def test_dataloader(self):
        return DataLoader(self.test_dataset, batch_size=8)


def test_callback_logs_the_pure_functions_numbers(tmp_path):
    """An ``ImageClassifier`` with a tiny ViT: after ``trainer.test`` the logged shares of unchanged predictions and
    entropies equal the pure functions run on the same batches and seeds, for both modes; the records and plots are
    written. A callback that uses other orders for the two modes, or the first regions instead of the ordered ones,
    differs."""
    torch.manual_seed(0)
    model = ImageClassifier(backbone="vit_tiny_patch16_224", num_classes=3, in_chans=1,
                            backbone_kwargs={k: v for k, v in VIT.items() if k not in ("in_chans", "num_classes")}).eval()
    g = torch.Generator().manual_seed(3)
    dataset = TensorImageDataset(torch.rand(20, 1, 8, 8, generator=g), torch.randint(0, 3, (20,), generator=g))
    callback = MissingnessReport(output_dir=str(tmp_path), region=4, fractions=[0.25, 0.5],
                                 modes=["blackout", "drop_tokens"], batch_size=8, seed=5)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[callback])
    trainer.test(model, datamodule=TensorData(dataset))
    regions = region_masks((8, 8), 4)
    modes = {"blackout": blackout_logits(model), "drop_tokens": dropped_token_logits(
        model.net, lambda x: (x - model.mean) / model.std)}
    predictions = {(m, o): [] for m in modes for o in ("random", "least_salient", "most_salient")}
    for b, start in enumerate(range(0, 20, 8)):
        x = dataset.images[start:start + 8]
        scores = region_scores(gradient_saliency(model, x), 4)
        generator = torch.Generator().manual_seed(5 * 10**6 + b)
        keep = {o: keep_masks(removal_order(scores, o, generator), [0, 1, 2], regions)
                for o in ("random", "least_salient", "most_salient")}
        with torch.no_grad():
            for (m, o) in predictions:
                predictions[(m, o)].append(removal_predictions(modes[m], x, keep[o]))
    logged = trainer.callback_metrics
    for (m, o), parts in predictions.items():
        stats = missingness_statistics(torch.cat(parts), torch.cat(parts)[:, 0], 3)
        for f, pct in ((1, 25), (2, 50)):
            assert logged[f"missing/test/{m}/{o}/unchanged_f{pct}"].item() == pytest.approx(stats["unchanged"][f].item())
            assert logged[f"missing/test/{m}/{o}/entropy_f{pct}"].item() == pytest.approx(
                stats["entropy"][f].item(), abs=1e-6)
    record = json.loads((tmp_path / "test_missingness.json").read_text())
    assert record["fractions"] == [0.0, 0.25, 0.5]
    assert (tmp_path / "test_unchanged.png").stat().st_size > 0 and (tmp_path / "test_entropy.png").exists()


def test_bad_arguments_are_refused_naming_the_choices():
    with pytest.raises(ValueError, match="least_salient"):
        MissingnessReport(orders=["salient"])
    with pytest.raises(ValueError, match="drop_tokens"):
        MissingnessReport(modes=[])
    model = ImageClassifier(backbone="small_cnn", backbone_kwargs={"widths": (4,)})
    with pytest.raises(ValueError, match="VisionTransformer"):
        module_vit(model)
