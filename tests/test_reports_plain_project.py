"""The rank-zero reports in a Lightning project written the usual way: ``ShiftRobustnessReport`` and
``AdversarialRobustnessReport`` on ``examples/plain_lightning``'s ``MNISTDataModule`` (splits in ``mnist_train`` /
``mnist_test``, ``Normalize`` in the loader) with the project's classifier given the two methods they call;
``CounterfactualReport`` on a user's scene DataModule (dict items, ``Normalize``) with an editor model. The logged
numbers are those computed here by hand in [0, 1] pixels, a plain model is refused at setup naming what it lacks, and
two gloo ranks log the one-process numbers on every rank while only rank zero writes the plots."""
from __future__ import annotations

import json
import os
import sys

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO
from gloo_ranks import run_forked_ranks
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

sys.path.insert(0, str(REPO / "examples" / "plain_lightning"))

from project import MNIST_MEAN, MNIST_STD, LitClassifier, MNISTDataModule  # noqa: E402

from lit_robust import ImageClassifier  # noqa: E402
from lit_robust.callbacks import (AdversarialRobustnessReport, CounterfactualReport, MetricsFile,  # noqa: E402
                                  ShiftRobustnessReport, counterfactual_report)
from lit_robust.callbacks.contract import ItemFormat  # noqa: E402
from lit_robust.functional.attacks import fgsm  # noqa: E402
from lit_robust.functional.shifts import translate  # noqa: E402
from lit_robust.storage.cache import load_verified  # noqa: E402

MNIST = (MNIST_MEAN, MNIST_STD)
normalize = transforms.Normalize(*MNIST)
QUIET = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
             enable_checkpointing=False)
BASELINES = {"cnn": {"backbone": "small_cnn", "backbone_kwargs": {"widths": (8, 16, 16)}, "max_epochs": 1}}


class AdaptableClassifier(LitClassifier):
    """The project's classifier with what the robustness reports call: class log-probabilities, and a copy adapted
    to unlabelled test images (their prediction entropy lowered while still fitting train digits; full-batch Adam, so
    the same inputs give the same copy)."""

    def predict_log_probs(self, x: torch.Tensor, num_samples: int | None = None) -> torch.Tensor:
        return F.log_softmax(self(x), -1)

    def fine_tuned_copy(self, x_test: torch.Tensor, x_train: torch.Tensor, y_train: torch.Tensor,
                        steps: int = 3) -> "AdaptableClassifier":
        copy = type(self)(**self.hparams)
        copy.load_state_dict(self.state_dict())
        optimizer = torch.optim.Adam(copy.parameters(), lr=1e-3)
        for _ in range(steps):
            log_probs = F.log_softmax(copy(x_test), -1)
            loss = F.cross_entropy(copy(x_train[:128]), y_train[:128]) - (log_probs.exp() * log_probs).sum(-1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return copy.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, as each gloo rank runs: the one-process numbers are computed by the same kernels (and on
    a shared 2-core machine, two spinning OpenMP threads are slower than one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained() -> tuple[AdaptableClassifier, MNISTDataModule]:
    L.seed_everything(0)
    model, data = AdaptableClassifier(), MNISTDataModule()
    L.Trainer(max_epochs=2, **QUIET).fit(model, datamodule=data)
    data.setup("test")
    return model.eval(), data


def unit_images(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """The split's images in [0, 1] pixels (``Normalize`` undone) and labels, in the reports' seed-0 order."""
    images, labels = ItemFormat().stack(dataset)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    return (images * MNIST_STD[0] + MNIST_MEAN[0])[order], labels[order]


def accuracy(model, unit: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(normalize(unit)).argmax(-1) == labels).float().mean().item()


def shift_report(**options) -> ShiftRobustnessReport:
    return ShiftRobustnessReport(shifts=[0, 3, 6], directions=["vertical"], ft_fraction=0.2, eval_size=60,
                                 batch_size=60, normalization=MNIST, **options)


def adversarial_report(**options) -> AdversarialRobustnessReport:
    return AdversarialRobustnessReport(epsilons=[0.05, 0.15], attacks=["fgsm"], eval_size=60, batch_size=60,
                                       ft_size=20, normalization=MNIST, **options)


def test_shift_report_logs_the_accuracies_of_digits_shifted_in_pixel_space(tmp_path, trained):
    """The report on the user's normalising DataModule logs, for the model, its fine-tuned copy and a baseline
    trained on that DataModule, the accuracies computed here on the digits shifted in [0, 1] pixels (black fill) and
    normalised again. Catches shifts of normalised images (grey fill), a baseline scored on unnormalised digits,
    other images than the report's (after its 20 % fine-tuning pool), a fine-tuned copy not used, and stubs."""
    model, data = trained
    report = shift_report(baselines=BASELINES, cache_dir=str(tmp_path / "cache"))
    trainer = L.Trainer(default_root_dir=tmp_path, callbacks=[report, MetricsFile(str(tmp_path))], **QUIET)
    logged = trainer.test(model, datamodule=data, verbose=False)[0]

    images, labels = unit_images(data.mnist_test)
    pool, eval_x, eval_y = images[:40], images[40:100], labels[40:100]
    baseline = ImageClassifier(**{k: v for k, v in BASELINES["cnn"].items() if k != "max_epochs"})
    baseline.load_state_dict(load_verified(next((tmp_path / "cache").glob("cnn-*.pt"))))
    train_x, train_y = ItemFormat().stack(data.mnist_train)
    tuned = model.fine_tuned_copy(normalize(torch.cat([translate(pool[:20], dy=3), translate(pool[20:], dy=6)])),
                                  train_x, train_y)
    direct = {"shift/vertical/cama_ft_clean": accuracy(tuned, eval_x, eval_y)}
    for s in (0, 3, 6):
        direct |= {f"shift/vertical_{s}px/{name}": accuracy(predictor, translate(eval_x, dy=s), eval_y)
                   for name, predictor in (("cama", model), ("cnn", baseline.eval()))}
        direct[f"shift/vertical_{s}px/cama_ft"] = accuracy(tuned if s else model, translate(eval_x, dy=s), eval_y)
    assert {key: logged[key] for key in direct} == pytest.approx(direct, abs=1e-6)
    assert direct["shift/vertical_6px/cama"] < direct["shift/vertical_0px/cama"] - 0.2  # a 6-pixel shift hurts
    assert logged["shift/eval_images"] == 60 and logged["shift/vertical/ft_images"] == 40
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert {key: written[key] for key in direct} == pytest.approx(direct, abs=1e-6)
    assert (tmp_path / "shift_accuracy.png").stat().st_size > 1000


def test_adversarial_report_attacks_in_pixel_space_through_the_users_normalize(tmp_path, trained):
    """FGSM at ε in [0, 1] pixels on the model as the loader feeds it (normalised): the logged accuracies are those
    of the attack computed here, fall with ε, and the copy fine-tuned on 20 other attacked digits is scored on the
    same attacked digits. Catches ε applied to normalised pixels (2.3× weaker), an attack without the gradient, a
    model handed [0, 1] images, and stubs."""
    model, data = trained
    report = adversarial_report()
    logged = L.Trainer(default_root_dir=tmp_path, callbacks=[report], **QUIET).test(model, datamodule=data,
                                                                                   verbose=False)[0]
    images, labels = unit_images(data.mnist_test)
    x, y, ft_x, ft_y = images[:60], labels[:60], images[60:80], labels[60:80]
    loss = lambda unit, target: F.cross_entropy(model(normalize(unit)), target, reduction="none")  # noqa: E731
    train = ItemFormat().stack(data.mnist_train)
    direct = {"adv/clean/cama": accuracy(model, x, y)}
    for eps in (0.05, 0.15):
        tuned = model.fine_tuned_copy(normalize(fgsm(lambda v: loss(v, ft_y), ft_x, eps)), *train)
        attacked = fgsm(lambda v: loss(v, y), x, eps)
        direct |= {f"adv/fgsm_eps{eps:g}/cama": accuracy(model, attacked, y),
                   f"adv/fgsm_eps{eps:g}/cama_ft": accuracy(tuned, attacked, y)}
    assert {key: logged[key] for key in direct} == pytest.approx(direct, abs=1e-6)
    assert direct["adv/clean/cama"] > direct["adv/fgsm_eps0.05/cama"] > direct["adv/fgsm_eps0.15/cama"]
    assert (tmp_path / "adversarial_accuracy.png").stat().st_size > 1000


# ---- a user's scenes with known factors, for the counterfactual report -----------------------------------------------
SCENES = ((0.5,), (0.25,))  # the scenes' Normalize(mean, std)
FACTORS = ("brightness", "column")


def render(factors: torch.Tensor) -> torch.Tensor:
    """16×16 scenes in [0, 1]: a 3-row square of the given brightness whose columns' centre of mass is column + 1
    (a fractional column blends the edge columns)."""
    images = torch.zeros(len(factors), 1, 16, 16)
    for image, (brightness, column) in zip(images, factors.tolist()):
        left, fraction = int(column), column - int(column)
        image[0, 6:9, left:left + 4] = brightness * torch.tensor([1 - fraction, 1.0, 1.0, fraction])
    return images


def factors_of(images: torch.Tensor) -> torch.Tensor:
    """(brightness, column) of [0, 1] scenes: total ink / 9, and the columns' centre of mass − 1."""
    ink = images.sum((1, 2))  # (N, 16) per column
    columns = torch.arange(16, dtype=images.dtype, device=images.device)
    return torch.stack([ink.sum(1) / 9, (ink * columns).sum(1) / ink.sum(1) - 1], 1)


class Scenes(Dataset):
    def __init__(self, factors: torch.Tensor):
        self.factors, self.transform = factors, transforms.Normalize(*SCENES)

    def __len__(self) -> int:
        return len(self.factors)

    def __getitem__(self, index: int):
        return {"image": self.transform(render(self.factors[index:index + 1])[0]), "factors": self.factors[index]}


class ScenesDataModule(L.LightningDataModule):
    """A user's DataModule: splits in ``scenes_train`` / ``scenes_test``, dict items, ``Normalize`` in the loader."""

    def __init__(self, size: int = 64):
        super().__init__()
        self.size, self.scenes_train, self.scenes_test = size, None, None

    def setup(self, stage: str):
        self.scenes_train, self.scenes_test = Scenes(self.random_factors(0)), Scenes(self.random_factors(1))

    def random_factors(self, seed: int) -> torch.Tensor:
        """Brightness uniform in [0.3, 1], column in [1, 11]."""
        uniform = torch.rand(self.size, 2, generator=torch.Generator().manual_seed(seed))
        return uniform * torch.tensor([0.7, 10.0]) + torch.tensor([0.3, 1.0])

    def train_dataloader(self):
        return DataLoader(self.scenes_train, batch_size=16, shuffle=True)

    def test_dataloader(self):
        return DataLoader(self.scenes_test, batch_size=16)


DIMMING = 0.8  # the editor's known flaw: do(column) also dims the square


class SceneEditor(L.LightningModule):
    """A user's counterfactual model of the loader's (normalised) scenes: it reconstructs a scene as it is, and
    re-renders it under do(factor = value) — dimming the square by ``DIMMING`` when it moves it."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Linear(1, 1)  # a LightningModule with parameters, as a user's is

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    def intervene(self, x: torch.Tensor, factor: str, value: float) -> torch.Tensor:
        factors = factors_of(x * SCENES[1][0] + SCENES[0][0])
        factors[:, FACTORS.index(factor)] = value
        if factor == "column":
            factors[:, 0] *= DIMMING
        return transforms.Normalize(*SCENES)(render(factors))

    def test_step(self, batch, batch_idx):
        self.log("test/ink", batch["image"].mean())


class ExactReader(torch.nn.Module):
    """The factor regressor without error on [0, 1] scenes."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return factors_of(images)


def counterfactual(**options) -> CounterfactualReport:
    return CounterfactualReport(factors=FACTORS, item_keys=("image", "factors"), normalization=SCENES, num_values=3,
                                eval_size=32, **options)


def test_counterfactual_report_measures_the_users_editor_in_pixel_space(tmp_path, monkeypatch):
    """With the regressor replaced by an exact reader of [0, 1] scenes: the reader's error on real test scenes is 0,
    every set factor is tracked exactly, do(brightness) leaves the column, and do(column) changes the brightness by
    the editor's dimming: mean(0.2·brightness) / its range. Catches the regressor fed normalised scenes (error and
    changes ≠ 0), the editor handed [0, 1] scenes (it reads wrong factors), and constant numbers."""
    monkeypatch.setattr(counterfactual_report, "fit_factor_regressor", lambda *args, **kwargs: ExactReader())
    data = ScenesDataModule()
    logged = L.Trainer(default_root_dir=tmp_path, callbacks=[counterfactual()], **QUIET).test(
        SceneEditor(), datamodule=data, verbose=False)[0]
    train, test = data.scenes_train.factors, data.scenes_test.factors[:32]
    span = train.max(0).values - train.min(0).values
    dimmed = ((1 - DIMMING) * test[:, 0]).mean().item() / span[0].item()
    expected = {"cf/regressor_mae/brightness": 0.0, "cf/regressor_mae/column": 0.0,
                "cf/do_brightness/brightness_tracking": 0.0, "cf/do_brightness/column_change": 0.0,
                "cf/do_column/column_tracking": 0.0, "cf/do_column/brightness_change": dimmed}
    assert {key: logged[key] for key in expected} == pytest.approx(expected, abs=1e-5)
    assert dimmed > 0.1
    assert (tmp_path / "counterfactual_grid.png").stat().st_size > 1000


@pytest.mark.parametrize("report, needs", [(shift_report(), "fine_tuned_copy"),
                                           (adversarial_report(), "predict_log_probs.*fine_tuned_copy"),
                                           (counterfactual(), "reconstruct.*intervene")])
def test_a_plain_model_is_refused_at_setup_naming_the_methods_it_lacks(report, needs, monkeypatch):
    monkeypatch.setattr(report, "run_report", lambda *args: pytest.fail("the report ran"))
    trainer = L.Trainer(callbacks=[report], **QUIET)
    with pytest.raises(TypeError, match=f"LitClassifier does not define: {needs}"):
        trainer.test(LitClassifier(), datamodule=MNISTDataModule(), verbose=False)


def test_baselines_on_a_dict_item_train_split_are_refused_before_training(trained):
    """The baselines (``ImageClassifier``) read ``(image, label)`` batches: dict items are refused naming the keys,
    not met by a KeyError inside the nested training."""
    model, _ = trained
    report = shift_report(baselines=BASELINES)
    with pytest.raises(TypeError, match=r"items are dicts with keys \['image', 'label'\].*baselines=\{\}"):
        L.Trainer(callbacks=[report], **QUIET).test(model, datamodule=MNISTDataModule(dict_items=True), verbose=False)


# ---- 2 gloo ranks ---------------------------------------------------------------------------------------------------
def run_reports(model, data, callbacks, root, world: int = 1) -> dict[str, float]:
    """``trainer.test`` with ``callbacks`` on ``world`` CPU ranks (this process is one of them), output under
    ``root``; the report numbers logged on this rank."""
    trainer = L.Trainer(default_root_dir=root, devices=world, strategy="ddp" if world > 1 else "auto",
                        callbacks=callbacks, **QUIET)
    logged = trainer.test(model, datamodule=data, verbose=False)[0]
    return {key: value for key, value in logged.items() if key.split("/")[0] in ("shift", "adv", "cf")}


def _rank(rank: int, world: int, port: int, root, model, data, make_callbacks) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")  # as a launcher sets them: Lightning joins, not spawns
    torch.set_num_threads(1)  # a forked child must not wait on the parent's OpenMP threads
    torch.save(run_reports(model, data, make_callbacks(), root / f"rank{rank}", world), root / f"rank{rank}.pt")


def assert_two_ranks_log_the_single_process_numbers(root, model, data, make_callbacks, plots) -> None:
    """The reports on one process and on two gloo ranks: the same numbers logged on both ranks (rank 1 only receives
    them) — the runs are the same computation on rank zero, so they agree exactly — and the plots on rank zero
    only."""
    single = run_reports(model, data, make_callbacks(), root / "single")
    run_forked_ranks(_rank, 2, root, model, data, make_callbacks)
    for rank in (0, 1):
        assert torch.load(root / f"rank{rank}.pt", weights_only=True) == single, rank
    for plot in plots:
        assert (root / "single" / plot).exists() and (root / "rank0" / plot).exists()
        assert not (root / "rank1" / plot).exists()


def test_two_gloo_ranks_log_the_single_process_robustness_numbers(tmp_path, trained):
    model, data = trained
    assert_two_ranks_log_the_single_process_numbers(
        tmp_path, model, data, lambda: [shift_report(baselines=BASELINES), adversarial_report()],
        ["shift_accuracy.png", "adversarial_accuracy.png"])


def test_two_gloo_ranks_log_the_single_process_counterfactual_numbers(tmp_path):
    """With the factor regressor really trained (on rank zero, seeded)."""
    assert_two_ranks_log_the_single_process_numbers(
        tmp_path, SceneEditor(), ScenesDataModule(),
        lambda: [counterfactual(regressor_epochs=1, regressor_widths=(4, 8, 8))], ["counterfactual_grid.png"])
