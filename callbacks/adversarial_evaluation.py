"""Robust accuracy of a classifier under white-box attacks at the end of test/validation (thesis 001 ch. 2), in any
Lightning project: clean accuracy, and per ε the accuracy under PGD-k with restarts, APGD-CE and APGD-T (Croce & Hein
2020) and under all of them (``robust``: correct under every attack), plus the gradient-masking sanity check.

The split is the one the trainer's loop iterates, read through :mod:`lit_robust.callbacks.contract` (item format,
pixel space: the attacks work in [0, 1] and the module receives images in the loader's space). Images are shared
out over DDP ranks (:func:`rank_batches`), each batch attacked with a generator seeded by the batch's index (so the
ranks reproduce the single-process numbers), the per-image results gathered in order; every rank logs the same
numbers through ``log_dict`` and rank zero writes ``<output_dir>/<split>_records.json``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import Subset

from lit_robust.callbacks.contract import SplitEvaluation, shard_map
from lit_robust.functional.attacks import check_norm, robust_correct
from lit_robust.storage.json_files import write_json_atomic


def masking_warnings(robust: dict[float, float], masking_eps: float | None, floor: float = 0.05,
                     slack: float = 0.01) -> list[str]:
    """The gradient-masking sanity checks (Carlini et al. 2019, "On evaluating adversarial robustness", §5.2;
    Athalye et al. 2018): robust accuracy must not increase with ε (beyond ``slack``), and must be ≈ 0 (≤ ``floor``)
    at ``masking_eps``, a radius large enough to erase the image class. Returns one message per violation."""
    problems = []
    epsilons = sorted(robust)
    for small, large in zip(epsilons, epsilons[1:]):
        if robust[large] > robust[small] + slack:
            problems.append(f"robust accuracy rises from {robust[small]:.3f} at ε={small:g} to {robust[large]:.3f} at "
                            f"ε={large:g}")
    if masking_eps is not None and masking_eps in robust and robust[masking_eps] > floor:
        problems.append(f"robust accuracy {robust[masking_eps]:.3f} at ε={masking_eps:g} is above {floor}")
    return problems


class AdversarialEvaluation(SplitEvaluation):
    """Clean and robust accuracy for a list of ε.

    Args:
        output_dir: where the records go (default: ``adversarial/`` in the trainer's output folder).
        norm: ``linf`` or ``l2``; epsilons: radii in [0, 1] pixel units.
        attacks: among ``pgd`` (PGD-``pgd_steps`` on the CE, ``restarts`` random starts, the per-image worst kept),
            ``apgd-ce`` and ``apgd-t`` (``apgd_steps`` iterations, APGD-T over ``num_targets`` target classes).
        num_images: a seeded random subset of the split, in split order (``None``: all; not the first images: a
            split may be sorted by class); batch_size: images attacked at once.
        masking_eps: a radius where robust accuracy must be ≈ 0 (:func:`masking_warnings`; it should be among
            ``epsilons``); ``None`` checks only that accuracy does not rise with ε.
        splits: ``val`` and/or ``test``; seed: the subset and the attacks' random starts (batch b uses seed·10⁶ + b).
        split, item_keys, normalization: the split, item format and loader normalisation (contract).
    """

    folder_name = "adversarial"

    def __init__(self, output_dir: str | None = None, norm: str = "linf",
                 epsilons: Sequence[float] = (0.1, 0.2, 0.3), attacks: Sequence[str] = ("pgd", "apgd-ce", "apgd-t"),
                 pgd_steps: int = 20, restarts: int = 1, apgd_steps: int = 100, num_targets: int = 9,
                 num_images: int | None = None, batch_size: int = 256, masking_eps: float | None = None,
                 splits: Sequence[str] = ("test",), seed: int = 0, split: str | Callable | None = None,
                 item_keys: tuple | None = None, normalization=None):
        super().__init__(splits, split, item_keys, normalization, output_dir)
        self.norm = check_norm(norm)
        self.epsilons, self.attacks = sorted(float(e) for e in epsilons), tuple(attacks)
        self.attack_kwargs = {"pgd_steps": pgd_steps, "restarts": restarts, "apgd_steps": apgd_steps,
                              "num_targets": num_targets, "attacks": self.attacks, "norm": norm}
        self.num_images, self.batch_size, self.masking_eps, self.seed = num_images, batch_size, masking_eps, seed

    def columns(self) -> list[str]:
        """The per-image result columns: ``clean``, then ``eps<ε>/<attack>`` for each ε and attack."""
        return ["clean"] + [f"eps{eps:g}/{attack}" for eps in self.epsilons for attack in self.attacks]

    def _results(self, trainer, pl_module, dataset) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split in order (:func:`shard_map`): (targets, correct (n, columns) bool)."""
        device = trainer.strategy.root_device
        logits_fn = self.pixel_space.on_unit(pl_module)

        def compute(rows, images, labels):
            x, y = self.pixel_space.to_unit(images.to(device)), labels.to(device)
            batch = int(rows[0]) // self.batch_size
            columns = []
            for eps in self.epsilons:
                generator = torch.Generator().manual_seed(self.seed * 10**6 + batch)
                correct = robust_correct(logits_fn, x, y, eps, generator=generator, **self.attack_kwargs)
                columns += [correct["clean"]] if not columns else []
                columns += [correct[attack] for attack in self.attacks]
            return {"targets": y, "correct": torch.stack(columns, 1)}

        out = shard_map(trainer, dataset, self.batch_size, compute, self.item_format)
        return out["targets"], out["correct"]

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str) -> dict[str, float]:
        """Attack one split; log and return the flat metrics (``adv/<split>/clean``, ``adv/<split>/eps<ε>/<attack>``,
        ``adv/<split>/eps<ε>/robust``)."""
        dataset = self.evaluated(trainer, split)
        if self.num_images is not None and self.num_images < len(dataset):  # a seeded draw: splits can be class-sorted
            order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(self.seed))
            dataset = Subset(dataset, order[:self.num_images].sort().values.tolist())
        originals = dataset.indices if isinstance(dataset, Subset) else range(len(dataset))
        was_training = pl_module.training
        pl_module.eval()
        with torch.inference_mode(False), torch.enable_grad():
            targets, correct = (t.cpu() for t in self._results(trainer, pl_module, dataset))
        pl_module.train(was_training)
        table = dict(zip(self.columns(), correct.unbind(1)))
        for eps in self.epsilons:
            table[f"eps{eps:g}/robust"] = torch.stack([table[f"eps{eps:g}/{a}"] for a in self.attacks]).all(0)
        results = {f"adv/{split}/{name}": value.float().mean().item() for name, value in table.items()}
        problems = masking_warnings({eps: results[f"adv/{split}/eps{eps:g}/robust"] for eps in self.epsilons},
                                    self.masking_eps)
        for problem in problems:
            rank_zero_warn(f"AdversarialEvaluation ({split}): {problem} — a sign of gradient masking or a weak "
                          "attack; raise apgd_steps/restarts or check the model for non-differentiable parts")
        results[f"adv/{split}/masking_suspect"] = float(bool(problems))
        pl_module.log_dict(results, sync_dist=False)  # the gathered numbers, equal on every rank
        if trainer.is_global_zero:
            folder = self.outputs(trainer)
            folder.mkdir(parents=True, exist_ok=True)
            write_json_atomic(folder / f"{split}_records.json", {
                "norm": self.norm, "epsilons": self.epsilons, "attacks": list(self.attacks),
                "attack_settings": {k: v for k, v in self.attack_kwargs.items() if k != "attacks"},
                "metrics": results, "warnings": problems,
                "images": [{"index": int(originals[i]), "target": int(t), **{name: bool(v[i]) for name, v in
                                                                            table.items()}}
                           for i, t in enumerate(targets.tolist())]})
        return results
