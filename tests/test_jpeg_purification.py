"""JPEGPurification: the thesis' JPEG baseline is exactly a JPEG round trip of every training image (the same bytes
PIL's libjpeg gives), stronger at lower quality, and installs the compressed split the fit trains on."""
import io

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from lit_robust import ImageClassifier
from lit_robust.callbacks import JPEGPurification
from lit_robust.datamodules import DigitsDataModule


def pil_round_trip(image: torch.Tensor, quality: int) -> torch.Tensor:
    """One [0, 1] 1×H×W image through PIL's JPEG encoder and decoder, independently of torchvision."""
    buffer = io.BytesIO()
    Image.fromarray(image[0].mul(255).round().byte().numpy()).save(buffer, format="JPEG", quality=quality)
    return torch.from_numpy(np.array(Image.open(buffer))).float().div(255)[None]


def digits(n: int = 40) -> torch.Tensor:
    datamodule = DigitsDataModule(source="mnist5k", seed=0)
    datamodule.setup("fit")
    return datamodule.train_dataset.images[:n]


def test_chunk_is_the_jpeg_round_trip_and_stronger_at_lower_quality():
    images = digits()
    change = {}
    for quality in (25, 75, 95):
        out = JPEGPurification(quality=quality).purify_chunk(images, torch.arange(len(images)), None)
        assert torch.equal(out, torch.stack([pil_round_trip(image, quality) for image in images]))
        change[quality] = (out - images).abs().mean().item()
    assert change[25] > 1.5 * change[75] > 0 and change[75] > 1.5 * change[95] > 0


def test_fit_trains_on_the_compressed_split(tmp_path):
    callback = JPEGPurification(quality=50, chunk_size=300, cache_dir=str(tmp_path / "cache"), progress=False,
                                plots=False)
    datamodule = DigitsDataModule(source="sklearn8x8", batch_size=64, seed=0)
    trainer = L.Trainer(max_steps=1, callbacks=[callback], logger=False, enable_checkpointing=False,
                        limit_val_batches=0, enable_model_summary=False, enable_progress_bar=False,
                        default_root_dir=str(tmp_path / "run"))
    trainer.fit(ImageClassifier(), datamodule=datamodule)
    trained_on = trainer.train_dataloader.dataset
    clean = DigitsDataModule(source="sklearn8x8", seed=0)
    clean.setup("fit")
    expected = torch.stack([pil_round_trip(image, 50) for image in clean.train_dataset.images])
    assert torch.equal(trained_on.images, expected)
    assert torch.equal(trained_on[3][1], clean.train_dataset[3][1])


@pytest.mark.parametrize("quality", [0, 101])
def test_quality_outside_the_codec_range_is_refused(quality):
    with pytest.raises(ValueError, match=r"quality=.*\[1, 100\]"):
        JPEGPurification(quality=quality)
