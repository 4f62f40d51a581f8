"""Unadversarial examples: the carriers put the pattern only where they should, and training the pattern makes a
*fixed* classifier more confident (a flipped-sign objective, PGD's, would make it less), under corruptions too."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lit_robust import ImageClassifier, Unadversarial
from lit_robust.functional.unadversarial_patterns import (apply_patch, apply_texture, best_per_class,
                                                          conflicting_labels, corner_positions, stroke_mask,
                                                          unadversarial_loss)


def test_texture_replaces_exactly_the_stroke_pixels():
    images = torch.rand(6, 1, 8, 8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    textures = torch.rand(3, 1, 8, 8)
    out = apply_texture(images, labels, textures, threshold=0.3)
    stroke = images > 0.3
    assert torch.equal(out[~stroke], images[~stroke])
    assert torch.equal(out[stroke], textures[labels].expand_as(images)[stroke])
    assert torch.equal(stroke_mask(images, 0.3).bool(), stroke)
    with pytest.raises(ValueError, match="num_classes, C, H, W"):
        apply_texture(images, labels, torch.rand(3, 1, 4, 4))


def test_patch_lands_at_its_position_only_and_carries_gradient():
    images = torch.zeros(2, 3, 10, 10)
    patches = torch.rand(4, 3, 3, 3, requires_grad=True)
    positions = torch.tensor([[0, 7], [5, 2]])
    out = apply_patch(images, torch.tensor([3, 1]), patches, positions)
    assert torch.equal(out[0, :, 0:3, 7:10], patches[3].detach())
    assert torch.equal(out[1, :, 5:8, 2:5], patches[1].detach())
    assert out.sum().item() == pytest.approx(patches[3].sum().item() + patches[1].sum().item(), rel=1e-5)
    out.sum().backward()
    assert patches.grad[[1, 3]].eq(1).all() and patches.grad[[0, 2]].eq(0).all()


def test_corner_positions_are_the_four_corners():
    positions = corner_positions(400, (28, 28), 7, torch.Generator().manual_seed(0))
    assert {tuple(p) for p in positions.tolist()} == {(0, 0), (0, 21), (21, 0), (21, 21)}
    with pytest.raises(ValueError, match="patch_size=30"):
        corner_positions(1, (28, 28), 30)


def test_conflicting_labels_are_always_another_class_and_cover_them_all():
    labels = torch.zeros(500, dtype=torch.long)
    conflicts = conflicting_labels(labels, 10, torch.Generator().manual_seed(0))
    assert (conflicts != labels).all() and set(conflicts.tolist()) == set(range(1, 10))


def test_best_per_class_takes_each_class_lowest_loss():
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    losses = torch.tensor([3.0, 1.0, 0.5, 2.0, 4.0, 0.1])
    assert best_per_class(labels, losses, 2).tolist() == [2, 5]
    with pytest.raises(ValueError, match=r"classes \[2\]"):
        best_per_class(labels, losses, 3)


def _stroke_data(n: int, seed: int) -> TensorDataset:
    """Random 'objects' on a dark background: about half of each 12×12 image's pixels are stroke."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, 12, 12, generator=g) * (torch.rand(n, 1, 12, 12, generator=g) > 0.5)
    return TensorDataset(images, torch.randint(0, 4, (n,), generator=g))


@pytest.fixture()
def frozen_classifier(tmp_path) -> str:
    """A randomly initialised 4-class classifier's checkpoint (its BatchNorm statistics read from the data): its
    decisions have nothing to do with the labels, so only the pattern can make it right."""
    torch.manual_seed(0)
    model = ImageClassifier(backbone="small_cnn", num_classes=4, backbone_kwargs={"widths": [4, 8]})
    with torch.no_grad():
        for _ in range(20):
            model(_stroke_data(256, 2).tensors[0])
    path = tmp_path / "classifier.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "pytorch-lightning_version": L.__version__}, path)
    return str(path)


@pytest.mark.parametrize("carrier", ["texture", "patch"])
def test_trained_pattern_makes_the_frozen_classifier_right_and_beats_the_baselines(frozen_classifier, carrier):
    model = Unadversarial(frozen_classifier, carrier=carrier, num_classes=4, img_size=12, patch_size=5, lr=0.1,
                          corruptions=["gaussian_noise", "contrast"], severities=[3])
    frozen = {k: v.clone() for k, v in model.classifier.state_dict().items()}
    trainer = L.Trainer(max_steps=60, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, DataLoader(_stroke_data(256, 0), batch_size=64, shuffle=True))
    assert all(torch.equal(v, model.classifier.state_dict()[k]) for k, v in frozen.items())   # the model is fixed
    assert 0 <= model.pattern.min() and model.pattern.max() <= 1
    metrics = trainer.test(model, DataLoader(_stroke_data(200, 1), batch_size=100), verbose=False)[0]
    # measured: 0.53–0.57 clean and 0.42–0.59 corrupted vs 0.19–0.30 for every baseline (60 steps)
    for baseline in ("none", "random", "best_image"):
        assert metrics["test/unadversarial/clean"] > metrics[f"test/{baseline}/clean"] + 0.2
        assert metrics["test/unadversarial/corrupted_s3"] > metrics[f"test/{baseline}/corrupted_s3"] + 0.1
    # on a classifier that reads nothing of the object, the pattern of another class decides (0.6 vs 0.13–0.15)
    assert metrics["test/unadversarial/conflict_follows_pattern"] > metrics[
        "test/unadversarial/conflict_follows_image"] + 0.3


def test_the_objective_is_minimised_cross_entropy():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    labels = torch.tensor([0, 0])
    loss = unadversarial_loss(logits, labels)
    assert loss[0] < loss[1] and loss[0] == pytest.approx(torch.log1p(torch.exp(torch.tensor(-2.0))).item())


def test_bad_arguments_are_refused_before_training(frozen_classifier):
    with pytest.raises(ValueError, match="carrier='sticker'"):
        Unadversarial(frozen_classifier, carrier="sticker")
    with pytest.raises(ValueError, match="fog"):
        Unadversarial(frozen_classifier, corruptions=["fog"])
