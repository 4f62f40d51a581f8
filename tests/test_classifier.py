"""The classifier with every backbone family, on each datamodule it is used with (Lightning fast_dev_run)."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lit_robust import ImageClassifier
from lit_robust.datamodules import DigitsDataModule, ImageDataModule, TensorImageDataset
from lit_robust.functional.augment import random_shift
from lit_robust.models.nets import create_backbone


class RandomRGB(ImageDataModule):
    """A CIFAR-shaped stand-in (3×32×32) for backbones that are used on CIFAR-10."""

    in_chans = 3

    def setup(self, stage=None):
        generator = torch.Generator().manual_seed(0)
        data = TensorImageDataset(torch.rand(16, 3, 32, 32, generator=generator), torch.arange(16) % 10)
        self.train_dataset = self.val_dataset = self.test_dataset = data


def fast_dev_run(model, datamodule):
    trainer = L.Trainer(fast_dev_run=True, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model, datamodule=datamodule)
    trainer.test(model, datamodule=datamodule)
    return trainer


@pytest.mark.parametrize("backbone,datamodule", [
    ("small_cnn", lambda: DigitsDataModule(source="mnist5k", batch_size=32)),
    ("small_cnn", lambda: DigitsDataModule(source="sklearn8x8", batch_size=32)),
    ("resnet18_cifar", lambda: RandomRGB(batch_size=8)),
    ("preact_resnet18_cifar", lambda: RandomRGB(batch_size=8)),
    ("resnet10t", lambda: DigitsDataModule(source="sklearn8x8", img_size=32, batch_size=8)),
])
def test_fast_dev_run(backbone, datamodule):
    dm = datamodule()
    model = ImageClassifier(backbone=backbone, in_chans=dm.in_chans, mean=[0.5] * dm.in_chans,
                            std=[0.5] * dm.in_chans, max_shift=2, hflip=True)
    trainer = fast_dev_run(model, dm)
    images, labels = next(iter(dm.test_dataloader()))[:2]     # fast_dev_run tests exactly this batch
    with torch.no_grad():
        expected = (model.eval()(images).argmax(-1) == labels).float().mean()
    assert trainer.callback_metrics["test/acc"].item() == pytest.approx(expected.item())


def train_and_test_on_digits(permute_labels: bool) -> float:
    """Test accuracy of ``small_cnn`` after 2 epochs on scikit-learn's 8×8 digits (optionally on permuted labels)."""
    torch.manual_seed(0)
    dm = DigitsDataModule(source="sklearn8x8", batch_size=64, seed=0)
    dm.setup()
    if permute_labels:
        train = dm.train_dataset
        dm.train_dataset = TensorImageDataset(train.images, train.targets[torch.randperm(len(train.targets))])
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    model = ImageClassifier(backbone="small_cnn", lr=3e-3)
    trainer.fit(model, datamodule=dm)
    return trainer.test(model, datamodule=dm, verbose=False)[0]["test/acc"]


def test_training_learns_the_digits_and_not_permuted_labels():
    """Catches a classifier that does not learn (random or constant logits, a flipped loss sign) and a test metric
    that does not measure the held-out split (permuted training labels must leave it near chance, 0.1)."""
    learned, permuted = train_and_test_on_digits(False), train_and_test_on_digits(True)
    assert learned > 0.85 and permuted < 0.25


def test_cifar_stem_keeps_32x32_resolution():
    net = create_backbone("resnet18_cifar", num_classes=10, in_chans=3)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    features = net.forward_features(torch.rand(2, 3, 32, 32))
    assert features.shape[-1] == 4  # 32 / 8: no stem downsampling


def test_unknown_backbone_is_named():
    with pytest.raises(ValueError, match="not_a_net"):
        create_backbone("not_a_net")


def test_small_cnn_takes_a_smooth_activation_by_timm_name():
    net = create_backbone("small_cnn", num_classes=10, in_chans=1, widths=(4, 8), act_layer="silu")
    kinds = [type(m) for m in net.modules()]
    assert kinds.count(torch.nn.SiLU) == 4 and torch.nn.ReLU not in kinds  # two per block, none left as ReLU
    with pytest.raises(ValueError, match="act_layer 'softplus'.*silu"):
        create_backbone("small_cnn", act_layer="softplus")


def test_nan_loss_stops_with_a_clear_error():
    images = torch.full((8, 1, 8, 8), float("nan"))
    dm = ImageDataModule(batch_size=8)
    dm.train_dataset = dm.val_dataset = TensorImageDataset(images, torch.zeros(8, dtype=torch.long))
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        num_sanity_val_steps=0, enable_checkpointing=False)
    with pytest.raises(FloatingPointError, match="lr"):
        trainer.fit(ImageClassifier(), train_dataloaders=DataLoader(dm.train_dataset, batch_size=8))


def test_random_shift_moves_each_image_by_at_most_max_shift():
    images = torch.zeros(64, 1, 9, 9)
    images[:, :, 4, 4] = 1.0
    shifted = random_shift(images, 2)
    positions = shifted.flatten(1).argmax(1)
    rows, cols = positions // 9, positions % 9
    assert shifted.sum(dim=(1, 2, 3)).eq(1).all()
    assert ((rows - 4).abs() <= 2).all() and ((cols - 4).abs() <= 2).all()
    assert len(set(zip(rows.tolist(), cols.tolist()))) > 5
