import lightning as L
import pytest
import torch

from lit_robust import ImageClassifier, TransferClassifier
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


def _fit_transfer(mode: str, weights_path, root) -> tuple[TransferClassifier, float]:
    torch.manual_seed(1)
    datamodule = DigitsDataModule(source="sklearn8x8", batch_size=64, seed=0)
    model = TransferClassifier(mode=mode, weights_path=str(weights_path), lr=3e-3, scheduler="none")
    L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, default_root_dir=str(root)).fit(model,
                                                                                            datamodule=datamodule)
    images, labels = datamodule.test_dataset.images, datamodule.test_dataset.targets
    model.eval()
    with torch.no_grad():
        accuracy = (model(images).argmax(-1) == labels).float().mean().item()
    return model, accuracy


def test_finetune_trains_the_backbone_and_beats_the_frozen_random_features(tmp_path):
    """From the same randomly initialised extractor (``weights_path``), the same seed and the same 2 epochs:
    fine-tune mode changes every extractor weight and the head; linear mode leaves the extractor's weights and
    BatchNorm statistics bit-for-bit as loaded and changes only the head. The fine-tuned model's test accuracy must
    exceed that of the linear probe on the frozen random features (the reference, trained here). Catches a fine-tune
    mode that freezes the extractor (weights unchanged, accuracy = the frozen reference) and a linear mode that
    trains it (shown failing with ``mode == "linear"`` → ``mode in MODES`` and → ``False`` in ``setup``)."""
    torch.manual_seed(0)
    initial = {k: v.clone() for k, v in ImageClassifier().net.state_dict().items()}
    torch.save(initial, tmp_path / "random_extractor.pt")
    (linear, linear_acc), (finetuned, finetuned_acc) = (
        _fit_transfer(mode, tmp_path / "random_extractor.pt", tmp_path / mode) for mode in ("linear", "finetune"))
    extractor = [k for k, v in initial.items() if not k.startswith("head") and v.is_floating_point()]
    weights = [k for k in extractor if k.endswith("weight") and initial[k].dim() > 1]
    assert weights
    for name, model in (("linear", linear), ("finetune", finetuned)):
        state = model.net.state_dict()
        assert any(not torch.equal(state[k], initial[k]) for k in initial if k.startswith("head")), name
    assert all(torch.equal(linear.net.state_dict()[k], initial[k]) for k in extractor)
    assert all(not torch.equal(finetuned.net.state_dict()[k], initial[k]) for k in weights)
    assert finetuned_acc > linear_acc, (finetuned_acc, linear_acc)


def test_a_source_models_lightning_checkpoint_gives_its_features(tmp_path):
    """Robust-feature transfer (001 ch. 2) starts from a source run's checkpoint: an ``AdversarialClassifier``'s
    ``state_dict`` has its network under ``net.``. The transfer model's extractor equals the source's network
    exactly, and so do its features on the same images. Loading the whole module's keys into the bare network (no
    ``net.`` stripping) fails strict loading; ignoring the file leaves other features."""
    from lit_robust import AdversarialClassifier

    torch.manual_seed(0)
    kwargs = dict(backbone="small_cnn", backbone_kwargs={"widths": (4, 8)})
    source = AdversarialClassifier(eps=0.1, attack_steps=1, **kwargs)
    torch.save({"state_dict": source.state_dict(), "hyper_parameters": dict(source.hparams)}, tmp_path / "src.ckpt")
    torch.manual_seed(1)
    target = TransferClassifier(mode="linear", weights_path=str(tmp_path / "src.ckpt"), **kwargs)
    for key, value in source.net.state_dict().items():
        assert key.startswith("head.") or torch.equal(target.net.state_dict()[key], value), key
    images = torch.rand(4, 1, 28, 28)
    source.eval(), target.eval()
    with torch.no_grad():
        assert torch.equal(target.net.forward_features(images), source.net.forward_features(images))


@pytest.mark.parametrize("freeze_bn_stats", [True, False])
def test_fixed_feature_transfer_freezes_the_weights_and_moves_the_bn_statistics_only_when_asked(tmp_path,
                                                                                                freeze_bn_stats):
    """Fixed-feature transfer (mode=linear) for 2 SGD steps from a random extractor: the extractor's weights (convs
    and BatchNorm affines) stay as loaded either way and the head trains. Its BatchNorm running statistics stay too
    with ``freeze_bn_stats`` (BP's victim), and with ``freeze_bn_stats=False`` (Salman 2023 App. G.1.2) every
    BatchNorm layer's running mean moves and counts the 2 batches. The SGD optimiser holds the head alone, with the
    weight decay asked for. Catches the new mode freezing the statistics, the old one updating them, and the weight
    decay or the frozen parameters not reaching the optimiser as configured."""
    torch.manual_seed(0)
    initial = ImageClassifier(backbone_kwargs={"widths": (4, 8)}).net.state_dict()
    torch.save(initial, tmp_path / "extractor.pt")
    model = TransferClassifier(mode="linear", freeze_bn_stats=freeze_bn_stats,
                               weights_path=str(tmp_path / "extractor.pt"), backbone_kwargs={"widths": (4, 8)},
                               optimizer="sgd", lr=0.1, weight_decay=0.05, scheduler="none")
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path))
    trainer.fit(model, datamodule=DigitsDataModule(source="sklearn8x8", batch_size=64))
    state = model.net.state_dict()
    statistics = [k for k in initial if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    weights = [k for k in initial if not k.startswith("head") and k not in statistics]
    assert len(statistics) == 12 and all(torch.equal(state[k], initial[k]) for k in weights)
    assert not torch.equal(state["head.1.weight"], initial["head.1.weight"])
    if freeze_bn_stats:
        assert all(torch.equal(state[k], initial[k]) for k in statistics)
    else:
        assert all(not torch.equal(state[k], initial[k]) for k in statistics if k.endswith("running_mean"))
        assert all(int(state[k]) == 2 for k in statistics if k.endswith("num_batches_tracked"))
    (group,) = trainer.optimizers[0].param_groups
    assert isinstance(trainer.optimizers[0], torch.optim.SGD) and group["weight_decay"] == 0.05
    assert {id(p) for p in group["params"]} == {id(p) for p in model.head().parameters()}


def test_a_source_with_another_number_of_classes_gives_its_extractor_and_a_new_head(tmp_path):
    """Bias transfer's target (the digits mod 5) starts from a 10-class source: every extractor tensor is the
    source's, the head has 5 outputs and its own initial values. Loading the whole source network strictly fails on
    the head's shape; ignoring the file leaves other features."""
    torch.manual_seed(0)
    source = ImageClassifier(backbone_kwargs={"widths": (4, 8)}, num_classes=10)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "source.ckpt")
    torch.manual_seed(1)
    fresh_head = TransferClassifier(backbone_kwargs={"widths": (4, 8)}, num_classes=5).net.head.state_dict()
    torch.manual_seed(1)
    target = TransferClassifier(weights_path=str(tmp_path / "source.ckpt"), backbone_kwargs={"widths": (4, 8)},
                                num_classes=5)
    assert target.head_keys() == ["head.1.weight", "head.1.bias"]
    for key, value in source.net.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(target.net.state_dict()[key], value), key
    assert all(torch.equal(target.net.head.state_dict()[k], v) for k, v in fresh_head.items())
    assert target.net.head[1].out_features == 5 and target.hparams.weights_path == str(tmp_path / "source.ckpt")
