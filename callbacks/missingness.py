"""Measure the missingness bias of the module (thesis 001 ch. 5, Figs. 5.3–5.5) at the end of validation/test, in any
Lightning project: remove growing fractions of each image's p×p regions — by blacking them out and, for a timm ViT,
by dropping their tokens — in random, least-salient-first and most-salient-first order, and report how many
predictions stay unchanged and how the predicted-class distribution and its entropy shift.

The split is the one the trainer's loop iterates, read through :mod:`lit_robust.callbacks.contract` (item format,
pixel space); images are shared out over DDP ranks and the per-image predictions gathered in split order, so every
rank logs the numbers of the whole split. Rank zero writes ``<output_dir>/<split>_missingness.json`` and the plots
``<split>_unchanged.png`` (Fig. 5.4) and ``<split>_entropy.png`` (Fig. 5.3, right).

With ``lime_samples`` > 0 it also explains every image with LIME under each mode's missingness (§5.3,
:mod:`lit_robust.functional.lime`): the consistency of black-out explanations across eight baseline colours (Fig. 5.8) and the
top-k ablation test of the model's own explanations, of random ones and of other runs' (Fig. 5.9). The
explanations go to ``<split>_lime.pt`` for other runs to be tested with.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import lightning as L
import torch
from timm.models.vision_transformer import VisionTransformer

from lit_robust.callbacks.contract import SplitEvaluation, shard_map
from lit_robust.functional.ablations import keep_masks, region_masks
from lit_robust.functional.lime import baseline_colours, lime_scores, pairwise_consistency, random_presence
from lit_robust.functional.missingness_bias import (MODES, ORDERS, blackout_logits, dropped_token_logits,
                                                    gradient_saliency, missingness_statistics, region_scores,
                                                    removal_order, removal_predictions, removed_counts)
from lit_robust.storage.cache import save_atomic
from lit_robust.storage.json_files import write_json_atomic
from lit_robust.storage.serialization import load_plain


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
        lime_samples: LIME perturbations per image (the chapter: 1000); 0 leaves LIME out.
        lime_images: explain only the split's first images (dataset index below this; ``None``: all) — LIME costs
            ``lime_samples`` forward passes per image and mode, 8× that for black-out with ``lime_consistency``.
        lime_consistency: also explain black-out under the eight baseline colours and log their agreement (8× the
            black-out LIME cost).
        lime_explanations: other runs' explanations to run the top-k ablation test with, ``{name: path to their
            <split>_lime.pt}``; a run's explanation is its ``drop_tokens`` one when it has that mode, else black-out.
        splits, batch_size, seed (random order; batch b uses seed·10⁶ + b), split, item_keys, normalization: as the
            other split-evaluating callbacks (contract).

    A module whose forward normalises [0, 1] input with ``mean``/``std`` buffers (``ImageClassifier``) gets the
    same normalisation before its ViT's patch embedding when tokens are dropped.
    """

    folder_name = "missingness"

    def __init__(self, output_dir: str | None = None, region: int = 4,
                 fractions: Sequence[float] = (0.1, 0.25, 0.5, 0.75), orders: Sequence[str] = ORDERS,
                 modes: Sequence[str] = ("blackout",), saliency_checkpoint: str | None = None,
                 lime_samples: int = 0, lime_images: int | None = None, lime_consistency: bool = True,
                 lime_explanations: dict[str, str] | None = None,
                 splits: Sequence[str] = ("test",), batch_size: int = 256, seed: int = 0,
                 split: str | Callable | None = None, item_keys: tuple | None = None, normalization=None):
        super().__init__(splits, split, item_keys, normalization, output_dir)
        for name, values, allowed in (("orders", orders, ORDERS), ("modes", modes, MODES)):
            if not values or set(values) - set(allowed):
                raise ValueError(f"MissingnessReport {name}={list(values)}: use a non-empty subset of {allowed}")
        self.region = region
        self.fractions = [0.0] + sorted(float(f) for f in fractions if f > 0)
        self.orders, self.modes = list(orders), list(modes)
        self.saliency_checkpoint, self.batch_size, self.seed = saliency_checkpoint, batch_size, seed
        if lime_samples < 0:
            raise ValueError(f"MissingnessReport lime_samples={lime_samples}: use 0 (no LIME) or a positive count")
        self.lime_samples, self.lime_explanations = lime_samples, dict(lime_explanations or {})
        if lime_images is not None and lime_images < 1:
            raise ValueError(f"MissingnessReport lime_images={lime_images}: use a positive count or null (all)")
        self.lime_images = lime_images
        self.lime_consistency = lime_consistency and "blackout" in self.modes
        if self.lime_explanations and not lime_samples:
            raise ValueError("MissingnessReport lime_explanations need lime_samples > 0 (the model's own explanation "
                             "is the reference of the top-k ablation test)")
        for name, path in self.lime_explanations.items():
            if not Path(path).is_file():
                raise FileNotFoundError(f"MissingnessReport lime_explanations[{name!r}]={path}: no such file; pass "
                                        f"the <split>_lime.pt a run with lime_samples > 0 wrote")

    def _models(self, pl_module: L.LightningModule) -> tuple[dict, Callable, Callable]:
        """The masked forward of each mode on [0, 1] images, the saliency model and the model on [0, 1] images."""
        unit_model = self.pixel_space.on_unit(pl_module)
        logits = {}
        for mode in self.modes:
            if mode == "blackout":
                logits[mode] = blackout_logits(unit_model)
            else:
                own = ((lambda x: (x - pl_module.mean) / pl_module.std) if hasattr(pl_module, "mean") else
                       (lambda x: x))
                logits[mode] = dropped_token_logits(module_vit(pl_module), self.pixel_space.on_unit(own))
        if self.saliency_checkpoint is None:
            return logits, unit_model, unit_model
        from lit_robust.models.classifier import ImageClassifier

        ranker = ImageClassifier.load_from_checkpoint(self.saliency_checkpoint, map_location=pl_module.device,
                                                      weights_only=True).eval()
        return logits, ranker, unit_model

    def _other_explanations(self, dataset, regions: int, device) -> dict[str, torch.Tensor]:
        """Each run's explanation of ``lime_explanations`` as a table (len(split), R) indexed by dataset index."""
        tables = {}
        for name, path in self.lime_explanations.items():
            saved = load_plain(path, "LIME explanations")
            scores = saved["scores"].get("drop_tokens", saved["scores"].get("blackout"))
            if scores is None or scores.shape[1] != regions or int(saved["indices"].max()) >= len(dataset):
                raise ValueError(f"MissingnessReport lime_explanations[{name!r}]={path} does not explain this split "
                                 f"with {regions} regions: make it with the same data, split and region size")
            table = torch.full((len(dataset), regions), float("nan"), device=device)
            table[saved["indices"].to(device)] = scores.float().to(device)
            tables[name] = table
        return tables

    def _lime(self, logits: dict, unit_model: Callable, x: torch.Tensor, predicted: torch.Tensor,
              regions: torch.Tensor, counts: list[int], others: dict[str, torch.Tensor], rows: torch.Tensor,
              generator: torch.Generator) -> dict[str, torch.Tensor]:
        """LIME of one batch, explaining each mode's whole-image prediction ``predicted`` (n, modes): the own
        explanation per mode (n, modes, R), black-out explanations under the eight baseline colours (n, 8, R; with
        ``lime_consistency``) and the predictions of the top-k ablation test with the own, a random (scores from
        ``generator``) and the other explanations (n, modes, sources, fractions)."""
        presence = random_presence(self.lime_samples, len(regions),
                                   torch.Generator().manual_seed(self.seed)).to(x.device)  # shared by all images
        target = {mode: predicted[:, m] for m, mode in enumerate(self.modes)}
        out = {}
        if self.lime_consistency:  # the first baseline colour is black: the black-out mode's own explanation
            out["colour_lime"] = torch.stack([
                lime_scores(blackout_logits(unit_model, colour), x, regions, presence, target["blackout"])
                for colour in baseline_colours(x.shape[1]).to(x.device)], 1)
        own = torch.stack([out["colour_lime"][:, 0] if mode == "blackout" and self.lime_consistency else
                           lime_scores(logits[mode], x, regions, presence, target[mode]) for mode in self.modes], 1)
        out["lime"] = own
        random = torch.rand(own[:, 0].shape, generator=generator).to(x.device)
        given = [table[rows] for table in others.values()]
        if any(bool(e.isnan().any()) for e in given):
            raise ValueError("MissingnessReport lime_explanations miss some images of this split: make them on the "
                             "same split")
        topk = []
        for m, mode in enumerate(self.modes):
            topk.append(torch.stack([removal_predictions(
                logits[mode], x, keep_masks(removal_order(e, "most_salient"), counts, regions))
                for e in [own[:, m], random, *given]], 1))
        out["topk"] = torch.stack(topk, 1)
        return out

    def _predictions(self, trainer, pl_module, dataset) -> dict[str, torch.Tensor]:
        """The whole split in order (:func:`shard_map`): targets, predictions (n, modes, orders, fractions) and, with
        LIME, ``lime_indices`` and the outputs of ``_lime`` for the explained images."""
        device = trainer.strategy.root_device
        logits, ranker, unit_model = self._models(pl_module)
        size = tuple(self.item_format.read(dataset[0])[0].shape[-2:])
        regions = region_masks(size, self.region).to(device)
        counts = removed_counts(len(regions), self.fractions)
        others = self._other_explanations(dataset, len(regions), device)

        def compute(rows, images, labels):
            rows, x = rows.to(device), self.pixel_space.to_unit(images.to(device))
            scores = (region_scores(gradient_saliency(ranker, x), self.region) if set(self.orders) != {"random"}
                      else x.new_zeros(len(x), len(regions)))  # a random order needs no saliency pass
            generator = torch.Generator().manual_seed(self.seed * 10**6 + int(rows[0]) // self.batch_size)
            keep = [keep_masks(removal_order(scores, order, generator), counts, regions) for order in self.orders]
            with torch.no_grad():  # every mode removes the same regions in the same order
                table = [[removal_predictions(logits[mode], x, masks) for masks in keep] for mode in self.modes]
                part = {"targets": labels.to(device),
                        "predictions": torch.stack([torch.stack(row, 1) for row in table], 1)}
                explained = rows < (self.lime_images or len(dataset))
                if self.lime_samples and explained.any():
                    predicted = part["predictions"][explained][:, :, 0, 0]  # nothing removed: the whole image
                    lime = self._lime(logits, unit_model, x[explained], predicted, regions, counts, others,
                                      rows[explained], torch.Generator().manual_seed(
                                          self.seed * 10**6 + 500_000 + int(rows[0]) // self.batch_size))
                    part.update({key: (value, rows[explained]) for key, value in
                                 {"lime_indices": rows[explained], **lime}.items()})
            return part

        return shard_map(trainer, dataset, self.batch_size, compute, self.item_format)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str) -> dict[str, float]:
        """Logs ``missing/<split>/<mode>/<order>/unchanged_f<%>`` and ``.../entropy_f<%>`` (nats) per fraction, and
        ``missing/<split>/<mode>/acc`` (accuracy on whole images); with LIME also ``.../<mode>/lime_<source>/
        unchanged_f<%>`` (top-k ablation test; source ``own``, ``random`` or a name of ``lime_explanations``) and
        ``missing/<split>/blackout/lime/consistency_f<%>`` beside ``missing/<split>/lime/random_consistency_f<%>``
        (mean top-k Jaccard over the 28 pairs of baseline colours, k = the fraction's region count)."""
        dataset = self.evaluated(trainer, split)
        was_training = pl_module.training
        pl_module.eval()
        with torch.inference_mode(False):
            gathered = {key: value.cpu() for key, value in self._predictions(trainer, pl_module, dataset).items()}
        pl_module.train(was_training)
        targets, predictions = gathered["targets"], gathered["predictions"]
        num_classes = int(max(predictions.max(), targets.max())) + 1 if len(targets) else 1
        results, curves = {}, {}
        for m, mode in enumerate(self.modes):
            results[f"missing/{split}/{mode}/acc"] = (predictions[:, m, 0, 0] == targets).float().mean().item()
            for o, order in enumerate(self.orders):
                stats = missingness_statistics(predictions[:, m, o], predictions[:, m, o, 0], num_classes)
                curves[(mode, order)] = stats
                self._log_fractions(results, f"missing/{split}/{mode}/{order}", stats, ("unchanged", "entropy"))
        if self.lime_samples:
            results.update(self._lime_metrics(split, gathered, num_classes))
        pl_module.log_dict(results, sync_dist=False)  # the gathered numbers, equal on every rank
        if trainer.is_global_zero:
            folder = self.outputs(trainer)
            folder.mkdir(parents=True, exist_ok=True)
            write_json_atomic(folder / f"{split}_missingness.json", {
                "region": self.region, "fractions": self.fractions, "metrics": results,
                "class_shares": {f"{mode}/{order}": stats["class_shares"].tolist()
                                 for (mode, order), stats in curves.items()}})
            if self.lime_samples:
                save_atomic(folder / f"{split}_lime.pt", {
                    "indices": gathered["lime_indices"], "region": self.region, "samples": self.lime_samples,
                    "scores": {mode: gathered["lime"][:, m].contiguous() for m, mode in enumerate(self.modes)}})
            self._plot(folder, split, curves)
        return results

    def _log_fractions(self, results: dict, tag: str, stats: dict, keys: Sequence[str]) -> None:
        for f, fraction in enumerate(self.fractions[1:], start=1):
            for key in keys:
                results[f"{tag}/{key}_f{round(100 * fraction)}"] = stats[key][f].item()

    def _lime_metrics(self, split: str, gathered: dict, num_classes: int) -> dict[str, float]:
        """The top-k ablation test per mode and explanation, and the baseline-colour consistency of black-out."""
        results, topk = {}, gathered["topk"]
        for m, mode in enumerate(self.modes):
            for s, source in enumerate(["own", "random", *self.lime_explanations]):
                stats = missingness_statistics(topk[:, m, s], topk[:, m, s, 0], num_classes)
                self._log_fractions(results, f"missing/{split}/{mode}/lime_{source}", stats, ("unchanged",))
        if not self.lime_consistency:
            return results
        regions = gathered["lime"].shape[-1]
        ks = removed_counts(regions, self.fractions[1:])
        random = torch.rand(len(gathered["lime"]), 8, regions, generator=torch.Generator().manual_seed(self.seed))
        consistency = {"lime/random_consistency": pairwise_consistency(random.unbind(1), ks).mean(0),
                       "blackout/lime/consistency": pairwise_consistency(gathered["colour_lime"].unbind(1),
                                                                         ks).mean(0)}
        for name, values in consistency.items():
            for fraction, value in zip(self.fractions[1:], values):
                results[f"missing/{split}/{name}_f{round(100 * fraction)}"] = value.item()
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
