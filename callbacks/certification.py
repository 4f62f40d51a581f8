"""Certify a split against adversarial patches at the end of validation/test (derandomized smoothing, thesis 001
§1.1.1, Eqs. 1.1–1.2), in any Lightning project.

The module provides ``ablated_logits(images, masks[, token_dropping=...])`` → logits (N, A, K) for [0, 1] images
(N, C, H, W) under ablation masks (A, H, W) — ``lit_robust.SmoothedViT`` does; any other classifier is wrapped in
:class:`~lit_robust.SmoothedClassifier` (ablated pixels black, then the declared ``normalization``), so a user's own
model is certified as it is. The split is the one the trainer's loop iterates, read through
:mod:`lit_robust.callbacks.contract` (item format, pixel space). Images are shared out over DDP ranks
and the per-image votes gathered in order (:func:`shard_map`); votes are counted over the whole ablation set, smoothed
and certified accuracy go through a torchmetrics metric of the gathered counts and ``log_dict``; rank zero writes ``<output_dir>/<split>_records.json`` (index, target, prediction, margin, votes) and a certified-accuracy plot.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import lightning as L
import torch

from lit_robust.callbacks.contract import SplitEvaluation, shard_map
from lit_robust.functional.ablations import ablation_masks, ablation_positions
from lit_robust.functional.derandomized_smoothing import (CertifiedAccuracy, ablation_votes, certified_margin,
                                                          check_rule, patch_delta, smoothed_prediction)
from lit_robust.models.smoothed_classifier import SmoothedClassifier
from lit_robust.storage.json_files import write_json_atomic


class Certification(SplitEvaluation):
    """Certified accuracy of a smoothed classifier for a list of patch sizes.

    Args:
        output_dir: where the records and plots go (default: ``certification/`` in the trainer's output folder).
        patch_sizes: adversarial patch sides m to certify against.
        rule: ``strict`` (Eq. 1.2, margin > 2Δ) or ``tight`` (Levine & Feizi's exact rule: also margin = 2Δ when
            the prediction wins the tie; :func:`lit_robust.functional.derandomized_smoothing.certified`).
        kind, width, stride: the ablation set; ``None`` reads ``ablation``, ``ablation_width``, ``ablation_stride``
            from the module's hparams.
        token_dropping: list of modes to certify in (e.g. ``[true, false]``: logs ``cert/<split>/drop/...`` and
            ``cert/<split>/full/...``); ``None``: the module's own mode only (``cert/<split>/...``).
        splits: ``val`` and/or ``test``.
        batch_size: images per call of ``ablated_logits`` (it batches the positions itself).
        split: the DataModule attribute (or a callable) holding the split to certify; default: what the loop iterates.
        item_keys, normalization: the item format and the loader's normalisation (contract); a module without
            ``ablated_logits`` receives ablated images in that normalisation.
    """

    folder_name = "certification"  # under the trainer's output folder when output_dir is not given

    def __init__(self, output_dir: str | None = None, patch_sizes: Sequence[int] = (1, 2, 3, 4),
                 kind: str | None = None, width: int | None = None, stride: int | None = None,
                 token_dropping: Sequence[bool] | None = None, splits: Sequence[str] = ("test",),
                 batch_size: int = 64, split: str | Callable | None = None, item_keys: tuple | None = None,
                 normalization=None, rule: str = "strict"):
        super().__init__(splits, split, item_keys, normalization, output_dir)
        self.rule = check_rule(rule, "Certification")  # here, not first at the end of validation
        self.patch_sizes = list(patch_sizes)
        self.kind, self.width, self.stride = kind, width, stride
        self.token_dropping = list(token_dropping) if token_dropping is not None else None
        self.batch_size = batch_size

    def smoothed(self, pl_module: L.LightningModule):
        """The module itself when it has ``ablated_logits``, else the module wrapped as a smoothed classifier."""
        if hasattr(pl_module, "ablated_logits"):
            return pl_module
        if self.token_dropping:
            raise ValueError(f"{type(pl_module).__name__} is certified through SmoothedClassifier, which has no token "
                             "dropping: set Certification(token_dropping=None)")
        return SmoothedClassifier(pl_module, self.normalization, self.kind, self.width, self.stride or 1)

    def _ablation_set(self, model, size: tuple[int, int]) -> tuple[str, int, int, torch.Tensor]:
        hp = getattr(model, "hparams", {})
        kind, width = self.kind or hp.get("ablation"), self.width or hp.get("ablation_width")
        stride = self.stride or hp.get("ablation_stride") or 1
        if kind is None or width is None:
            raise ValueError("Certification needs the ablation set: pass kind= ('column' or 'block') and width= (the "
                             "module has no 'ablation'/'ablation_width' hparams)")
        return kind, width, stride, ablation_masks(kind, ablation_positions(kind, size, width, stride), size, width)

    def _num_classes(self, classify, images: torch.Tensor) -> int:
        """K, read from the logits of one unmasked image (fails early, naming shapes, if the model cannot take it)."""
        try:
            with torch.no_grad():
                return int(classify(images[:1], images.new_ones(1, *images.shape[-2:])).shape[-1])
        except RuntimeError as error:
            raise RuntimeError(f"{type(self).__name__}: the model cannot classify the split's images of shape "
                               f"{tuple(images.shape[1:])} ({error}); use data of the model's channels and size") \
                from error

    def _results(self, trainer, model, dataset, token_dropping, evaluate) -> tuple[torch.Tensor, torch.Tensor]:
        """(targets, results) of the whole split in order (:func:`shard_map`), where ``evaluate(classify, images,
        targets, K)`` gives the per-image results of a batch of [0, 1] images and ``classify(images, masks)`` is the
        masked forward."""
        kwargs = {} if token_dropping is None else {"token_dropping": token_dropping}
        classify = lambda x, m: model.ablated_logits(x, m, **kwargs)  # noqa: E731
        device = trainer.strategy.root_device
        first = self.pixel_space.to_unit(self.item_format.collate([dataset[0]])[0].to(device))
        num_classes = self._num_classes(classify, first)  # the same on every rank, even one with no share

        def compute(rows, images, labels):
            labels = labels.to(device)
            return {"targets": labels,
                    "results": evaluate(classify, self.pixel_space.to_unit(images.to(device)), labels, num_classes)}

        with torch.no_grad():
            out = shard_map(trainer, dataset, self.batch_size, compute, self.item_format)
        return out["targets"], out["results"]

    def _counts(self, trainer, model, dataset, masks, token_dropping) -> tuple[torch.Tensor, torch.Tensor]:
        """Votes of the whole split: (targets, counts)."""
        masks = masks.to(trainer.strategy.root_device)
        return self._results(trainer, model, dataset, token_dropping,
                             lambda classify, images, _, k: ablation_votes(classify, images, masks, k))

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str) -> dict[str, float]:
        """Certify one split; log and return the flat metrics."""
        dataset = self.evaluated(trainer, split)
        model = self.smoothed(pl_module)
        size = tuple(self.item_format.read(dataset[0])[0].shape[-2:])
        kind, width, stride, masks = self._ablation_set(model, size)
        deltas = {m: patch_delta(masks, m) for m in self.patch_sizes}
        results, records = {}, {}
        for mode in self.token_dropping or [None]:
            tag = f"cert/{split}" + ("" if mode is None else ("/drop" if mode else "/full"))
            targets, counts = self._counts(trainer, model, dataset, masks, mode)
            metric = CertifiedAccuracy(deltas, self.rule, sync_on_compute=False).to(counts.device)  # gathered already
            metric.update(counts, targets)
            results.update({f"{tag}/{name}": float(value) for name, value in metric.compute().items()})
            records[mode] = (targets.cpu(), counts.cpu())
        pl_module.log_dict(results, sync_dist=False)
        if trainer.is_global_zero:
            self._write(self.outputs(trainer), split, kind, width, stride, deltas, results, records)
        return results

    def _write(self, folder: Path, split, kind, width, stride, deltas, results, records) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        payload = {"ablation": kind, "width": width, "stride": stride, "deltas": deltas, "rule": self.rule,
                   "metrics": results,
                   "modes": {}}
        for mode, (targets, counts) in records.items():
            indices = torch.arange(len(targets))
            name = "model" if mode is None else ("token_dropping" if mode else "all_tokens")
            payload["modes"][name] = [
                {"index": int(i), "target": int(t), "prediction": int(p), "margin": int(g), "votes": c.tolist()}
                for i, t, p, g, c in zip(indices, targets, smoothed_prediction(counts), certified_margin(counts),
                                         counts)]
        write_json_atomic(folder / f"{split}_records.json", payload)
        self._plot(folder, split, results)

    def _plot(self, folder: Path, split: str, results: dict[str, float]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        prefixes = sorted({key.rsplit("/", 1)[0] for key in results})
        for prefix in prefixes:
            ax.plot(self.patch_sizes, [100 * results[f"{prefix}/acc_m{m}"] for m in self.patch_sizes], "o-",
                    label=f"{prefix.split('/')[-1] if prefix.count('/') > 1 else 'smoothed'} "
                          f"(std {100 * results[f'{prefix}/acc']:.1f} %)")
        ax.set(xlabel="patch side m (pixels)", ylabel="certified accuracy (%)", title=f"{split} split",
               ylim=(0, 100), xticks=self.patch_sizes)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / f"{split}_certified_accuracy.png", dpi=120)
        plt.close(fig)

