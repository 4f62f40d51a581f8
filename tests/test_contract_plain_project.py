"""``ShiftSweep`` and ``PoisonMetrics`` in a Lightning project written the usual way (``examples/plain_lightning``'s
``LitClassifier`` and ``MNISTDataModule``: splits in ``mnist_train`` / ``mnist_test``, dict items, ``Normalize`` in
the loader), with the project's own sweep and poisoned views: the logged numbers are those computed here by hand,
reach ``metrics.json`` through ``MetricsFile``, and two gloo ranks give the one-process numbers."""
from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.distributed as dist
from conftest import REPO
from gloo_ranks import run_forked_ranks
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(REPO / "examples" / "plain_lightning"))

from project import MNIST_MEAN, MNIST_STD, LitClassifier, MNISTDataModule  # noqa: E402

from lit_robust.callbacks import LatentAugmentationGrid, MetricsFile, PoisonMetrics, ShiftSweep  # noqa: E402
from lit_robust.callbacks.contract import ItemFormat  # noqa: E402

stack_dataset = ItemFormat().stack  # (images, targets) of tuple or dict items

WHITE = (1.0 - MNIST_MEAN[0]) / MNIST_STD[0]  # a white pixel in the loader's normalised space
TARGET = 7


class SweptMNIST(MNISTDataModule):
    """The project's DataModule with its own sweep and poisoned views: the test split mirrored and upside down; a
    3×3 white corner trigger (× multiplier) on the test images of other classes than ``TARGET``."""

    poisons = SimpleNamespace(trigger={"corner": WHITE}, target_class=TARGET, target_index=None)

    def __init__(self):
        super().__init__(dict_items=True, eval_size=96)

    def shifted_test_datasets(self) -> dict[str, TensorDataset]:
        images, labels = stack_dataset(self.mnist_test)
        return {"mirrored": TensorDataset(images.flip(-1), labels),
                "upside_down": TensorDataset(images.flip(-2), labels)}

    def triggered_test_dataset(self, multiplier: float) -> TensorDataset:
        images, labels = stack_dataset(self.mnist_test)
        keep = labels != TARGET
        images = images[keep].clone()
        images[..., -4:-1, -4:-1] = WHITE * multiplier
        return TensorDataset(images, labels[keep])

    def target_dataset(self):
        raise AssertionError("no targeted poison here: PoisonMetrics must not ask for it")


@pytest.fixture(scope="module")
def trained() -> tuple[LitClassifier, SweptMNIST]:
    L.seed_everything(0)
    model, data = LitClassifier(), SweptMNIST()
    L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False).fit(model, datamodule=data)
    data.setup("test")
    return model.eval(), data


def accuracy(model, dataset, target: int | None = None) -> float:
    images, labels = stack_dataset(dataset)
    with torch.no_grad():
        predictions = model(images).argmax(-1)
    return (predictions == (labels if target is None else target)).float().mean().item()


def test_logged_numbers_are_the_direct_ones_and_reach_metrics_json(tmp_path, trained):
    """Catches a sweep or poison view scored on the clean test split (the mirrored, upside-down and triggered
    accuracies differ from it here), a wrong target class, and numbers that bypass the loggers."""
    model, data = trained
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ShiftSweep(batch_size=40), PoisonMetrics(multipliers=(1,), batch_size=40),
                                   MetricsFile(str(tmp_path))])
    logged = trainer.test(model, datamodule=data, verbose=False)[0]
    shifted, triggered = data.shifted_test_datasets(), data.triggered_test_dataset(1.0)
    direct = {"shift/mirrored/acc": accuracy(model, shifted["mirrored"]),
              "shift/upside_down/acc": accuracy(model, shifted["upside_down"]),
              "poison/natural_acc": accuracy(model, data.mnist_test),
              "poison/asr_x1": accuracy(model, triggered, TARGET), "poison/ra_x1": accuracy(model, triggered)}
    assert len(set(direct.values())) == len(direct)  # the views are told apart
    assert {key: logged[key] for key in direct} == pytest.approx(direct, abs=1e-6)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert {key: written[key] for key in direct} == pytest.approx(direct, abs=1e-6)
    assert "poison/target_success" not in logged
    assert "poison/bias_asr_x1" not in logged  # the project's own trigger format: no Eq. 7.1 from it


def test_a_project_without_the_views_is_refused_at_setup_naming_them(trained):
    model, _ = trained
    for callback, error, needs in ((ShiftSweep(), RuntimeError, "shifted_test_datasets"),
                                   (PoisonMetrics(), RuntimeError, "triggered_test_dataset"),
                                   (LatentAugmentationGrid(), TypeError, "latent_augment")):
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[callback])
        with pytest.raises(error, match=needs):
            trainer.test(model, datamodule=MNISTDataModule(), verbose=False)


def _fake_trainer(rank: int, world: int, data: SweptMNIST) -> SimpleNamespace:
    """The trainer attributes the callbacks read (contract: loaders, ranks, root device)."""
    return SimpleNamespace(world_size=world, global_rank=rank, is_global_zero=rank == 0, datamodule=data,
                           strategy=SimpleNamespace(root_device=torch.device("cpu")), val_dataloaders=None,
                           test_dataloaders=DataLoader(data.mnist_test))


def _evaluate(trainer, model) -> dict[str, float]:
    results = {}
    for callback in (ShiftSweep(batch_size=40), PoisonMetrics(multipliers=(1, 3), batch_size=40)):
        results.update({key: float(value) for key, value in callback.evaluate(trainer, model).items()})
    return results


def _rank(rank: int, world: int, port: int, root, model, data) -> None:
    torch.set_num_threads(1)  # a forked child must not wait on the parent's OpenMP threads
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.save(_evaluate(_fake_trainer(rank, world, data), model), root / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_give_the_single_process_numbers(tmp_path, trained):
    """96 test images in batches of 40: rank 0 takes batches 0 and 2 (40 + 16 images), rank 1 batch 1; a callback
    that scored only its own share, or gathered out of order, differs from one process."""
    model, data = trained
    single = _evaluate(_fake_trainer(0, 1, data), model)
    run_forked_ranks(_rank, 2, tmp_path, model, data)
    for rank in (0, 1):
        assert torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) == pytest.approx(single, abs=1e-7)
