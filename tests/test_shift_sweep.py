"""Behaviour of the ``ShiftSweep`` callback (issue #29): what it logs is the accuracy on each shifted test set, and
on a trained model a stronger shift gives a lower accuracy."""
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from lit_robust import ImageClassifier
from lit_robust.callbacks.shift_sweep import ShiftSweep
from lit_robust.datamodules import DigitsDataModule, ShiftedDataModule
from lit_robust.datasets import stack_dataset

SWEEP = [{"name": "gaussian_noise", "severity": 1}, {"name": "gaussian_noise", "severity": 5},
         {"name": "rotate", "degrees": 10, "label": "rotate_10"}, {"name": "rotate", "degrees": 90, "label": "rotate_90"}]


def test_logged_accuracies_are_those_of_the_shifted_sets_and_fall_with_severity(tmp_path):
    """Train a small CNN on clean 8×8 digits, ``trainer.test`` with ``ShiftSweep`` over a sweep of two noise
    severities and two rotations. Each logged ``shift/<name>/acc`` must equal the accuracy computed here directly
    on ``shifted_test_datasets()[name]``, and the stronger shift of each pair must give the lower accuracy (computed
    here, the weaker one on the same model as reference). Catches a callback evaluating the clean test set for every
    shift (identity), random/constant values, and names paired with the wrong sets (shown failing with
    ``shifted_test_datasets()`` replaced by the clean test split for every name, and with the names' order
    reversed)."""
    torch.manual_seed(0)
    datamodule = ShiftedDataModule(DigitsDataModule(source="sklearn8x8", batch_size=64, seed=0), sweep=SWEEP, seed=0)
    model = ImageClassifier(lr=3e-3, scheduler="none")
    trainer = L.Trainer(max_epochs=3, callbacks=[ShiftSweep()], accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=str(tmp_path))
    trainer.fit(model, datamodule=datamodule)
    logged = trainer.test(model, datamodule=datamodule, verbose=False)[0]
    model.eval()
    direct = {}
    with torch.no_grad():
        for name, dataset in datamodule.shifted_test_datasets().items():
            images, labels = stack_dataset(dataset)
            direct[name] = (model(images).argmax(-1) == labels).float().mean().item()
    assert set(direct) == {"gaussian_noise_severity1", "gaussian_noise_severity5", "rotate_10", "rotate_90"}
    for name, accuracy in direct.items():
        assert logged[f"shift/{name}/acc"] == pytest.approx(accuracy, abs=1e-6), name
    assert direct["gaussian_noise_severity5"] < direct["gaussian_noise_severity1"]
    assert direct["rotate_90"] < direct["rotate_10"]


class DictItems(torch.utils.data.Dataset):
    """Items as dicts under names the contract does not guess (``pixels``, ``digit``)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"pixels": self.images[i], "digit": self.labels[i]}


class DictShifts(L.LightningDataModule):
    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.sets = {name: DictItems(torch.randn(40, 1, 4, 4, generator=generator), torch.randint(3, (40,)))
                     for name in ("mild", "strong")}

    def test_dataloader(self):
        return torch.utils.data.DataLoader(self.sets["mild"], batch_size=16)

    def shifted_test_datasets(self) -> dict:
        return self.sets


class LinearNet(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def test_step(self, batch, batch_idx):
        return None


def test_dict_items_are_read_under_the_given_item_keys():
    """A DataModule whose items are dicts under ``pixels``/``digit``: with ``item_keys`` the sweep logs each set's
    accuracy computed here; without it the callback refuses the items naming ``item_keys``. Catches a ShiftSweep that
    drops ``item_keys`` before the contract's item format."""
    torch.manual_seed(0)
    model, datamodule = LinearNet(), DictShifts()
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[ShiftSweep(item_keys=("pixels", "digit"), batch_size=7)])
    logged = trainer.test(model, datamodule=datamodule, verbose=False)[0]
    with torch.no_grad():
        for name, items in datamodule.sets.items():
            accuracy = (model(items.images).argmax(-1) == items.labels).float().mean().item()
            assert logged[f"shift/{name}/acc"] == pytest.approx(accuracy, abs=1e-6), name
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[ShiftSweep()])
    with pytest.raises(KeyError, match="item_keys"):
        trainer.test(model, datamodule=datamodule, verbose=False)


def test_a_datamodule_without_a_sweep_is_refused_at_test_setup_naming_the_wrapper():
    """Testing without ``shifted_test_datasets()`` is refused before any batch, naming the DataModule and the fix;
    fitting with it is not."""
    trainer = SimpleNamespace(datamodule=DigitsDataModule(source="sklearn8x8"))
    ShiftSweep().setup(trainer, None, "fit")
    with pytest.raises(RuntimeError, match=r"got DigitsDataModule: wrap the data in lit_robust\.datamodules\."
                                           r"ShiftedDataModule\(base, sweep=\[\.\.\.\]\) or add that method"):
        ShiftSweep().setup(trainer, None, "test")
