"""train.py / evaluate.py end to end on the 8×8 digits: metrics.json, evaluation reproduces the test phase, resume
continues, and the 2-process ddp_cpu trainer gives the single-process numbers (padded duplicates not counted)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import read_metrics, run_script
from lit_robust import ImageClassifier
from lit_robust.datamodules import DigitsDataModule

# 189 validation images: odd, so Lightning's padded DistributedSampler would count one image twice on 2 ranks.
# fp32, as _direct_accuracy computes: under the experiment's bf16 (chosen on CPUs with native bf16) a near-tie image
# can change its argmax between the run's autocast and the fp32 check, which is precision, not gathering.
DATA = ["experiment=digits_classifier", "data=digits_8x8", "data.val_fraction=0.105", "data.batch_size=64",
        "trainer.precision=32-true"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("train")
    run_script("train.py", *DATA, "trainer.max_epochs=2", f"hydra.run.dir={run_dir}")
    return run_dir


def test_training_writes_metrics_config_and_checkpoints(trained_run):
    metrics = read_metrics(trained_run)
    assert {"test/acc", "val/acc", "train/loss"} <= set(metrics)
    assert metrics["test/acc"] > 0.5
    assert (trained_run / "config.yaml").exists()
    assert (trained_run / "checkpoints" / "best.ckpt").exists() and (trained_run / "checkpoints" / "last.ckpt").exists()


def test_evaluate_reproduces_the_test_phase(trained_run, tmp_path):
    run_script("evaluate.py", *DATA, f"ckpt_path={trained_run / 'checkpoints' / 'best.ckpt'}", f"hydra.run.dir={tmp_path}")
    assert read_metrics(tmp_path)["test/acc"] == pytest.approx(read_metrics(trained_run)["test/acc"], abs=1e-7)


def _direct_accuracy(checkpoint: Path, split: str) -> float:
    model = ImageClassifier.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    dm = DigitsDataModule(source="sklearn8x8", val_fraction=0.105)
    dm.setup()
    dataset = getattr(dm, f"{split}_dataset")
    assert len(dataset) % 2 == 1 or split == "test"
    with torch.no_grad():
        return (model(dataset.images).argmax(-1) == dataset.targets).float().mean().item()


def test_ddp_cpu_evaluation_equals_single_process_without_padding(trained_run, tmp_path):
    best = trained_run / "checkpoints" / "best.ckpt"
    run_script("evaluate.py", *DATA, f"ckpt_path={best}", "trainer=ddp_cpu", f"hydra.run.dir={tmp_path}")
    ddp = read_metrics(tmp_path)
    assert ddp["val/acc"] == pytest.approx(_direct_accuracy(best, "val"), abs=1e-6)
    assert ddp["test/acc"] == pytest.approx(read_metrics(trained_run)["test/acc"], abs=1e-6)


def test_resume_continues_where_it_stopped(trained_run, tmp_path):
    last = trained_run / "checkpoints" / "last.ckpt"
    before = torch.load(last, map_location="cpu", weights_only=True)
    run_script("train.py", *DATA, "trainer.max_epochs=3", f"ckpt_path={last}", f"hydra.run.dir={tmp_path}")
    after = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert after["epoch"] == before["epoch"] + 1
    assert after["global_step"] == before["global_step"] * 3 // 2
    # the resumed run did not redo epochs 0-1: their rows are the interrupted run's, carried over (CSVHistory)
    rows = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()
    earlier = (trained_run / "csv" / "metrics.csv").read_text().splitlines()
    carried = [row for row in earlier[1:] if row.split(",")[0] in ("0", "1")]
    assert rows[0] == earlier[0] and rows[1:len(carried) + 1] == carried
    assert {row.split(",")[0] for row in rows[len(carried) + 1:]} == {"2", "3"}  # 3: the test row


def test_ddp_cpu_training_logs_the_single_process_validation_accuracy(tmp_path):
    """The Hydra-relaunched 2-process fit (half the steps per epoch of one process, hence 3 epochs): its logged val/acc (gathered over both ranks) is the accuracy of the saved
    weights on each of the 189 validation images counted once."""
    run_script("train.py", *DATA, "trainer=ddp_cpu", "trainer.max_epochs=3", f"hydra.run.dir={tmp_path}")
    metrics = read_metrics(tmp_path)
    assert metrics["test/acc"] > 0.5
    assert metrics["val/acc"] == pytest.approx(_direct_accuracy(tmp_path / "checkpoints" / "last.ckpt", "val"), abs=1e-6)
