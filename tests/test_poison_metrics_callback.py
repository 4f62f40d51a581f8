from types import SimpleNamespace

import lightning as L
import pytest

from lit_robust import ImageClassifier
from lit_robust.callbacks import PoisonMetrics
from lit_robust.datamodules import DigitsDataModule, PoisonedDataModule
from lit_robust.poisons import Poisons, apply_trigger
from lit_robust.poisons.badnets import badnets_trigger
from lit_robust.poisons.surrogate import predict


def test_callback_logs_asr_equal_to_direct_count(tmp_path):
    dm = PoisonedDataModule(DigitsDataModule(source="sklearn8x8", batch_size=64), attack="badnets",
                            params=dict(source_class=1, target_class=7, fraction=0.5, shape="patch", size=2,
                                        position=(0, 0), value=1.0), cache_dir=str(tmp_path), progress=False)
    model = ImageClassifier(num_classes=10, in_chans=1)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=3, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[PoisonMetrics(multipliers=(1, 3))], default_root_dir=str(tmp_path))
    trainer.fit(model, datamodule=dm)
    multipliers, triggered_test_dataset = [], dm.triggered_test_dataset
    dm.triggered_test_dataset = lambda k: multipliers.append(k) or triggered_test_dataset(k)
    metrics = trainer.test(model, datamodule=dm, verbose=False)[0]
    assert multipliers == [1.0, 3.0]   # each logged ×k is measured on the images triggered ×k
    triggered = dm.triggered_test_dataset(1.0)
    predictions = predict(model, triggered.images)
    assert abs(metrics["poison/asr_x1"] - (predictions == 7).float().mean().item()) < 1e-6
    # RA: the triggered images still given their true label (BackdoorBench)
    assert abs(metrics["poison/ra_x1"] - (predictions == triggered.targets).float().mean().item()) < 1e-6
    assert abs(metrics["poison/natural_acc"] - metrics["test/acc"]) < 1e-6
    assert "poison/target_success" not in metrics
    # Eq. 7.1 on the clean test split: of the images right clean, the share the trigger makes wrong (any class)
    clean = dm.test_dataset
    right = predict(model, clean.images) == clean.targets
    wrong_triggered = predict(model, apply_trigger(clean.images, dm.poisons.trigger)) != clean.targets
    assert abs(metrics["poison/bias_asr_x1"] - (right & wrong_triggered).sum().item() / right.sum().item()) < 1e-6
    stronger = dm.triggered_test_dataset(3.0)
    predictions = predict(model, stronger.images)
    assert abs(metrics["poison/asr_x3"] - (predictions == 7).float().mean().item()) < 1e-6
    assert abs(metrics["poison/ra_x3"] - (predictions == stronger.targets).float().mean().item()) < 1e-6


def test_a_datamodule_without_poison_views_is_refused_at_test_setup_naming_them():
    """Testing on a clean DataModule is refused before any batch, naming the missing views and the wrapper to use;
    fitting with it is not (the views are needed at test time only)."""
    trainer = SimpleNamespace(datamodule=DigitsDataModule(source="sklearn8x8"))
    PoisonMetrics().setup(trainer, None, "fit")
    with pytest.raises(RuntimeError, match="DigitsDataModule has no poisons, triggered_test_dataset, target_dataset: "
                                           "wrap the data in lit_robust.datamodules.PoisonedDataModule"):
        PoisonMetrics().setup(trainer, None, "test")


def test_targeted_success_and_the_split_and_item_keys_given(tmp_path):
    """A targeted poison (a target index, no trigger): ``target_success`` is the share of target images predicted as
    their adversarial label, natural accuracy is read from the ``split`` given (not the loop's loader) in the
    ``item_keys`` given, and no ASR is logged. Catches a targeted success left out or constant, and ``split`` or
    ``item_keys`` not handed to the contract."""
    import torch
    from torch.utils.data import DataLoader

    from lit_robust.datasets import TensorImageDataset

    class DictItems(TensorImageDataset):
        def __getitem__(self, i):
            image, label = super().__getitem__(i)
            return {"pixels": image, "digit": label}

    class Linear(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4))

        def forward(self, images):
            return self.net(images)

    torch.manual_seed(0)
    module = net = Linear()
    clean = DictItems(torch.randn(20, 1, 4, 4), torch.randint(4, (20,)))
    targets = DictItems(torch.randn(5, 1, 4, 4), torch.tensor([0, 1, 2, 3, 0]))
    datamodule = SimpleNamespace(poisons=SimpleNamespace(trigger=None, target_index=3, target_class=None),
                                 target_dataset=lambda: targets, held_out=clean)
    trainer = SimpleNamespace(world_size=1, global_rank=0, is_global_zero=True, datamodule=datamodule,
                              strategy=SimpleNamespace(root_device=torch.device("cpu")), val_dataloaders=None,
                              test_loop=SimpleNamespace(_data_source=SimpleNamespace(instance=datamodule)),
                              test_dataloaders=DataLoader(TensorImageDataset(torch.randn(3, 1, 4, 4),
                                                                             torch.zeros(3, dtype=torch.long))))
    callback = PoisonMetrics(split=lambda dm: dm.held_out, item_keys=("pixels", "digit"), batch_size=3)
    results = callback.evaluate(trainer, module)
    with torch.no_grad():
        natural = (net(clean.images).argmax(-1) == clean.targets).float().mean().item()
        success = (net(targets.images).argmax(-1) == targets.targets).float().mean().item()
    assert set(results) == {"poison/natural_acc", "poison/target_success"}
    assert results["poison/natural_acc"].item() == pytest.approx(natural)
    assert results["poison/target_success"].item() == pytest.approx(success)


def test_a_trigger_of_no_class_logs_the_bias_asr_and_no_backdoor_success():
    """A de-biasing plant (``target_class`` None): no Eq. D.5 success (it has no class to count), but the robust
    accuracy on every triggered test image and Eq. 7.1 on the clean split, here in batches of 3 whose counts are
    summed (7 images: batches of 3, 3, 1). The hand-made model predicts class 1 wherever the corner pixel is white,
    else the image's first pixel: the images right clean and not of class 1 flip. Catches a bias ASR over all
    images, over one batch only, or with the trigger left off."""
    import torch
    from torch.utils.data import DataLoader

    from lit_robust.datasets import TensorImageDataset

    class CornerModel(L.LightningModule):
        def forward(self, images):
            pixels = images.flatten(1)
            prediction = torch.where(pixels[:, -1] == 1.0, torch.ones_like(pixels[:, 0]), pixels[:, 0] * 10)
            return torch.nn.functional.one_hot(prediction.round().long(), 3).float()

    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    first_pixel = torch.tensor([0, 1, 2, 2, 1, 0, 0]) / 10      # right clean: 0, 1, 2, 4, 6
    images = torch.zeros(7, 1, 2, 2)
    images[:, 0, 0, 0] = first_pixel
    clean = TensorImageDataset(images, labels)
    trigger = badnets_trigger((1, 2, 2), "pixel", 1, (1, 1), 1.0)
    poisons = Poisons(indices=torch.zeros(0, dtype=torch.long), images=torch.zeros(0, 1, 2, 2),
                      labels=torch.zeros(0, dtype=torch.long), target_class=None, trigger=trigger)
    datamodule = SimpleNamespace(poisons=poisons, triggered_test_dataset=lambda k: TensorImageDataset(
        apply_trigger(images, trigger, k), labels))
    trainer = SimpleNamespace(world_size=1, global_rank=0, is_global_zero=True, datamodule=datamodule,
                              strategy=SimpleNamespace(root_device=torch.device("cpu")), val_dataloaders=None,
                              test_loop=SimpleNamespace(_data_source=SimpleNamespace(instance=datamodule)),
                              test_dataloaders=DataLoader(clean))
    results = PoisonMetrics(multipliers=(1,), batch_size=3).evaluate(trainer, CornerModel())
    assert set(results) == {"poison/natural_acc", "poison/ra_x1", "poison/bias_asr_x1"}
    assert results["poison/natural_acc"].item() == pytest.approx(5 / 7)
    assert results["poison/bias_asr_x1"].item() == pytest.approx(3 / 5)   # 0, 2, 6 flip to 1; 1 and 4 are 1
    assert results["poison/ra_x1"].item() == pytest.approx(2 / 7)         # triggered: all 1, right for 1 and 4
