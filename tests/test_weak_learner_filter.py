"""The filter callbacks inside a real Trainer: the train split shrinks, the removal is scored against the manifest."""
import lightning as L
import pytest
import torch

from lit_robust import ImageClassifier
from lit_robust.callbacks import (ActivationClusteringFilter, SpectralSignatureFilter, TrimmedLossFilter,
                                  WeakLearnerFilter)
from lit_robust.callbacks.weak_learner_filter import removal_stats
from lit_robust.datamodules import ImageDataModule, TensorImageDataset

from test_ispl import backdoored_digits


class BackdooredDigits(ImageDataModule):
    """sklearn 8×8 digits with a one-pixel trigger; exposes the manifest as ``train_poison_indices``."""

    def setup(self, stage=None):
        if self.train_dataset is not None:
            return
        images, labels, is_poison = backdoored_digits()
        self.train_dataset = TensorImageDataset(images, labels)
        self.val_dataset = TensorImageDataset(images[:64], labels[:64])
        self.train_poison_indices = is_poison.nonzero().squeeze(1).tolist()


def fit_with(callback):
    datamodule = BackdooredDigits(batch_size=256)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=0,
                        callbacks=[callback], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(ImageClassifier(backbone="small_cnn", backbone_kwargs={"widths": (8,)}), datamodule=datamodule)
    return datamodule, trainer


def test_removal_stats_score_against_ground_truth():
    keep = torch.tensor([True, False, False, True, True])
    poison = torch.tensor([False, True, False, True, False])
    stats = removal_stats(keep, poison)
    assert stats["filter/removed"] == 2 and stats["filter/precision"] == 0.5 and stats["filter/recall"] == 0.5
    assert stats["filter/clean_kept"] == pytest.approx(2 / 3)
    assert "filter/precision" not in removal_stats(keep, None)


def test_weak_learner_filter_removes_the_backdoor_before_fit():
    callback = WeakLearnerFilter(runs=2, rounds=4, learner_epochs=15, self_train_epochs=10, hidden=64, batch_size=32)
    datamodule, trainer = fit_with(callback)
    assert len(datamodule.train_dataset) == int(callback.keep.sum()) < 1797
    metrics = trainer.callback_metrics
    assert metrics["filter/recall"] >= 0.8 and metrics["filter/clean_kept"] >= 0.85
    assert metrics["filter/removed"] == 1797 - len(datamodule.train_dataset)
    # a resumed fit restores the mask instead of filtering again
    restored = WeakLearnerFilter(runs=2, rounds=4)
    restored.load_state_dict(callback.state_dict())
    assert torch.equal(restored.keep, callback.keep)


@pytest.mark.parametrize("callback", [SpectralSignatureFilter(feature_epochs=3, hidden=64),
                                      ActivationClusteringFilter(feature_epochs=3, hidden=64),
                                      TrimmedLossFilter(rounds=2, first_epochs=3, epochs=2, hidden=64)])
def test_baseline_filters_shrink_the_train_split(callback):
    datamodule, trainer = fit_with(callback)
    assert 0 < trainer.callback_metrics["filter/removed"] == 1797 - len(datamodule.train_dataset)


def test_filter_needs_a_datamodule():
    model = ImageClassifier(backbone="small_cnn", backbone_kwargs={"widths": (8,)})
    loader = torch.utils.data.DataLoader(TensorImageDataset(torch.rand(8, 1, 8, 8), torch.zeros(8).long()))
    trainer = L.Trainer(max_epochs=1, callbacks=[WeakLearnerFilter()], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False)
    with pytest.raises(RuntimeError, match="datamodule"):
        trainer.fit(model, train_dataloaders=loader)
