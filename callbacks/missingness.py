"""Measure the missingness bias of the module (thesis 001 ch. 5, Figs. 5.3–5.5) at the end of validation/test, in any
Lightning project: remove growing fractions of each image's p×p regions — by blacking them out and, for a timm ViT,
by dropping their tokens — in random, least-salient-first and most-salient-first order, and report how many
predictions stay unchanged and how the predicted-class distribution and its entropy shift.

The split is the one the trainer's loop iterates, read through :mod:`lit_robust.callbacks.contract` (item format,
pixel space); images are shared out over DDP ranks and the per-image predictions gathered in split order, so every
rank logs the numbers of the whole split. Rank zero writes ``<output_dir>/<split>_missingness.json`` and the plots
``<split>_unchanged.png`` (Fig. 5.4) and ``<split>_entropy.png`` (Fig. 5.3, right).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import lightning as L
import torch
from timm.models.vision_transformer import VisionTransformer

from lit_robust.callbacks.contract import (ItemFormat, SplitEvaluation, evaluated_split, gather_in_order,
                                          output_folder, shard_batches)
from lit_robust.callbacks.metrics_file import write_json_atomic
from lit_robust.ablations import keep_masks, region_masks
from lit_robust.missingness import (MODES, ORDERS, blackout_logits, dropped_token_logits, gradient_saliency,
                                    missingness_statistics, region_scores, removal_order, removal_predictions,
                                    removed_counts)
from lit_robust.pixel_space import PixelSpace


def module_vit(module: torch.nn.Module) -> VisionTransformer:
    """The timm ViT that dropping tokens runs: the module itself or its ``net``."""
    for candidate in (module, getattr(module, "net", None)):
        if isinstance(candidate, VisionTransformer):
            return candidate
    raise ValueError(f"MissingnessReport mode 'drop_tokens' needs a timm VisionTransformer as the module or its "
                     f"`net`, got {type(module).__name__}: use modes=['blackout'] for other models")


class MissingnessReport(SplitEvaluation):
    """Share of unchanged predictions, predicted-class shares and their entropy as regions are removed.

    Args:
        output_dir: where the records and plots go (default: ``missingness/`` in the trainer's output folder).
        region: side p of the square regions (for ``drop_tokens``, the ViT's patch size, so a region is a token).
        fractions: shares of the regions removed (0 is added: the original predictions).
        orders: among ``random``, ``least_salient``, ``most_salient``.
        modes: ``blackout`` (any classifier) and/or ``drop_tokens`` (a timm ViT as the module or its ``net``).
        saliency_checkpoint: an ``ImageClassifier`` checkpoint whose gradient saliency orders the regions, so that
            several models are compared on one order (the chapter uses a standard ResNet's); ``None``: the module's.
        splits, batch_size, seed (random order; batch b uses seed·10⁶ + b), split, item_keys, normalization: as the
            other split-evaluating callbacks (contract).

    A module whose forward normalises [0, 1] input with ``mean``/``std`` buffers (``ImageClassifier``) gets the
    same normalisation before its ViT's patch embedding when tokens are dropped.
    """

    def __init__(self, output_dir: str | None = None, region: int = 4,
                 fractions: Sequence[float] = (0.1, 0.25, 0.5, 0.75), orders: Sequence[str] = ORDERS,
                 modes: Sequence[str] = ("blackout",), saliency_checkpoint: str | None = None,
                 splits: Sequence[str] = ("test",), batch_size: int = 256, seed: int = 0,
                 split: str | Callable | None = None, item_keys: tuple | None = None, normalization=None):
        super().__init__(splits, "MissingnessReport")
        for name, values, allowed in (("orders", orders, ORDERS), ("modes", modes, MODES)):
            if not values or set(values) - set(allowed):
                raise ValueError(f"MissingnessReport {name}={list(values)}: use a non-empty subset of {allowed}")
        self.output_dir, self.region = output_dir, region
        self.fractions = [0.0] + sorted(float(f) for f in fractions if f > 0)
        self.orders, self.modes = list(orders), list(modes)
        self.saliency_checkpoint, self.batch_size, self.seed, self.split = saliency_checkpoint, batch_size, seed, split
        self.item_format = ItemFormat(item_keys)
        self.pixel_space = PixelSpace(normalization, "MissingnessReport")

    def _models(self, pl_module: L.LightningModule) -> tuple[dict, Callable]:
        """The masked forward of each mode on [0, 1] images, and the saliency model."""
        unit_model = lambda unit: pl_module(self.pixel_space.from_unit(unit))  # noqa: E731
        logits = {}
        for mode in self.modes:
            if mode == "blackout":
                logits[mode] = blackout_logits(unit_model)
            else:
                own = ((lambda x: (x - pl_module.mean) / pl_module.std) if hasattr(pl_module, "mean") else
                       (lambda x: x))
                logits[mode] = dropped_token_logits(module_vit(pl_module),
                                                    lambda unit: own(self.pixel_space.from_unit(unit)))
        if self.saliency_checkpoint is None:
            return logits, unit_model
        from lit_robust.classifier import ImageClassifier

        ranker = ImageClassifier.load_from_checkpoint(self.saliency_checkpoint, map_location=pl_module.device,
                                                      weights_only=True).eval()
        return logits, ranker

    def _local_predictions(self, trainer, pl_module, dataset) -> tuple[torch.Tensor, ...]:
        """This rank's share: (indices, targets, predictions (n, modes, orders, fractions))."""
        device = trainer.strategy.root_device
        logits, ranker = self._models(pl_module)
        size = tuple(self.item_format.read(dataset[0])[0].shape[-2:])
        regions = region_masks(size, self.region).to(device)
        counts = removed_counts(len(regions), self.fractions)
        indices, targets, predictions = [], [], []
        for rows, images, labels in shard_batches(dataset, trainer, self.batch_size, self.item_format):
            x = self.pixel_space.to_unit(images.to(device))
            scores = (region_scores(gradient_saliency(ranker, x), self.region) if set(self.orders) != {"random"}
                      else x.new_zeros(len(x), len(regions)))  # a random order needs no saliency pass
            generator = torch.Generator().manual_seed(self.seed * 10**6 + int(rows[0]) // self.batch_size)
            keep = [keep_masks(removal_order(scores, order, generator), counts, regions) for order in self.orders]
            with torch.no_grad():  # every mode removes the same regions in the same order
                table = [[removal_predictions(logits[mode], x, masks) for masks in keep] for mode in self.modes]
            predictions.append(torch.stack([torch.stack(row, 1) for row in table], 1))
            indices.append(rows.to(device))
            targets.append(labels.to(device))
        if not predictions:
            empty = torch.zeros(0, len(self.modes), len(self.orders), len(self.fractions), dtype=torch.long,
                                device=device)
            return empty[:, 0, 0, 0], empty[:, 0, 0, 0], empty
        return torch.cat(indices), torch.cat(targets), torch.cat(predictions)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str) -> dict[str, float]:
        """Logs ``missing/<split>/<mode>/<order>/unchanged_f<%>`` and ``.../entropy_f<%>`` (nats) per fraction, and
        ``missing/<split>/<mode>/acc`` (accuracy on whole images)."""
        dataset = evaluated_split(trainer, split, self.split, "MissingnessReport")
        was_training = pl_module.training
        pl_module.eval()
        with torch.inference_mode(False):
            indices, targets, predictions = self._local_predictions(trainer, pl_module, dataset)
        pl_module.train(was_training)
        targets = gather_in_order(targets, indices, trainer).cpu()
        predictions = gather_in_order(predictions, indices, trainer).cpu()
        num_classes = int(max(predictions.max(), targets.max())) + 1 if len(targets) else 1
        results, curves = {}, {}
        for m, mode in enumerate(self.modes):
            results[f"missing/{split}/{mode}/acc"] = (predictions[:, m, 0, 0] == targets).float().mean().item()
            for o, order in enumerate(self.orders):
                stats = missingness_statistics(predictions[:, m, o], predictions[:, m, o, 0], num_classes)
                curves[(mode, order)] = stats
                for f, fraction in enumerate(self.fractions[1:], start=1):
                    tag = f"missing/{split}/{mode}/{order}"
                    results[f"{tag}/unchanged_f{round(100 * fraction)}"] = stats["unchanged"][f].item()
                    results[f"{tag}/entropy_f{round(100 * fraction)}"] = stats["entropy"][f].item()
        pl_module.log_dict(results, sync_dist=False)  # the gathered numbers, equal on every rank
        if trainer.is_global_zero:
            folder = Path(self.output_dir) if self.output_dir else output_folder(trainer, None) / "missingness"
            folder.mkdir(parents=True, exist_ok=True)
            write_json_atomic(folder / f"{split}_missingness.json", {
                "region": self.region, "fractions": self.fractions, "metrics": results,
                "class_shares": {f"{mode}/{order}": stats["class_shares"].tolist()
                                 for (mode, order), stats in curves.items()}})
            self._plot(folder, split, curves)
        return results

    def _plot(self, folder: Path, split: str, curves: dict) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        percent = [100 * f for f in self.fractions]
        for key, ylabel, name in (("unchanged", "predictions unchanged (%)", "unchanged"),
                                  ("entropy", "entropy of predicted classes (nats)", "entropy")):
            fig, ax = plt.subplots(figsize=(5, 3.5))
            for (mode, order), stats in curves.items():
                values = stats[key] * (100 if key == "unchanged" else 1)
                ax.plot(percent, values.tolist(), "o-" if mode == "blackout" else "s--", label=f"{mode}, {order}")
            ax.set_xlabel("regions removed (%)")
            ax.set_ylabel(ylabel)
            ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(folder / f"{split}_{name}.png", dpi=120)
            plt.close(fig)
