"""Lightning's overhead on a training epoch: ``Trainer.fit`` of the digits classifier vs a bare PyTorch loop.

    python benchmarks/bench_lightning.py [--epochs 1] [--repeats 3] [--rounds 2] [--out docs/records]

Same model class and recipe (``digits_classifier``: small CNN, AdamW 2e-3, random shift 2, batch 128), same
in-memory mnist5k training images, same seed. The bare loop is what a careful user writes: the model's own
augmentation, forward, cross-entropy, ``zero_grad(set_to_none=True)``, backward, step, with no logging, no
validation and no checkpoints; ``Trainer.fit`` runs with validation, checkpointing and logging off too, so the
ratio is the cost of the Lightning loop itself (target: fit ≤ 1.10× the bare loop). The cases take turns
(``benchmarks/timing.py``); ``--rounds`` repeats the whole comparison back to back, and ``--out`` writes the table
record ``bench_lightning.json``. Not part of CI.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from records import TableRecord
from timing import interleaved, print_table, write_ratio_record
from lit_robust import ImageClassifier
from lit_robust.datamodules import DigitsDataModule

RECIPE = dict(backbone="small_cnn", max_shift=2, lr=2e-3, scheduler="none")

# what the numbers measure: a commit changing one of these makes the record stale (render_results.py --strict)
DEPENDS_ON = ["lit_robust/models/classifier.py",
              "lit_robust/models/nets.py",
              "datamodules/digits.py"]


def loader(images: torch.Tensor, labels: torch.Tensor, batch: int) -> DataLoader:
    return DataLoader(TensorDataset(images, labels), batch_size=batch, shuffle=True,
                      generator=torch.Generator().manual_seed(0))


def bare_epochs(images, labels, batch: int, epochs: int) -> None:
    torch.manual_seed(0)
    model = ImageClassifier(**RECIPE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=model.hparams.lr, weight_decay=model.hparams.weight_decay)
    model.train()
    for _ in range(epochs):
        for x, y in loader(images, labels, batch):
            loss = F.cross_entropy(model(model.augment(x)), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


def lightning_epochs(images, labels, batch: int, epochs: int) -> None:
    torch.manual_seed(0)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0)
    trainer.fit(ImageClassifier(**RECIPE), train_dataloaders=loader(images, labels, batch))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="whole comparisons back to back")
    parser.add_argument("--out", type=Path, default=None, help="write the record bench_lightning.json here")
    args = parser.parse_args()
    record = TableRecord("bench_lightning", depends_on=DEPENDS_ON,
                         title="Lightning's overhead: Trainer.fit vs a bare loop (issue 34)")
    datamodule = DigitsDataModule(source="mnist5k", seed=0)
    datamodule.setup("fit")
    images, labels = datamodule.train_dataset.images, datamodule.train_dataset.targets
    rounds = []
    for _ in range(args.rounds):
        timings = interleaved({"bare loop": lambda: bare_epochs(images, labels, args.batch, args.epochs),
                               "Trainer.fit": lambda: lightning_epochs(images, labels, args.batch, args.epochs)},
                              repeats=args.repeats)
        print_table(timings, reference="bare loop", work=len(images) * args.epochs, unit="images")
        print(f"Trainer.fit / bare loop time: {timings['Trainer.fit'].best / timings['bare loop'].best:.3f} "
              f"(target ≤ 1.10)")
        rounds.append(timings)
    if args.out:
        write_ratio_record(record, args.out, rounds, "bare loop",
                           {**vars(args), "out": str(args.out), "images": len(images), "recipe": RECIPE})


if __name__ == "__main__":
    main()
