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
    """sklearn 8×8 digits with a planted trigger (``test_ispl.backdoored_digits``; one pixel on 20 % of the 7s by
    default); exposes the manifest as ``poison_mask`` (as PoisonedDataModule)."""

    def __init__(self, trigger: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        self.trigger = trigger or {}

    def setup(self, stage=None):
        if self.train_dataset is not None:
            return
        images, labels, is_poison = backdoored_digits(**self.trigger)
        self.train_dataset = TensorImageDataset(images, labels)
        self.val_dataset = TensorImageDataset(images[:64], labels[:64])
        self.poison_mask = is_poison


def fit_with(callback, trigger: dict | None = None):
    datamodule = BackdooredDigits(trigger, batch_size=256)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=0,
                        callbacks=[callback], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(ImageClassifier(backbone="small_cnn", backbone_kwargs={"widths": (8,)}), datamodule=datamodule)
    return datamodule, trainer


def random_removal_bound(removed: torch.Tensor, is_poison: torch.Tensor, groups: torch.Tensor | None = None) -> float:
    """Poisons a random removal of the same count would catch: mean + 4 standard deviations (hypergeometric), drawn
    within each of ``groups`` (the labels, for filters that remove per class) as many as the filter removed there."""
    groups = torch.zeros_like(is_poison, dtype=torch.long) if groups is None else groups
    mean = var = 0.0
    for group in groups.unique():
        members = groups == group
        n, p, r = members.sum().item(), (is_poison & members).sum().item(), (removed & members).sum().item()
        mean += r * p / n
        var += r * (p / n) * (1 - p / n) * (n - r) / max(n - 1, 1)
    return mean + 4 * var ** 0.5


def assert_beats_random_removal(stats: dict, removed: torch.Tensor, is_poison: torch.Tensor,
                                groups: torch.Tensor | None = None) -> None:
    """Recall and precision above those of a random removal of the same count (within ``groups``)."""
    bound = random_removal_bound(removed, is_poison, groups)
    assert stats["filter/recall"] > bound / is_poison.sum().item(), (stats, bound)
    assert stats["filter/precision"] > bound / removed.sum().item(), (stats, bound)


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
    assert len(trainer.train_dataloader.dataset) == int(callback.keep.sum()) < 1797
    metrics = trainer.callback_metrics
    _, labels, is_poison = backdoored_digits()
    assert_beats_random_removal(metrics, ~callback.keep, is_poison, labels)
    assert metrics["filter/removed"] == 1797 - len(trainer.train_dataloader.dataset)
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


@pytest.mark.parametrize("callback,trigger", [
    (SpectralSignatureFilter(removal_fraction=0.45, feature_epochs=20, hidden=256), {"patch": 2, "fraction": 0.5}),
    (ActivationClusteringFilter(feature_epochs=20, hidden=256), {"patch": 2, "fraction": 0.5}),
    (TrimmedLossFilter(rounds=1, first_epochs=2, keep_fraction=0.9, hidden=256), {})])
def test_baseline_filters_remove_planted_poisons_better_than_chance(callback, trigger):
    """Each baseline on a planted trigger it is built to find (spectral signatures — removing 1.5 × the poison share
    of a class, App. B — and activation clustering: a 2×2 patch on half the 7s, relabelled 1; ITLM: the one-pixel
    trigger on 20 %, before the learner fits it) catches more
    poisons than a random removal of the same count from the same classes would; catches a filter that removes
    arbitrary samples (e.g. the lowest instead of the highest scores, or a random mask). On the one-pixel, 20 %
    trigger with these small learners the spectral and clustering baselines do no better than chance."""
    torch.manual_seed(0)
    datamodule, trainer = fit_with(callback, trigger)
    metrics = trainer.callback_metrics
    assert 0 < metrics["filter/removed"] == 1797 - len(trainer.train_dataloader.dataset)
    _, labels, is_poison = backdoored_digits(**trigger)
    assert_beats_random_removal(metrics, ~callback.keep, is_poison, labels)


def test_filter_acts_on_a_loader_given_to_fit():
    """No DataModule: the loop iterates the kept subset of the loader's dataset, and the trainer's data source is the
    user's loader again after fit."""
    model = ImageClassifier(backbone="small_cnn", backbone_kwargs={"widths": (8,)})
    loader = torch.utils.data.DataLoader(TensorImageDataset(torch.rand(8, 1, 8, 8), torch.arange(8) % 2))
    callback = TrimmedLossFilter(keep_fraction=0.5, rounds=1, first_epochs=1, epochs=1, hidden=8)
    trainer = L.Trainer(max_steps=1, callbacks=[callback], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, train_dataloaders=loader)
    assert trainer.train_dataloader.dataset is callback.installed
    assert len(callback.installed) == int(callback.keep.sum()) < 8
    assert callback.installed.dataset is loader.dataset and trainer.fit_loop._data_source.instance is loader


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
               "callbacks.data_filter.batch_size=32", f"callbacks.data_filter.cache_dir={tmp_path / 'filters'}"]
    subprocess.run(command, cwd=root, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900)
    metrics = json.loads((out / "metrics.json").read_text())
    # learners' predictions gathered out of order would vote at random: no better than a random removal
    removed, kept, poisons = (int(metrics[f"filter/{k}"]) for k in ("removed", "kept", "poisons"))
    is_poison, removal = torch.arange(removed + kept) < poisons, torch.zeros(removed + kept, dtype=torch.bool)
    removal[:removed] = True  # only the counts matter for the unstratified bound
    assert_beats_random_removal(metrics, removal, is_poison)
    assert "test/acc" in metrics and "poison/asr_x1" in metrics


def test_baseline_filters_hand_their_settings_and_seed_to_the_functional_core(monkeypatch):
    """Each baseline's ``select`` calls its functions of ``lit_robust.functional.backdoor_filters`` with the filter's
    own settings, a generator seeded with its seed and the features the feature learner returned, and returns their
    keep mask; the defaults are App. B's (ε = 10 %) and ART's. Catches a setting dropped (the function's default used
    instead), swapped, or a seed other than the filter's."""
    from lit_robust.callbacks import baseline_filters

    calls = {}
    features, keep = torch.randn(6, 3), torch.tensor([True, False, True, True, False, True])

    def record(name, result):
        def function(*args, **kwargs):
            kwargs = {k: v.initial_seed() if isinstance(v, torch.Generator) else v for k, v in kwargs.items()}
            calls[name] = (args, kwargs)
            return result
        return function

    for name, result in (("poisoned_model_features", features), ("spectral_signature_scores", torch.arange(6.0)),
                         ("keep_below_top_fraction", keep), ("activation_clustering_keep", keep),
                         ("trimmed_loss_keep", keep)):
        monkeypatch.setattr(baseline_filters, name, record(name, result))
    inputs, labels = torch.rand(6, 64), torch.tensor([0, 0, 1, 1, 2, 2])

    assert SpectralSignatureFilter(removal_fraction=0.3, feature_epochs=4, hidden=16, seed=5).select(
        inputs, labels, 3, None) is keep
    assert calls["poisoned_model_features"] == ((inputs, labels, 3, 4, 16), {"generator": 5})
    assert calls["spectral_signature_scores"][0] == (features, labels)
    scores, fraction = calls["keep_below_top_fraction"][0][0], calls["keep_below_top_fraction"][0][2]
    assert torch.equal(scores, torch.arange(6.0)) and fraction == 0.3
    assert ActivationClusteringFilter(dims=4, size_threshold=0.25, feature_epochs=3, hidden=8, seed=2).select(
        inputs, labels, 3, None) is keep
    assert calls["poisoned_model_features"] == ((inputs, labels, 3, 3, 8), {"generator": 2})
    assert calls["activation_clustering_keep"] == ((features, labels, 4, 0.25, 2), {})
    assert TrimmedLossFilter(keep_fraction=0.8, rounds=2, first_epochs=6, epochs=1, hidden=12, seed=3).select(
        inputs, labels, 3, None) is keep
    assert calls["trimmed_loss_keep"] == ((inputs, labels, 3, 0.8, 2, 6, 1, 12), {"generator": 3})

    spectral, clustering, trimmed = SpectralSignatureFilter(), ActivationClusteringFilter(), TrimmedLossFilter()
    assert (spectral.removal_fraction, spectral.feature_epochs, spectral.hidden, spectral.seed) == (0.2, 10, 256, 0)
    assert (clustering.dims, clustering.size_threshold, clustering.feature_epochs, clustering.hidden) == (10, 0.35, 10,
                                                                                                          256)
    assert (trimmed.keep_fraction, trimmed.rounds, trimmed.first_epochs, trimmed.epochs, trimmed.hidden) == (
        0.96, 3, 10, 5, 256)
    assert spectral.cache_dir is clustering.cache_dir is trimmed.cache_dir is None
    assert spectral.seed == clustering.seed == trimmed.seed == 0
    for cls in (SpectralSignatureFilter, ActivationClusteringFilter, TrimmedLossFilter):
        configured = cls(cache_dir="masks", item_keys=("pixels", "digit"))  # handed on to TrainingSetFilter
        assert configured.cache_dir == "masks" and configured.item_format.item_keys == ("pixels", "digit"), cls
