"""LIME under missingness (``lit_robust.functional.lime`` and ``MissingnessReport(lime_samples=…)``; thesis 001 §5.3) on
hand-built additive models and a tiny ViT, so the file runs in seconds. Each docstring names the stubs it catches."""
from __future__ import annotations

import functools

import lightning as L
import pytest
import torch
from sklearn.linear_model import Ridge
from test_missingness import VIT, TensorData, tiny_vit

from lit_robust.callbacks import MissingnessReport
from lit_robust.datasets import TensorImageDataset
from lit_robust.functional.ablations import keep_masks, region_masks
from lit_robust.functional.lime import (baseline_colours, lime_scores, pairwise_consistency, perturbed_target_logits,
                                        random_presence, ridge_weights, topk_jaccard)
from lit_robust.functional.missingness_bias import (blackout_logits, dropped_token_logits, missingness_statistics,
                                                    removal_order, removal_predictions)
from lit_robust.models.classifier import ImageClassifier
from lit_robust.storage.cache import save_atomic
from lit_robust.storage.serialization import load_plain


def additive_model(weights: torch.Tensor, region: int):
    """Class-0 logit Σ_r w_r · (mean of region r), class-1 logit its negative: LIME's regression is exact for it."""
    def model(images: torch.Tensor) -> torch.Tensor:
        means = torch.nn.functional.avg_pool2d(images.mean(1, keepdim=True), region).flatten(1)
        logit = means @ weights
        return torch.stack([logit, -logit], 1)
    return model


def test_ridge_weights_equal_scikit_learns_ridge():
    """The closed form with a shared design equals ``Ridge(alpha).fit`` per target row (intercept included); a
    solve without centring, or without the penalty, differs."""
    g = torch.Generator().manual_seed(0)
    presence = random_presence(200, 6, g).double()
    slopes = torch.randn(6, 4, generator=g, dtype=torch.float64)
    targets = (presence @ slopes).T + torch.randn(4, 200, generator=g, dtype=torch.float64)
    for alpha in (1.0, 30.0):
        expected = Ridge(alpha=alpha).fit(presence.numpy(), targets.T.numpy()).coef_
        assert torch.allclose(ridge_weights(presence, targets, alpha), torch.from_numpy(expected), atol=1e-10)
    expected = Ridge().fit(presence.numpy(), targets.T.numpy()).coef_  # the same default penalty
    assert torch.allclose(ridge_weights(presence, targets), torch.from_numpy(expected), atol=1e-10)


def test_lime_recovers_an_additive_models_region_weights_and_their_dependence_on_the_colour():
    """For logit Σ_r w_r·mean_r, turning region r off with colour c moves the logit by w_r·(mean_r − c), so the LIME
    scores are that up to the ridge shrinkage — with black, w_r·mean_r; with white, of the opposite sign where
    mean_r < 1. Sign-flipped, random or constant scores (stubs), or a colour that is ignored, fail."""
    weights = torch.tensor([3.0, -1.0, 0.5, 2.0])
    model = additive_model(weights, 4)
    g = torch.Generator().manual_seed(1)
    images = torch.rand(5, 1, 8, 8, generator=g) * 0.8 + 0.1
    means = torch.nn.functional.avg_pool2d(images, 4).flatten(1)  # (5, 4)
    regions = region_masks((8, 8), 4)
    presence = random_presence(400, 4, torch.Generator().manual_seed(2))
    shrink = 1 / (1 + 1.0 / (presence - presence.mean(0)).pow(2).sum(0).mean())  # ≈ 100 / 101
    for colour in (0.0, 0.5, 1.0):
        scores = lime_scores(blackout_logits(model, torch.tensor([colour])), images, regions, presence,
                             target=torch.zeros(5, dtype=torch.long))
        assert torch.allclose(scores, weights * (means - colour) * shrink, rtol=0.03, atol=0.01)
    black = lime_scores(blackout_logits(model), images, regions, presence)  # target: the predicted class
    predicted = model(images).argmax(1)
    sign = torch.where(predicted == 0, 1.0, -1.0)[:, None]
    assert torch.allclose(black, sign * weights * means * shrink, rtol=0.03, atol=0.01)


def test_perturbed_logits_equal_one_image_and_one_perturbation_at_a_time():
    """Grouped, chunked passes (black-out and dropped tokens on a tiny ViT, passes of 6 rows) give every image's
    target logit under every perturbation as a loop does; swapped images and perturbations, or a wrong target,
    differ."""
    vit = tiny_vit()
    blackout = blackout_logits(vit)
    dropped = dropped_token_logits(vit, lambda x: x)
    images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    regions = region_masks((8, 8), 4)
    presence = random_presence(9, 4, torch.Generator().manual_seed(4))
    target = torch.tensor([0, 2, 1])
    keep = torch.einsum("sr,rhw->shw", presence, regions)
    with torch.no_grad():
        for logits in (blackout, dropped):
            batched = perturbed_target_logits(logits, images, presence, regions, target, max_rows=6)
            looped = torch.tensor([[logits(images[i:i + 1], keep[s:s + 1])[0, target[i]].item() for s in range(9)]
                                   for i in range(3)])
            assert torch.allclose(batched, looped, atol=1e-5)


def test_topk_jaccard_and_pairwise_consistency_on_hand_built_scores():
    """Top-2 {0, 1} vs {1, 2}: 1/3; identical explanations: 1; three explanations make three pairs; each image its
    own similarity. A similarity of the bottom-k, an intersection without the union, or a union pooled over the
    images differs."""
    a = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    b = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    assert topk_jaccard(a, b, 2).item() == pytest.approx(1 / 3)
    assert torch.allclose(topk_jaccard(torch.cat([a, a]), torch.cat([b, a]), 2), torch.tensor([1 / 3, 1.0]))
    assert topk_jaccard(a, a, 3).item() == 1.0 and topk_jaccard(a, b, 0).item() == 1.0
    table = pairwise_consistency([a, b, a], [1, 2])
    assert torch.allclose(table, torch.tensor([[0.0, 1 / 3], [1.0, 1.0], [0.0, 1 / 3]]))


def test_baseline_colours_are_the_rgb_corners_or_eight_greys_black_first():
    rgb = baseline_colours(3)
    assert rgb.shape == (8, 3) and len({tuple(c) for c in rgb.tolist()}) == 8 and rgb[0].eq(0).all()
    assert set(rgb.flatten().tolist()) == {0.0, 1.0} and rgb.dtype == torch.float32  # the cube's corners
    grey = baseline_colours(1)
    assert torch.allclose(grey[:, 0], torch.linspace(0, 1, 8))


def quadrant_images(count: int, seed: int) -> TensorImageDataset:
    """16×16 noise with one bright 8×8 quadrant (0–2), the label: a model must read particular tokens."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (count,), generator=g)
    images = 0.3 * torch.rand(count, 1, 16, 16, generator=g)
    for quadrant, (row, col) in enumerate(((0, 0), (0, 8), (8, 0))):
        images[labels == quadrant, :, row:row + 8, col:col + 8] += 0.7
    return TensorImageDataset(images, labels)


@functools.cache
def quadrant_vit() -> ImageClassifier:
    """A tiny ViT (16 tokens of 4×4) trained 60 steps on ``quadrant_images``."""
    torch.manual_seed(0)
    model = ImageClassifier(backbone="vit_tiny_patch16_224", num_classes=3, in_chans=1,
                            backbone_kwargs={**{k: v for k, v in VIT.items() if k not in ("in_chans", "num_classes")},
                                             "img_size": 16})
    data = quadrant_images(96, 0)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(model(data.images), data.targets)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


def run_report(tmp_path, dataset, **kwargs) -> tuple[L.Trainer, ImageClassifier]:
    """``quadrant_vit`` tested with LIME on both missingness modes."""
    model = quadrant_vit()
    callback = MissingnessReport(output_dir=str(tmp_path), region=4, fractions=[0.25, 0.5], orders=["random"],
                                 modes=["blackout", "drop_tokens"], batch_size=8, seed=5, **kwargs)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[callback])
    trainer.test(model, datamodule=TensorData(dataset))
    return trainer, model


def test_callback_explanations_and_tests_equal_the_pure_functions(tmp_path):
    """``lime_samples``: the saved explanations equal ``lime_scores`` on each batch with the shared perturbations;
    the logged top-k ablation test, black-out consistency over the 8 grey levels and the random reference equal the
    pure functions. Another run's explanations, saved in another order, are matched by image index: the same
    explanations shuffled give the own numbers. A callback that tests the explanations in file order, mixes the
    modes' explanations or skips the colours differs."""
    dataset = quadrant_images(20, 6)
    trainer, model = run_report(tmp_path / "own", dataset, lime_samples=48)
    saved = load_plain(tmp_path / "own" / "test_lime.pt")
    assert torch.equal(saved["indices"], torch.arange(20))
    regions = region_masks((16, 16), 4)
    presence = random_presence(48, 16, torch.Generator().manual_seed(5))
    modes = {"blackout": blackout_logits(model), "drop_tokens": dropped_token_logits(
        model.net, lambda x: (x - model.mean) / model.std)}
    logged = trainer.callback_metrics
    colour_scores = []
    with torch.no_grad():
        for mode, logits in modes.items():
            scores = torch.cat([lime_scores(logits, dataset.images[s:s + 8], regions, presence)
                                for s in range(0, 20, 8)])
            assert torch.allclose(saved["scores"][mode], scores, atol=1e-5)
            unchanged = {}
            for order in ("most_salient", "least_salient"):
                predictions = removal_predictions(logits, dataset.images, keep_masks(
                    removal_order(scores, order), [0, 4, 8], regions))
                unchanged[order] = missingness_statistics(predictions, predictions[:, 0], 3)["unchanged"]
            assert not torch.equal(unchanged["most_salient"], unchanged["least_salient"])  # the test can tell
            for f, pct in ((1, 25), (2, 50)):
                assert logged[f"missing/test/{mode}/lime_own/unchanged_f{pct}"].item() == pytest.approx(
                    unchanged["most_salient"][f].item())
            # the model reads one quadrant: its own explanation flips far more than random scores do
            assert (logged[f"missing/test/{mode}/lime_random/unchanged_f25"]
                    > logged[f"missing/test/{mode}/lime_own/unchanged_f25"] + 0.15)
        for colour in baseline_colours(1):
            colour_scores.append(torch.cat([lime_scores(blackout_logits(model, colour), dataset.images[s:s + 8],
                                                        regions, presence) for s in range(0, 20, 8)]))
    consistency = pairwise_consistency(colour_scores, [4, 8]).mean(0)
    assert logged["missing/test/blackout/lime/consistency_f25"].item() == pytest.approx(consistency[0].item(), abs=1e-6)
    assert logged["missing/test/blackout/lime/consistency_f50"].item() == pytest.approx(consistency[1].item(), abs=1e-6)
    assert consistency[0] < 0.99  # the grey level changes which region ranks first for some image
    assert "missing/test/drop_tokens/lime/consistency_f25" not in logged  # 1 by construction: not computed
    random = torch.rand(20, 8, 16, generator=torch.Generator().manual_seed(5))
    assert logged["missing/test/lime/random_consistency_f50"].item() == pytest.approx(
        pairwise_consistency(random.unbind(1), [8]).mean().item())

    order = torch.randperm(20, generator=torch.Generator().manual_seed(7))
    save_atomic(tmp_path / "shuffled.pt", {"indices": saved["indices"][order],
                                           "scores": {m: s[order] for m, s in saved["scores"].items()}})
    trainer, _ = run_report(tmp_path / "again", dataset, lime_samples=48,
                            lime_explanations={"copy": str(tmp_path / "shuffled.pt")})
    again = trainer.callback_metrics
    with torch.no_grad():  # explanations given to the wrong images would test differently
        predictions = removal_predictions(modes["drop_tokens"], dataset.images, keep_masks(
            removal_order(saved["scores"]["drop_tokens"][order], "most_salient"), [0, 4, 8], regions))
    misplaced = missingness_statistics(predictions, predictions[:, 0], 3)["unchanged"]
    for f, pct in ((1, 25), (2, 50)):  # a run's explanation is its drop_tokens one, tested under each mode
        assert again[f"missing/test/drop_tokens/lime_copy/unchanged_f{pct}"].item() == pytest.approx(
            logged[f"missing/test/drop_tokens/lime_own/unchanged_f{pct}"].item())
    trainer, _ = run_report(tmp_path / "first", dataset, lime_samples=48, lime_images=10, lime_consistency=False)
    first = load_plain(tmp_path / "first" / "test_lime.pt")  # the first 10 images only, explained as before
    assert torch.equal(first["indices"], torch.arange(10)) and "missing/test/lime/random_consistency_f50" not in \
        trainer.callback_metrics
    for mode in modes:
        assert torch.allclose(first["scores"][mode], saved["scores"][mode][:10], atol=1e-5)
    assert any(misplaced[f].item() != pytest.approx(logged[f"missing/test/drop_tokens/lime_own/unchanged_f{pct}"]
                                                    .item()) for f, pct in ((1, 25), (2, 50)))


def test_lime_arguments_are_checked_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="lime_samples > 0"):
        MissingnessReport(lime_explanations={"other": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match="lime_samples > 0 wrote"):
        MissingnessReport(lime_samples=8, lime_explanations={"other": str(tmp_path / "missing.pt")})
    with pytest.raises(ValueError, match="positive count"):
        MissingnessReport(lime_samples=-1)
    with pytest.raises(ValueError, match="lime_images=0"):
        MissingnessReport(lime_samples=8, lime_images=0)
