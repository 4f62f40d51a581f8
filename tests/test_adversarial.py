"""Adversarial training (``lit_robust.AdversarialClassifier``: PGD-AT, TRADES) and its evaluation callback
(``AdversarialEvaluation``), on tiny models and 8×8 images so the file runs in seconds."""
from __future__ import annotations

import json
import math
import socket
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lit_robust.callbacks import AdversarialEvaluation
from lit_robust.callbacks.adversarial_evaluation import masking_warnings
from lit_robust.datasets import TensorImageDataset
from lit_robust.functional.attacks import random_sign, robust_correct
from lit_robust.models.adversarial import AdversarialClassifier, trades_kl, trades_loss, warmed_up_eps
from lit_robust.models.classifier import ImageClassifier

TINY = dict(backbone="small_cnn", backbone_kwargs={"widths": (8,)}, in_chans=1)


def tiny_batch(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_trades_loss_matches_equation_5_on_a_hand_example():
    """Two classes: CE(f(x), y) = log(1 + e^(−2)) for logits (2, 0), y = 0; KL(p ‖ q) = Σ p log(p/q) with
    p = softmax(2, 0), q = softmax(0, 1). A flipped KL (q ‖ p), a missing β or a CE at x' all give other values."""
    clean, adv, y, beta = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([0]), 3.0
    p = [math.exp(2) / (math.exp(2) + 1), 1 / (math.exp(2) + 1)]
    q = [1 / (1 + math.e), math.e / (1 + math.e)]
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert trades_kl(clean, adv).item() == pytest.approx(kl, rel=1e-5)
    assert trades_loss(clean, adv, y, beta).item() == pytest.approx(math.log(1 + math.exp(-2)) + beta * kl, rel=1e-5)


def test_epsilon_warms_up_linearly_then_stays():
    assert [warmed_up_eps(0.3, e, 3) for e in range(5)] == pytest.approx([0.1, 0.2, 0.3, 0.3, 0.3])
    assert warmed_up_eps(0.3, 0, 0) == 0.3


def test_pgd_training_loss_is_the_loss_at_adversarial_inputs_and_leaves_batchnorm_alone():
    """The PGD-AT loss on a batch exceeds the clean loss and the loss under random ±ε noise (an identity or random
    'attack' does not); the attack's points lie in the ε-ball and [0, 1]; the attack leaves the BatchNorm running
    statistics as they were (eval mode during the attack) and the module back in train mode."""
    torch.manual_seed(0)
    model = AdversarialClassifier(method="pgd", eps=0.3, attack_steps=5, **TINY).train()
    x, y = tiny_batch()
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    adv = model.adversarial_inputs(x, lambda v: F.cross_entropy(model(v), y, reduction="none"), 0.3)
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())
    assert (adv - x).abs().max() <= 0.3 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():  # train mode, as the loss is computed
        clean = F.cross_entropy(model(x), y)
        noisy = F.cross_entropy(model(random_sign(x, 0.3, torch.Generator().manual_seed(0))), y)
    loss, _ = model.training_loss(x, y)
    assert loss > clean + 0.2 and loss > noisy + 0.2   # untrained: 2.9 vs 2.5


def test_trades_training_loss_adds_beta_times_an_attacked_kl():
    """TRADES' loss minus its clean cross-entropy is β·KL at the attacked point: positive, and above β·KL at random
    ±ε noise (a stub leaving x' ≈ x gives ≈ 0)."""
    torch.manual_seed(0)
    model = AdversarialClassifier(method="trades", eps=0.3, attack_steps=5, beta=6.0, **TINY).train()
    x, y = tiny_batch()
    torch.manual_seed(1)
    loss, logits = model.training_loss(x, y)
    boundary = loss - F.cross_entropy(logits, y)
    with torch.no_grad():
        noisy = 6.0 * trades_kl(model(x), model(random_sign(x, 0.3, torch.Generator().manual_seed(0)))).mean()
    assert boundary > 0 and boundary > noisy


def test_bad_settings_name_the_fix():
    with pytest.raises(ValueError, match="use one of"):
        AdversarialClassifier(method="fgsm", **TINY)
    with pytest.raises(ValueError, match="linf"):
        AdversarialClassifier(norm="l1", **TINY)
    with pytest.raises(ValueError, match="ImageClassifier"):
        AdversarialClassifier(eps=0.0, **TINY)


def test_masking_warnings_flag_a_rising_curve_and_accuracy_left_at_a_large_eps():
    assert masking_warnings({0.1: 0.8, 0.3: 0.5, 0.6: 0.0}, 0.6) == []
    assert len(masking_warnings({0.1: 0.5, 0.3: 0.7, 0.6: 0.3}, 0.6)) == 2


# ---- the callback ---------------------------------------------------------------------------------------------------
class TensorData(L.LightningDataModule):
    def __init__(self, dataset):
        super().__init__()
        self.test_dataset = dataset

    def test_dataloader(self):
        return DataLoader(self.test_dataset, batch_size=16)


def tiny_setup():
    torch.manual_seed(0)
    model = ImageClassifier(**TINY).eval()
    return model, TensorImageDataset(*tiny_batch(40, seed=2))


CALLBACK = dict(epsilons=[0.02, 0.5], pgd_steps=3, restarts=2, apgd_steps=4, num_targets=2, batch_size=16,
                num_images=36, seed=7)


def direct(model, dataset) -> dict[str, torch.Tensor]:
    """The callback's numbers computed by hand: 36 images drawn with seed 7 (in split order), batches of 16, batch b
    seeded 7·10⁶ + b."""
    columns = {}
    chosen = torch.randperm(40, generator=torch.Generator().manual_seed(7))[:36].sort().values
    for b, start in enumerate(range(0, 36, 16)):
        rows = chosen[start:start + 16]
        x, y = dataset.images[rows], dataset.targets[rows]
        for eps in CALLBACK["epsilons"]:
            correct = robust_correct(model, x, y, eps, pgd_steps=3, restarts=2, apgd_steps=4, num_targets=2,
                                     generator=torch.Generator().manual_seed(7 * 10**6 + b))
            columns.setdefault("clean", []).append(correct["clean"])
            for attack in ("pgd", "apgd-ce", "apgd-t"):
                columns.setdefault(f"eps{eps:g}/{attack}", []).append(correct[attack])
    columns["clean"] = columns["clean"][::2]
    return {name: torch.cat(parts) for name, parts in columns.items()}


def test_callback_logs_and_records_the_direct_computation(tmp_path):
    """After ``trainer.test`` the logged clean/per-attack/robust accuracies and the per-image records equal
    :func:`robust_correct` run directly on the same batches and seeds (a callback skipping an attack, or attacking
    other images or with other seeds, differs); robust accuracy < 10 % at ε = 0.5 on an untrained model."""
    model, dataset = tiny_setup()
    callback = AdversarialEvaluation(output_dir=str(tmp_path), **CALLBACK)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[callback])
    trainer.test(model, datamodule=TensorData(dataset))
    expected = direct(model, dataset)
    logged = trainer.callback_metrics
    for name, values in expected.items():
        assert logged[f"adv/test/{name}"].item() == pytest.approx(values.float().mean().item())
    for eps in ("0.02", "0.5"):
        robust = torch.stack([expected[f"eps{eps}/{a}"] for a in ("pgd", "apgd-ce", "apgd-t")]).all(0)
        assert logged[f"adv/test/eps{eps}/robust"].item() == pytest.approx(robust.float().mean().item())
    assert logged["adv/test/eps0.5/robust"].item() < 0.1 < logged["adv/test/clean"].item()
    records = json.loads((tmp_path / "test_records.json").read_text())
    assert len(records["images"]) == 36
    assert [r["eps0.02/apgd-t"] for r in records["images"]] == expected["eps0.02/apgd-t"].tolist()
    assert [r["index"] for r in records["images"]] == torch.randperm(40, generator=torch.Generator().manual_seed(7))[
        :36].sort().values.tolist()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fake_trainer(rank: int, world: int, dataset, root) -> SimpleNamespace:
    """The trainer attributes the callback reads (contract: loaders, ranks, root device, output folder)."""
    return SimpleNamespace(world_size=world, global_rank=rank, is_global_zero=rank == 0, datamodule=None,
                           strategy=SimpleNamespace(root_device=torch.device("cpu")), val_dataloaders=None,
                           test_dataloaders=DataLoader(dataset), default_root_dir=str(root), loggers=[])


def _rank(rank: int, world: int, port: int, root) -> None:
    # A forked child inherits the parent's OpenMP state but not its threads: a multi-threaded op here would wait on
    # them forever (it hung CI when the suite ran with 2 threads). One thread per rank is what DDP on CPU uses anyway.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model, dataset = tiny_setup()
        results = AdversarialEvaluation(output_dir=str(root / "ddp"), **CALLBACK).evaluate(
            _fake_trainer(rank, world, dataset, root), model, "test")
        torch.save(results, root / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_give_the_single_process_numbers(tmp_path):
    """Two forked gloo processes share the batches (rank r takes batches r, r + 2, …) and gather in order: both end
    with the single process's numbers, and rank 0's records equal its records (a callback attacking every image on
    every rank, or gathering out of order, or seeding by rank, differs)."""
    model, dataset = tiny_setup()
    single = AdversarialEvaluation(output_dir=str(tmp_path / "one"), **CALLBACK).evaluate(
        _fake_trainer(0, 1, dataset, tmp_path), model, "test")
    torch.multiprocessing.start_processes(_rank, args=(2, _free_port(), tmp_path), nprocs=2, start_method="fork")
    for rank in (0, 1):
        assert torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) == single
    records = [json.loads((tmp_path / d / "test_records.json").read_text())["images"] for d in ("one", "ddp")]
    assert records[0] == records[1]


class TrainValData(L.LightningDataModule):
    def __init__(self):
        super().__init__()
        self.train_dataset = TensorImageDataset(*tiny_batch(64, seed=3))
        self.val_dataset = TensorImageDataset(*tiny_batch(40, seed=4))

    def train_dataloader(self):
        return DataLoader(self.train_dataset, batch_size=16)

    def val_dataloader(self):
        return DataLoader(self.val_dataset, batch_size=16)


class RecordRobustVal(L.Callback):
    def __init__(self):
        self.values = []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.values.append(trainer.callback_metrics["adv/val/eps0.1/pgd"].item())


def test_robust_validation_chooses_the_checkpoint_during_fit(tmp_path):
    """The CIFAR-10 configs' early stopping (Rice et al. 2020): ``AdversarialEvaluation(splits=[val])`` attacks the
    validation split after every validation epoch of ``fit`` and logs ``adv/val/eps<ε>/pgd`` in time for
    ``ModelCheckpoint`` to keep the epoch where it is highest; the last epoch's value equals PGD run directly on the
    final weights (a callback attacking another split, other images or with other seeds differs)."""
    torch.manual_seed(0)
    model = AdversarialClassifier(method="pgd", eps=0.1, attack_steps=2, lr=5e-2, **TINY)
    robust = AdversarialEvaluation(epsilons=[0.1], attacks=["pgd"], pgd_steps=3, batch_size=16, splits=["val"],
                                   output_dir=str(tmp_path / "adversarial"))
    recorder = RecordRobustVal()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="best-{epoch}", monitor="adv/val/eps0.1/pgd", mode="max")
    trainer = L.Trainer(accelerator="cpu", max_epochs=4, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[robust, recorder, checkpoint])
    trainer.fit(model, datamodule=TrainValData())
    assert len(recorder.values) == 4 and len(set(recorder.values)) > 1
    best = max(range(4), key=recorder.values.__getitem__)
    assert checkpoint.best_model_score.item() == pytest.approx(recorder.values[best])
    assert checkpoint.best_model_path.endswith(f"best-epoch={best}.ckpt")
    val = TrainValData().val_dataset
    model.eval()
    direct_pgd = torch.cat([robust_correct(model, val.images[s:s + 16], val.targets[s:s + 16], 0.1, attacks=("pgd",),
                                           pgd_steps=3, generator=torch.Generator().manual_seed(b))["pgd"]
                            for b, s in enumerate(range(0, 40, 16))])
    assert recorder.values[-1] == pytest.approx(direct_pgd.float().mean().item())
