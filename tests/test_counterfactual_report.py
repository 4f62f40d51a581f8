"""CounterfactualReport against numbers worked out by hand.

A toy world keeps every number closed-form: 8×8 grey images carry their factors ``a`` (train range [0, 8]) and ``b``
([1, 3]) in two pixels as factor / 10; the factor reader reads them with a known bias; the model's do(a) misses a
by 0.3 and leaks 0.4 into b, its do(b) is exact, and its images overshoot [0, 1] in two corner pixels (as a decoder's
may); the data's own SCM moves b by 0.2 under do(a). Through a trainer, the report runs on the user's scene
DataModule of tests/test_reports_plain_project.py (dict items, ``Normalize``, no ``intervene``)."""
from __future__ import annotations

from importlib.resources import files

import lightning as L
import matplotlib.figure
import matplotlib.image
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from test_reports_plain_project import (DIMMING, QUIET, SCENES, ExactReader, SceneEditor, Scenes, ScenesDataModule,
                                        counterfactual)

from lit_robust.callbacks import CounterfactualReport, counterfactual_report
from lit_robust.callbacks.counterfactual_report import fit_factor_regressor

TOY_FACTORS = ["a", "b"]
TRAIN_FACTORS = torch.tensor([[0.0, 1.0], [8.0, 3.0], [2.0, 2.0], [5.0, 1.5]])  # spans 8 and 2
TEST_FACTORS = torch.tensor([[1.0, 2.5], [6.0, 1.2], [3.0, 2.0]])
SET_VALUES = {"a": [0.8, 4.0, 7.2], "b": [1.2, 2.0, 2.8]}  # 3 values from min + 10 % of the span to max − 10 %
READER_BIAS = torch.tensor([0.1, -0.05])
MISS, LEAK, SCM_EFFECT = 0.3, 0.4, 0.2


def carrying(factors: torch.Tensor) -> torch.Tensor:
    """(N, 1, 8, 8) images in [0, 1] whose first pixels hold the factors / 10."""
    images = torch.zeros(len(factors), 1, 8, 8)
    images[:, 0, 0, :factors.shape[1]] = factors / 10
    return images


class BiasedReader(torch.nn.Module):
    """The factor regressor: reads the first ``columns`` factors off ``carrying`` images, off by ``READER_BIAS``."""

    def __init__(self, columns: int = 2):
        super().__init__()
        self.columns = columns

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images[:, 0, 0, :self.columns] * 10 + READER_BIAS[:self.columns]


class LeakyEditor(torch.nn.Module):
    """Reconstructs exactly; do(a = v) gives a = v + MISS and b + LEAK, do(b = v) gives b = v; every output image has
    one pixel above 1 and one below 0."""

    device = torch.device("cpu")

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    def intervene(self, x: torch.Tensor, factor: str, value: float) -> torch.Tensor:
        factors = x[:, 0, 0, :2] * 10
        if factor == "a":
            factors[:, 0], factors[:, 1] = value + MISS, factors[:, 1] + LEAK
        else:
            factors[:, 1] = value
        images = carrying(factors)
        images[:, 0, 7, 7], images[:, 0, 7, 6] = 2.5, -0.5
        return images


def toy_scm(factors: torch.Tensor, **values: float) -> torch.Tensor:
    """The data's own intervention: do(a) sets a and moves b by SCM_EFFECT; do(b) sets b only."""
    factors = factors.clone()
    if "a" in values:
        factors[:, 0], factors[:, 1] = values["a"], factors[:, 1] + SCM_EFFECT
    if "b" in values:
        factors[:, 1] = values["b"]
    return factors


def toy_report(monkeypatch, factors=TOY_FACTORS, **options) -> CounterfactualReport:
    monkeypatch.setattr(counterfactual_report, "fit_factor_regressor", lambda *a, **k: BiasedReader(len(factors)))
    return CounterfactualReport(factors=factors, num_values=3, eval_size=len(TEST_FACTORS), **options)


def saved_figures(monkeypatch) -> list:
    """The figures ``savefig`` writes from now on (their axes stay readable after ``plt.close``)."""
    figures, save = [], matplotlib.figure.Figure.savefig

    def recorded_save(figure, *args, **kwargs):
        figures.append(figure)
        return save(figure, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", recorded_save)
    return figures


def test_metrics_are_the_hand_computed_ones_with_and_without_the_datas_scm(tmp_path, monkeypatch):
    """Each number by hand: the reader's error |bias| / span; do(a) tracks a within (MISS + bias) / 8 and moves b by
    LEAK / 2; do(b) tracks b within |bias| / 2 and leaves a; the SCM's own do(a) moves b by SCM_EFFECT / 2. Without
    an SCM no ``_true_change`` key appears, and with one only for other factors. Catches the error scaled by the
    span instead of divided, the reader's output added to the factors, the model's change and the SCM's swapped, and
    ``_true_change`` keys for the intervened factor or without an SCM."""
    report = toy_report(monkeypatch)
    train, test = (carrying(TRAIN_FACTORS), TRAIN_FACTORS), (carrying(TEST_FACTORS), TEST_FACTORS)
    expected = {"cf/regressor_mae/a": 0.1 / 8, "cf/regressor_mae/b": 0.05 / 2,
                "cf/do_a/a_tracking": (MISS + 0.1) / 8, "cf/do_a/b_change": LEAK / 2,
                "cf/do_b/a_change": 0.0, "cf/do_b/b_tracking": 0.05 / 2}
    assert report.measure(LeakyEditor(), train, test, None, tmp_path) == pytest.approx(expected, abs=1e-6)
    with_scm = report.measure(LeakyEditor(), train, test, toy_scm, tmp_path)
    assert with_scm == pytest.approx({**expected, "cf/do_a/b_true_change": SCM_EFFECT / 2,
                                      "cf/do_b/a_true_change": 0.0}, abs=1e-6)


def test_grid_rows_are_interventions_columns_the_set_values_after_the_input(tmp_path, monkeypatch):
    """The saved grid, read back: row r shows the first test image, then its counterfactuals under do(factor r = v)
    for the hand-computed values, clipped to [0, 1]; rows labelled do(factor) and the first column 'input' (7 pt, to fit
    a tile); 1.6 inches a tile at 110 dpi; written into a folder whose parent does not exist yet. Catches a row of
    other images or values, an unclipped or over-clipped tile, labels on the wrong tiles, and another size."""
    figures = saved_figures(monkeypatch)
    folder = tmp_path / "report" / "grid"
    toy_report(monkeypatch).measure(LeakyEditor(), (carrying(TRAIN_FACTORS), TRAIN_FACTORS),
                                    (carrying(TEST_FACTORS), TEST_FACTORS), None, folder)
    (figure,) = figures
    axes = np.array(figure.axes).reshape(2, 4)
    first = carrying(TEST_FACTORS[:1])
    for row, name in zip(axes, TOY_FACTORS):
        tiles = [first] + [LeakyEditor().intervene(first, name, value).clamp(0, 1) for value in SET_VALUES[name]]
        for ax, tile in zip(row, tiles):
            np.testing.assert_allclose(np.asarray(ax.images[0].get_array()), tile[0, 0].numpy(), atol=1e-6)
        assert [ax.get_ylabel() for ax in row] == [f"do({name})", "", "", ""]
        assert row[0].yaxis.label.get_fontsize() == 7
    assert [ax.get_title() for ax in axes.flat] == ["input"] + [""] * 7 and axes[0, 0].title.get_fontsize() == 7
    assert matplotlib.image.imread(folder / "counterfactual_grid.png").shape[:2] == (352, 704)  # 1.6 × 110 a tile


def test_one_factor_gives_a_one_row_grid(tmp_path, monkeypatch):
    """A report of a single factor: its numbers and a 1 × 4 grid (a squeezed axes array would fail to index)."""
    figures = saved_figures(monkeypatch)
    metrics = toy_report(monkeypatch, factors=["a"]).measure(
        LeakyEditor(), (carrying(TRAIN_FACTORS[:, :1]), TRAIN_FACTORS[:, :1]),
        (carrying(TEST_FACTORS[:, :1]), TEST_FACTORS[:, :1]), None, tmp_path)
    assert metrics == pytest.approx({"cf/regressor_mae/a": 0.1 / 8, "cf/do_a/a_tracking": (MISS + 0.1) / 8}, abs=1e-6)
    assert len(figures[0].axes) == 4
    assert matplotlib.image.imread(tmp_path / "counterfactual_grid.png").shape[:2] == (176, 704)


# ---- through a trainer: the splits it reads, its errors, its output folder -----------------------------------------
class ScenesWithMoreSplits(ScenesDataModule):
    """The user's scenes plus a dim test split (brightness 0.3 → 0.5) and a train split of brightness 0.2 → 1."""

    def setup(self, stage: str):
        super().setup(stage)
        columns = torch.linspace(1, 11, 32)
        self.dim_scenes = Scenes(torch.stack([torch.linspace(0.3, 0.5, 32), columns], 1))
        self.wide_scenes = Scenes(torch.stack([torch.linspace(0.2, 1.0, 32), columns], 1))


def test_named_splits_are_the_ones_measured_and_a_datamodule_without_intervene_adds_no_true_change(tmp_path,
                                                                                                  monkeypatch):
    """``split`` and ``train_split`` name attributes other than the loaders' datasets: do(column) dims the dim
    scenes (mean brightness 0.4) by 20 %, over the wide train split's brightness range 0.8 — 0.1, which neither the
    test loader's scenes nor the train loader's give. The DataModule has no ``intervene``, so no ``_true_change``
    keys; the grid goes to the trainer's folder. Catches a split setting not passed on, a required ``intervene``,
    and a grid written elsewhere."""
    monkeypatch.setattr(counterfactual_report, "fit_factor_regressor", lambda *args, **kwargs: ExactReader())
    report = counterfactual(split="dim_scenes", train_split="wide_scenes")
    logged = L.Trainer(default_root_dir=tmp_path, callbacks=[report], **QUIET).test(
        SceneEditor(), datamodule=ScenesWithMoreSplits(), verbose=False)[0]
    expected = {"cf/regressor_mae/brightness": 0.0, "cf/regressor_mae/column": 0.0,
                "cf/do_brightness/brightness_tracking": 0.0, "cf/do_brightness/column_change": 0.0,
                "cf/do_column/column_tracking": 0.0, "cf/do_column/brightness_change": (1 - DIMMING) * 0.4 / 0.8}
    assert {key: value for key, value in logged.items() if key.startswith("cf/")} == pytest.approx(expected, abs=1e-5)
    assert (tmp_path / "counterfactual_grid.png").exists()


@pytest.mark.parametrize("setting, stage", [("train_split", "train"), ("split", "test")])
def test_a_missing_split_is_named_with_the_callback(setting, stage, tmp_path):
    with pytest.raises(AttributeError, match=f"^CounterfactualReport: ScenesDataModule has no {stage} split in "
                                             "attribute 'scenes_missing'"):
        L.Trainer(default_root_dir=tmp_path, callbacks=[counterfactual(**{setting: "scenes_missing"})], **QUIET).test(
            SceneEditor(), datamodule=ScenesDataModule(), verbose=False)


def test_targets_that_are_not_the_factors_are_refused_before_the_regressor_trains(tmp_path, monkeypatch):
    """The scenes' two factor columns against three named factors: refused naming both and the fix, before the
    regressor trains."""
    monkeypatch.setattr(counterfactual_report, "fit_factor_regressor", lambda *a, **k: pytest.fail("trained"))
    report = CounterfactualReport(factors=["brightness", "column", "size"], item_keys=("image", "factors"),
                                  normalization=SCENES)
    with pytest.raises(ValueError, match=r"^CounterfactualReport measures the factors \['brightness', 'column', "
                                         r"'size'\], but the split's targets have shape \(64, 2\): use a DataModule "
                                         "whose targets are these factors, one column each, or pass factors= naming "
                                         "its columns$"):
        L.Trainer(default_root_dir=tmp_path, callbacks=[report], **QUIET).test(
            SceneEditor(), datamodule=ScenesDataModule(), verbose=False)


# ---- the factor regressor: its cache key and its settings -----------------------------------------------------------
def small_data(count: int = 40, size: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, 3, size, size, generator=generator), torch.rand(count, 4, generator=generator)


def test_cache_key_follows_the_first_32_images_and_all_factors(tmp_path, monkeypatch):
    """A cached regressor is reused for equal data and trained anew when one of the first 32 images or any factor
    changes; the key reads only the first 32 images (hashing a whole split would cost more than it saves), so an
    image past them shares the entry."""
    fits, fit = [], counterfactual_report.fit_factor_regressor
    monkeypatch.setattr(counterfactual_report, "fit_factor_regressor", lambda *a, **k: fits.append(1) or fit(*a, **k))
    report = CounterfactualReport(regressor_epochs=1, regressor_widths=[4, 4, 4], cache_dir=str(tmp_path))
    images, factors = small_data()
    report._regressor(images, factors)
    report._regressor(images.clone(), factors.clone())
    assert len(fits) == 1
    past_32, image_31, factor_39 = images.clone(), images.clone(), factors.clone()
    past_32[32] += 0.1
    report._regressor(past_32, factors)
    assert len(fits) == 1
    image_31[31] += 0.1
    factor_39[39] += 0.1
    report._regressor(image_31, factors)
    report._regressor(images, factor_39)
    assert len(fits) == 3 and len(list(tmp_path.glob("factor_regressor-*.pt"))) == 3


def outputs(regressor: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return regressor(images)


def test_the_report_trains_its_regressor_with_its_own_settings():
    """The report's regressor is ``fit_factor_regressor`` with the report's epochs, widths and seed (another seed
    gives another regressor), and the report's defaults are the function's (10 epochs, seed 0, widths 32-64-128)."""
    images, factors = small_data(16)
    own = CounterfactualReport(regressor_epochs=2, regressor_widths=[4, 8, 8], seed=3)._regressor(images, factors)
    same = fit_factor_regressor(images, factors, 2, seed=3, widths=(4, 8, 8))
    other_seed = fit_factor_regressor(images, factors, 2, seed=0, widths=(4, 8, 8))
    assert torch.equal(outputs(own, images), outputs(same, images))
    assert not torch.allclose(outputs(other_seed, images), outputs(same, images))
    default = CounterfactualReport()._regressor(images, factors)
    assert torch.equal(outputs(default, images), outputs(fit_factor_regressor(images, factors), images))


@pytest.mark.parametrize("count", [3, 5, 8])
def test_the_one_cycle_schedule_ends_at_the_last_step(count, monkeypatch):
    """Batches of 4: ceil(count / 4) steps an epoch, and the one-cycle schedule is sized to exactly the steps taken
    (fewer planned steps fail, more leave the learning rate high at the end)."""
    schedules, one_cycle = [], torch.optim.lr_scheduler.OneCycleLR

    class RecordedOneCycle(one_cycle):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            schedules.append(self)

    monkeypatch.setattr(torch.optim.lr_scheduler, "OneCycleLR", RecordedOneCycle)
    images, factors = small_data(count, size=16)
    fit_factor_regressor(images, factors, epochs=2, batch_size=4, widths=(4, 4, 4))
    (schedule,) = schedules
    assert schedule.total_steps == schedule.last_epoch == 2 * -(-count // 4)


def test_the_hydra_config_sets_the_constructors_defaults_except_its_stated_overrides():
    """conf/callbacks/counterfactual_report.yaml (installed as ``lit_robust.conf``) mirrors the code: every literal
    setting equals the default of a bare ``CounterfactualReport()``, except the overrides its comments give (a 4×
    cheaper regressor for the CPU, the project's cache folder)."""
    overrides = {"regressor_epochs", "regressor_widths", "cache_dir"}
    path = files("lit_robust.conf") / "callbacks" / "counterfactual_report.yaml"
    config = OmegaConf.create(path.read_text()).counterfactual_report
    assert config._target_ == "lit_robust.callbacks.CounterfactualReport"
    literal = {key: value for key, value in OmegaConf.to_container(config).items()
               if key != "_target_" and not OmegaConf.is_interpolation(config, key)}
    default = {key: getattr(CounterfactualReport(), key) for key in literal}
    default["regressor_widths"] = list(default["regressor_widths"])  # a tuple on the instance, a list in YAML
    assert {key: literal[key] for key in literal.keys() - overrides} == {key: default[key]
                                                                         for key in literal.keys() - overrides}
    assert overrides <= literal.keys() and all(literal[key] != default[key] for key in overrides)
