"""Transfer influences (thesis 001 ch. 8): the Eq. 8.1 estimator against hand computations, the removal choice, the
per-model class subsets the source models train on, and a toy run where each class must help its own target class."""
from __future__ import annotations

import lightning as L
import pytest
import torch

from lit_robust import ClassSubsetEnsemble
from lit_robust.datamodules import ClassSubsetsDataModule, ClassSubsetsDataset, ImageDataModule
from lit_robust.datasets import TensorImageDataset
from lit_robust.functional.transfer_influence import (fit_linear_probes, influence_by_target_class,
                                                      most_harmful_classes, random_class_subsets,
                                                      transfer_influence, transfer_outcome)
from lit_robust.models.class_subset_ensemble import influence_summary, interleave_rank_shards

# 4 models × 3 classes; outcomes of 2 target examples
INCLUDED = torch.tensor([[1, 1, 0], [1, 0, 1], [0, 1, 1], [0, 0, 1]], dtype=torch.bool)
OUTCOMES = torch.tensor([[0.9, 0.2], [0.7, 0.4], [0.1, 0.6], [0.3, 0.8]])


def test_influence_equals_the_hand_computed_difference_of_conditional_means():
    influence = transfer_influence(INCLUDED, OUTCOMES)
    # class 0: in models 0, 1 → (0.9 + 0.7) / 2 = 0.8; out: models 2, 3 → 0.2; influence 0.6 (example 0)
    # class 1: in 0, 2 → 0.5; out 1, 3 → 0.5: 0.0.  class 2: in 1, 2, 3 → 1.1/3; out 0 → 0.9
    expected = torch.tensor([[0.6, (0.2 + 0.4) / 2 - (0.6 + 0.8) / 2],
                             [0.0, (0.2 + 0.6) / 2 - (0.4 + 0.8) / 2],
                             [1.1 / 3 - 0.9, 1.8 / 3 - 0.2]])
    assert torch.allclose(influence, expected, atol=1e-6)


def test_a_class_in_every_subset_or_in_none_is_refused_naming_it():
    always = INCLUDED.clone()
    always[:, 1] = True
    with pytest.raises(ValueError, match=r"classes \[1\] are in every subset or in none"):
        transfer_influence(always, OUTCOMES)


def test_removal_picks_the_classes_of_most_negative_overall_influence_first():
    influence = torch.tensor([[0.3, 0.1], [-0.2, -0.4], [0.5, -0.9], [-0.1, 0.0], [0.2, 0.2]])
    # overall (mean over targets): 0.2, -0.3, -0.2, -0.05, 0.2
    assert most_harmful_classes(influence, 3).tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="count=5"):
        most_harmful_classes(influence, 5)


def test_influence_by_target_class_averages_over_each_classes_examples():
    influence = torch.tensor([[1.0, 3.0, -2.0], [0.0, 4.0, 2.0]])
    by_class = influence_by_target_class(influence, torch.tensor([0, 0, 2]), 3)
    assert torch.allclose(by_class[:, [0, 2]], torch.tensor([[2.0, -2.0], [2.0, 2.0]]))
    assert by_class[:, 1].isnan().all()  # no example of target class 1
    summary = influence_summary(torch.tensor([[2.0, 0.5, float("nan")], [-1.0, 1.0, float("nan")],
                                              [0.0, 3.0, float("nan")]]))
    assert summary == {"test/influence_diagonal": 1.5, "test/influence_off_diagonal": 0.625,
                       "test/own_class_most_positive": 0.5}  # class 0's best is 0; class 1's best is 2


def test_outcomes_are_the_true_class_probability_correctness_and_margin():
    logits = torch.tensor([[[2.0, 0.0, 1.0], [0.0, 3.0, 1.0]]])  # one model, two examples
    labels = torch.tensor([0, 2])
    probability = logits.softmax(-1)
    true_class = torch.stack([probability[0, 0, 0], probability[0, 1, 2]])[None]
    assert torch.allclose(transfer_outcome(logits, labels), true_class)
    assert transfer_outcome(logits, labels, "correct").tolist() == [[1.0, 0.0]]
    assert transfer_outcome(logits, labels, "margin").tolist() == [[1.0, -2.0]]


def test_random_subsets_hold_subset_size_classes_each_and_differ():
    masks = random_class_subsets(64, 10, 5, torch.Generator().manual_seed(0))
    assert masks.shape == (64, 10) and (masks.sum(1) == 5).all()
    assert len({tuple(row.tolist()) for row in masks}) > 50
    assert 0.35 < masks.float().mean(0).min() and masks.float().mean(0).max() < 0.65
    with pytest.raises(ValueError, match="subset_size=10"):
        random_class_subsets(4, 10, 10, torch.Generator())


def test_probes_are_fitted_per_model_as_if_alone():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat(40)
    separable = torch.nn.functional.one_hot(labels, 3).float() * 3 + 0.3 * torch.randn(120, 3, generator=generator)
    noise = torch.randn(120, 3, generator=generator)
    weight, bias = fit_linear_probes(torch.stack([separable, noise]), labels, 3)
    accuracy = ((torch.stack([separable, noise]) @ weight + bias[:, None]).argmax(-1) == labels).float().mean(1)
    assert accuracy[0] == 1.0 and accuracy[1] < 0.7
    alone, alone_bias = fit_linear_probes(separable[None], labels, 3)
    assert torch.allclose(alone[0], weight[0], atol=1e-3) and torch.allclose(alone_bias[0], bias[0], atol=1e-3)


def test_interleave_restores_the_single_process_order_of_an_unpadded_sampler():
    full = torch.arange(14.0).view(2, 7)
    shards = [full[:, rank::3] for rank in range(3)]  # UnrepeatedDistributedSampler, shuffle off
    assert torch.equal(interleave_rank_shards(shards), full)


def test_each_model_trains_on_its_own_classes_and_sees_each_example_once_per_epoch():
    labels = torch.arange(4).repeat_interleave(torch.tensor([3, 5, 2, 4]))
    images = torch.arange(len(labels), dtype=torch.float32).view(-1, 1, 1, 1)
    included = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    dataset = ClassSubsetsDataset(images, labels, included, torch.Generator().manual_seed(0))
    assert len(dataset) == 8  # model 0 holds 3 + 5 images, model 1 holds 2 + 4 (wrapping round)
    seen = torch.stack([dataset[j][0].flatten() for j in range(len(dataset))], 1)  # (models, items)
    assert sorted(seen[0].long().tolist()) == list(range(8))
    assert set(seen[1].long().tolist()) == set(range(8, 14))
    assert all(included[m, dataset[j][1][m]] for j in range(len(dataset)) for m in range(2))


class PatternDigits(ImageDataModule):
    """Four separable 8×8 classes (horizontal, vertical, diagonal stripes, checkerboard) with pixel noise."""

    num_classes, in_chans = 4, 1

    def __init__(self, per_class: int = 60, seed: int = 0, **loader_kwargs):
        super().__init__(seed=seed, **loader_kwargs)
        self.per_class = per_class

    def setup(self, stage=None) -> None:
        if self.train_dataset is not None:
            return
        rows, cols = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
        patterns = torch.stack([rows % 2, cols % 2, (rows + cols) % 4 < 2, (rows // 2 + cols // 2) % 2]).float()
        generator = torch.Generator().manual_seed(self.seed)
        labels = torch.arange(4).repeat(self.per_class)
        images = (patterns[labels] * 0.8 + 0.2 * torch.rand(len(labels), 8, 8, generator=generator))[:, None]
        third = len(labels) // 3
        self.train_dataset = TensorImageDataset(images[:third * 2], labels[:third * 2])
        self.val_dataset = self.test_dataset = TensorImageDataset(images[third * 2:], labels[third * 2:])


def test_on_a_separable_toy_each_source_class_helps_its_own_target_class_most(tmp_path):
    data = ClassSubsetsDataModule(PatternDigits(batch_size=16, seed=1), PatternDigits(per_class=30, seed=2),
                                  num_subsets=24, subset_size=2, seed=0)
    model = ClassSubsetEnsemble(num_models=24, num_classes=4, backbone_kwargs={"widths": [4, 8]}, lr=1e-2,
                                max_shift=0)
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=data)
    metrics = trainer.test(model, datamodule=data, verbose=False)[0]
    results = torch.load(tmp_path / "transfer_influence.pt", weights_only=True)
    by_class = results["influence_by_target_class"]
    assert (by_class.diagonal() > 0.05).all(), by_class  # a stub (flipped sign, random outcomes) fails here
    assert metrics["test/own_class_most_positive"] >= 0.75 and metrics["test/influence_off_diagonal"] < 0
    assert torch.equal(results["included"], data.subset_masks)
    assert results["outcomes"].shape == (24, 40) and torch.allclose(results["target_acc"].mean(),
                                                                   torch.tensor(metrics["test/acc"]))


def test_explicit_subsets_must_match_num_subsets_and_name_real_classes():
    with pytest.raises(ValueError, match="set data.num_subsets=2"):
        ClassSubsetsDataModule(PatternDigits(), PatternDigits(), num_subsets=3, subsets=[[0, 1], [2]])
    with pytest.raises(ValueError, match=r"\(\[7\] are not\)"):
        ClassSubsetsDataModule(PatternDigits(), PatternDigits(), num_subsets=2, subsets=[[0, 7], [2]])
    with pytest.raises(ValueError, match="raise data.num_subsets"):
        ClassSubsetsDataModule(PatternDigits(), PatternDigits(), num_subsets=1, subset_size=2)


def test_a_model_count_other_than_the_datas_subsets_stops_the_fit_before_training():
    data = ClassSubsetsDataModule(PatternDigits(), PatternDigits(), num_subsets=2, subsets=[[0, 1], [2, 3]])
    model = ClassSubsetEnsemble(num_models=3, num_classes=4, backbone_kwargs={"widths": [4]})
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match=r"model.num_models=3.*set model.num_models=\$\{data.num_subsets\}"):
        trainer.fit(model, datamodule=data)
    assert model.global_step == 0


def test_table_script_removes_each_seeds_most_harmful_classes_and_writes_both_records(tmp_path, monkeypatch):
    """The benchmark at toy size, its runs in this process (``runner.run_experiment`` in place of a ``train.py``
    subprocess): per seed an influence run and a removal run whose second source lacks exactly the classes of most
    negative influence, and the two records with per-seed values."""
    import json
    import sys

    import transfer_influence_table as table

    from lit_robust.run import runner

    def in_process(run_dir, overrides, done_key="test/acc"):
        experiment = overrides[0].split("=", 1)[1]
        return runner.run_experiment(experiment, overrides[1:], run_dir), {"reused": False}

    monkeypatch.setattr(table, "train_run", in_process)
    toy = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
           "data.base.num_images=100", "data.target.num_images=200", "model.backbone_kwargs={widths:[4,8]}",
           "callbacks.rich_progress_bar=null"]
    monkeypatch.setattr(sys, "argv", ["transfer_influence_table.py", "--out", str(tmp_path), "--seeds", "0", "1",
                                      "--models", "10", "--remove", "2", "--random-draws", "2", *toy])
    table.main()
    removal = json.loads((tmp_path / "transfer_influence_removal.json").read_text())
    assert [row["name"] for row in removal["rows"]] == ["all ten", "all but the 2 most harmful",
                                                       "all but 2 random (2 draws)"]
    for seed in (0, 1):
        influence = torch.load(tmp_path / f"influence_seed{seed}" / "transfer_influence.pt", weights_only=True)
        run = torch.load(tmp_path / f"removal_seed{seed}" / "transfer_influence.pt", weights_only=True)
        harmful = most_harmful_classes(influence["influence"], 2)
        assert influence["included"].shape == (10, 10) and run["included"].shape == (4, 10)
        assert run["included"][0].all() and sorted(torch.nonzero(~run["included"][1]).flatten().tolist()) == \
            sorted(harmful.tolist())
        assert (run["included"][2:].sum(1) == 8).all()
        assert removal["rows"][1]["acc_per_seed"][seed] == pytest.approx(float(run["target_acc"][1]))
        assert removal["rows"][2]["acc_per_seed"][seed] == pytest.approx(float(run["target_acc"][2:].mean()))
    influence_record = json.loads((tmp_path / "transfer_influence_digits.json").read_text())
    assert [row["name"] for row in influence_record["rows"]] == [str(c) for c in range(10)]
    assert all(len(row["own_per_seed"]) == 2 for row in influence_record["rows"])


@pytest.mark.slow
def test_two_ddp_ranks_train_the_ensemble_and_gather_the_single_process_outcomes(tmp_path):
    """The trainer's strategy runs the many-subset training: two gloo ranks (ddp_spawn) share every model's data and
    fit the ensemble; their test phase shares the target split, gathers it back in order, and writes the outcomes and
    influences one process computes from the same weights. Slow: spawning two ranks takes a minute on the shared CPU."""
    data = ClassSubsetsDataModule(PatternDigits(batch_size=8, seed=1), PatternDigits(per_class=30, seed=2),
                                  num_subsets=6, subset_size=2, seed=0)
    model = ClassSubsetEnsemble(num_models=6, num_classes=4, backbone_kwargs={"widths": [4, 8]}, max_shift=0)
    options = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False)
    ddp = L.Trainer(max_epochs=1, devices=2, strategy="ddp_spawn", default_root_dir=tmp_path / "ddp", **options)
    ddp.fit(model, datamodule=data)
    ddp.test(model, datamodule=data, verbose=False)
    L.Trainer(devices=1, default_root_dir=tmp_path / "single", **options).test(model, datamodule=data, verbose=False)
    single, gathered = (torch.load(tmp_path / name / "transfer_influence.pt", weights_only=True)
                        for name in ("single", "ddp"))
    assert torch.equal(gathered["target_labels"], single["target_labels"])
    assert torch.allclose(gathered["outcomes"], single["outcomes"], atol=1e-5)
    assert torch.allclose(gathered["influence"], single["influence"], atol=1e-5)
