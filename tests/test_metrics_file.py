"""``MetricsFile``: one run's numbers in ``metrics.json`` — an earlier run's file removed at the run's start, fit-end,
validate and test numbers merged, keys merged by another writer kept."""
import json
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from lit_robust.callbacks import MetricsFile
from lit_robust.storage.json_files import update_metrics_file


class LoggingNet(L.LightningModule):
    """A linear model that logs a loss per stage, so each stage's keys can be told apart in the file."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(4, 1)

    def loss(self, batch):
        return self.net(batch[0]).pow(2).mean()

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.loss(batch))

    def test_step(self, batch, batch_idx):
        self.log("test/loss", self.loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader():
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=4)


def trainer(callback: MetricsFile) -> L.Trainer:
    return L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])


def test_one_run_merges_fit_validate_and_test_and_drops_an_earlier_runs_file(tmp_path):
    """A stale ``metrics.json`` is removed at the run's first setup only; fit writes its final train and validation
    numbers, ``validate`` and ``test`` (each a later call with the same callback, the same run) merge theirs, and a
    key merged by another writer between them stays. Catches a file kept across runs, a file removed again at every
    stage (the fit numbers lost), writes skipped or overwriting instead of merging, and values other than logged."""
    torch.manual_seed(0)
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"stale/acc": 0.5}))
    callback, model = MetricsFile(str(tmp_path)), LoggingNet()
    fit = trainer(callback)
    fit.fit(model, loader(), loader())
    after_fit = json.loads(path.read_text())
    assert set(after_fit) == {"train/loss", "val/loss"}
    assert after_fit["val/loss"] == pytest.approx(fit.callback_metrics["val/loss"].item())
    update_metrics_file(path, {"report/score": 0.25})
    validate = trainer(callback)
    validate.validate(model, loader(), verbose=False)
    assert json.loads(path.read_text())["val/loss"] == pytest.approx(validate.callback_metrics["val/loss"].item())
    test = trainer(callback)
    test.test(model, loader(), verbose=False)
    written = json.loads(path.read_text())
    assert set(written) == {"train/loss", "val/loss", "report/score", "test/loss"}
    assert written["test/loss"] == pytest.approx(test.callback_metrics["test/loss"].item())
    assert written["train/loss"] == after_fit["train/loss"] and written["report/score"] == 0.25


def test_only_global_rank_zero_writes_and_never_during_fits_validation_or_sanity_check(tmp_path):
    """Another rank, the sanity check and the validation inside fit (fit-end writes its final numbers) write nothing;
    rank zero writes after a stand-alone validation. Catches writes from every rank (two writers of one file) and
    per-epoch writes."""
    callback = MetricsFile(str(tmp_path))

    def trainer(fn="validate", is_global_zero=True, sanity_checking=False):
        return SimpleNamespace(state=SimpleNamespace(fn=fn), is_global_zero=is_global_zero,
                               sanity_checking=sanity_checking, callback_metrics={"val/loss": torch.tensor(0.5)})

    callback.on_validation_end(trainer(is_global_zero=False), None)
    callback.on_test_end(trainer(is_global_zero=False), None)
    callback.on_validation_end(trainer(sanity_checking=True), None)
    callback.on_validation_end(trainer(fn="fit"), None)
    assert not (tmp_path / "metrics.json").exists()
    callback.on_validation_end(trainer(), None)
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"val/loss": 0.5}
