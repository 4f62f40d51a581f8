"""Certify a split against one adversarial patch with PatchCleanser (Xiang et al. 2022, double masking) at the end of
validation/test, for any classifier.

A subclass of :class:`~lit_robust.callbacks.Certification` sharing its contract: the same split lookup, item format,
pixel space, sharding and in-order gathering (``shard_map``), output folder, ``log_dict`` and ``CertifiedAccuracy``
sums; only what is certified differs — every image's one- and two-mask predictions over the mask set R of each patch
size (``lit_robust.functional.double_masking``) instead of ablation votes. The masked forward is the model's
``ablated_logits(images, masks)`` (``SmoothedViT``, token dropping available) or ``SmoothedClassifier``'s (masked
pixels black, then the declared normalisation). Logs ``cert/<split>/clean_m<m>`` (Algorithm 1's accuracy with the
mask set of m) and ``cert/<split>/acc_m<m>`` (Theorem 1), and rank zero writes ``<split>_records.json``.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import lightning as L
import torch

from lit_robust.callbacks.certification import Certification
from lit_robust.functional.derandomized_smoothing import CertifiedAccuracy
from lit_robust.functional.double_masking import CASES, mask_set, patchcleanser_outcomes
from lit_robust.storage.json_files import write_json_atomic


class PatchCleanserCertification(Certification):
    """PatchCleanser's clean and certified accuracy for a list of patch sizes.

    Args (beyond ``Certification``'s ``output_dir``, ``patch_sizes``, ``token_dropping``, ``splits``,
    ``batch_size``, ``split``, ``item_keys``, ``normalization``):
        k: masks per image side (|R| ≤ k², §4.3; the paper's default is 6).
        max_images: most masked images handed to the model per call.
    """

    folder_name = "patchcleanser"

    def __init__(self, output_dir: str | None = None, patch_sizes: Sequence[int] = (1, 2, 3, 4), k: int = 6,
                 token_dropping: Sequence[bool] | None = None, splits: Sequence[str] = ("test",),
                 batch_size: int = 64, split=None, item_keys: tuple | None = None, normalization=None,
                 max_images: int = 4096):
        super().__init__(output_dir, patch_sizes, token_dropping=token_dropping, splits=splits, batch_size=batch_size,
                         split=split, item_keys=item_keys, normalization=normalization)
        if k < 1:
            raise ValueError(f"PatchCleanserCertification k={k}: use k ≥ 1 masks per image side")
        self.k, self.max_images = k, max_images

    def _outcomes(self, mask_sets: dict[int, torch.Tensor], seconds: dict[int, float], shared: list[int]):
        """``evaluate`` for :meth:`_results`: (n, P, 3) outcomes of every patch size, timing each and counting the
        images in ``shared[0]``."""
        def evaluate(classify, images, targets, num_classes):
            shared[0] += len(images)
            outcomes = []
            for m, masks in mask_sets.items():
                started = time.perf_counter()
                outcomes.append(patchcleanser_outcomes(classify, images, targets, masks.to(images.device),
                                                       num_classes, self.max_images))
                seconds[m] += time.perf_counter() - started
            return torch.stack(outcomes, dim=1)
        return evaluate

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str) -> dict[str, float]:
        """Certify one split; log and return the flat metrics."""
        dataset = self.evaluated(trainer, split)
        model = self.smoothed(pl_module)
        size = tuple(self.item_format.read(dataset[0])[0].shape[-2:])
        mask_sets = {m: mask_set(size, m, self.k) for m in self.patch_sizes}
        results, records = {}, {}
        for mode in self.token_dropping or [None]:
            tag = f"cert/{split}" + ("" if mode is None else ("/drop" if mode else "/full"))
            seconds = dict.fromkeys(self.patch_sizes, 0.0)
            shared = [0]  # images of this rank's share, for its seconds per image
            targets, outcomes = self._results(trainer, model, dataset, mode, self._outcomes(mask_sets, seconds, shared))
            for p, m in enumerate(self.patch_sizes):
                metric = CertifiedAccuracy([m], sync_on_compute=False).to(targets.device)  # gathered already
                metric.update(correct=outcomes[:, p, 0] == targets, certified_flags=outcomes[:, p, 1:2].bool())
                values = metric.compute()
                results[f"{tag}/clean_m{m}"], results[f"{tag}/acc_m{m}"] = (float(values["acc"]),
                                                                            float(values[f"acc_m{m}"]))
            records[mode] = (targets.cpu(), outcomes.cpu(), {m: s / max(1, shared[0]) for m, s in seconds.items()})
        pl_module.log_dict(results, sync_dist=False)
        if trainer.is_global_zero:
            self._write(self.outputs(trainer), split, mask_sets, results, records)
        return results

    def _write(self, folder: Path, split, mask_sets, results, records) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        payload = {"certifier": "patchcleanser", "k": self.k, "masks": {m: len(r) for m, r in mask_sets.items()},
                   "metrics": results, "cases": list(CASES), "modes": {}}
        for mode, (targets, outcomes, seconds) in records.items():
            name = "model" if mode is None else ("token_dropping" if mode else "all_tokens")
            payload["modes"][name] = {
                "seconds_per_image": seconds,  # rank zero's share, per patch size
                "images": [{"index": i, "target": int(t),
                            **{f"m{m}": dict(zip(("prediction", "certified", "case"), row.tolist()))
                               for m, row in zip(self.patch_sizes, o)}}
                           for i, (t, o) in enumerate(zip(targets, outcomes))]}
        write_json_atomic(folder / f"{split}_records.json", payload)
