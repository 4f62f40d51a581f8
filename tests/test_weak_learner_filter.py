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
    """sklearn 8×8 digits with a one-pixel trigger; exposes the manifest as ``poison_mask`` (as PoisonedDataModule)."""

    def setup(self, stage=None):
        if self.train_dataset is not None:
            return
        images, labels, is_poison = backdoored_digits()
        self.train_dataset = TensorImageDataset(images, labels)
        self.val_dataset = TensorImageDataset(images[:64], labels[:64])
        self.poison_mask = is_poison


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
    assert metrics["filter/recall"] >= 0.8 and metrics["filter/clean_kept"] >= 0.8
    assert metrics["filter/removed"] == 1797 - len(datamodule.train_dataset)
    # a resumed fit restores the mask instead of filtering again
    restored = WeakLearnerFilter(runs=2, rounds=4)
    restored.load_state_dict(callback.state_dict())
    assert torch.equal(restored.keep, callback.keep)


def test_cached_mask_is_reused(tmp_path, monkeypatch):
    first = TrimmedLossFilter(rounds=1, first_epochs=1, hidden=16, cache_dir=str(tmp_path))
    fit_with(first)
    assert len(list(tmp_path.glob("TrimmedLossFilter-*.pt"))) == 1
    second = TrimmedLossFilter(rounds=1, first_epochs=1, hidden=16, cache_dir=str(tmp_path))
    monkeypatch.setattr(second, "select", lambda *args: pytest.fail("the cached mask should have been used"))
    fit_with(second)
    assert torch.equal(second.keep, first.keep)
    other = TrimmedLossFilter(rounds=1, first_epochs=1, hidden=16, keep_fraction=0.9, cache_dir=str(tmp_path))
    fit_with(other)  # other parameters → another entry
    assert len(list(tmp_path.glob("TrimmedLossFilter-*.pt"))) == 2


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


@pytest.mark.slow
def test_ddp_cpu_end_to_end(tmp_path):
    """Two gloo ranks through train.py: the whole filter on every rank, the same subset on both ranks."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    command = [sys.executable, "train.py", "experiment=ispl_badnets_digits", "trainer=ddp_cpu", f"hydra.run.dir={out}",
               "callbacks.rich_progress_bar=null", "data.base.source=sklearn8x8", "data.params.position=[7,7]",
               "data.params.fraction=0.2", f"data.cache_dir={tmp_path / 'poisons'}", "trainer.max_epochs=1",
               "callbacks.data_filter.runs=2", "callbacks.data_filter.rounds=4", "callbacks.data_filter.hidden=64",
               "callbacks.data_filter.learner_epochs=15", "callbacks.data_filter.self_train_epochs=10",
               "callbacks.data_filter.batch_size=32"]
    subprocess.run(command, cwd=root, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900)
    metrics = json.loads((out / "metrics.json").read_text())
    # the split leaves 1,257 8×8 digits (single process: recall 0.77, clean kept 0.87); learners' predictions
    # gathered out of order would vote at random and keep far fewer clean samples
    assert metrics["filter/recall"] >= 0.6 and metrics["filter/clean_kept"] >= 0.75
    assert "test/acc" in metrics and "poison/asr_x1" in metrics
