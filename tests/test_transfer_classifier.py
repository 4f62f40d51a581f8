import lightning as L
import torch

from lit_robust import TransferClassifier
from lit_robust.datamodules import DigitsDataModule, PoisonedDataModule
from lit_robust.poisons.victims import linear_probe


def test_linear_transfer_victim_starts_from_crafting_extractor_and_trains_only_the_head(tmp_path):
    dm = PoisonedDataModule(DigitsDataModule(source="sklearn8x8", batch_size=128), attack="bullseye_polytope",
                            params=dict(steps=2, surrogate_epochs=1, budget=0.02), cache_dir=str(tmp_path),
                            progress=False)
    model = TransferClassifier(mode="linear", num_classes=10, in_chans=1, lr=1e-2, scheduler="none")
    trainer = L.Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    extractor = dm.poisons.tensors["extractor_state"]
    state = model.state_dict()
    frozen = [k for k in extractor if k.startswith("net.features")]
    assert frozen and all(torch.equal(state[k], extractor[k]) for k in frozen)  # weights and BN statistics kept
    assert not torch.equal(state["net.head.1.weight"], extractor["net.head.1.weight"])


def test_linear_probe_fits_separable_features():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(200, 5, generator=g)
    labels = (features[:, 0] > 0).long()
    head = linear_probe(features, labels, 2, steps=200)
    assert (head(features).argmax(-1) == labels).float().mean() > 0.95
