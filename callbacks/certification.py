"""Certify a split against adversarial patches at the end of validation/test (derandomized smoothing, thesis 001
§1.1.1, Eqs. 1.1–1.2), in any Lightning project.

The module only has to provide ``ablated_logits(images, masks[, token_dropping=...])`` → logits (N, A, K) for
[0, 1] images (N, C, H, W) under ablation masks (A, H, W) — ``lit_robust.SmoothedViT`` does. The callback shards the
split's images across DDP ranks (rank r takes images r, r + W, …), counts votes over the whole ablation set,
logs smoothed and certified accuracy through a torchmetrics metric (its sums sync across ranks, so the numbers equal
a single process's), gathers the per-image counts and, on rank zero, writes ``<dirpath>/<split>_records.json``
(index, target, prediction, margin, votes per image) and a certified-accuracy-vs-patch-size plot.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Subset
from torchmetrics.utilities.distributed import gather_all_tensors

from lit_robust.ablations import ablation_masks, ablation_positions
from lit_robust.callbacks.metrics_file import write_json_atomic
from lit_robust.certification import (CertifiedAccuracy, ablation_votes, certified_margin, patch_delta,
                                      smoothed_prediction)


class Certification(L.Callback):
    """Certified accuracy of a smoothed classifier for a list of patch sizes.

    Args:
        dirpath: where the records and plots go.
        patch_sizes: adversarial patch sides m to certify against.
        kind, width, stride: the ablation set; ``None`` reads ``ablation``, ``ablation_width``, ``ablation_stride``
            from the module's hparams.
        token_dropping: list of modes to certify in (e.g. ``[true, false]``: logs ``cert/<split>/drop/...`` and
            ``cert/<split>/full/...``); ``None``: the module's own mode only (``cert/<split>/...``).
        splits: ``val`` and/or ``test``.
        batch_size: images per call of ``ablated_logits`` (it batches the positions itself).
    """

    def __init__(self, dirpath: str, patch_sizes: Sequence[int] = (1, 2, 3, 4), kind: str | None = None,
                 width: int | None = None, stride: int | None = None,
                 token_dropping: Sequence[bool] | None = None, splits: Sequence[str] = ("test",),
                 batch_size: int = 64):
        bad = set(splits) - {"val", "test"}
        if bad:
            raise ValueError(f"Certification splits {sorted(bad)}: use 'val' and/or 'test'")
        self.dirpath = Path(dirpath)
        self.patch_sizes = list(patch_sizes)
        self.kind, self.width, self.stride = kind, width, stride
        self.token_dropping = list(token_dropping) if token_dropping is not None else None
        self.splits, self.batch_size = list(splits), batch_size

    def _ablation_set(self, pl_module: L.LightningModule, size: tuple[int, int]) -> tuple[str, int, int, torch.Tensor]:
        hp = getattr(pl_module, "hparams", {})
        kind, width = self.kind or hp.get("ablation"), self.width or hp.get("ablation_width")
        stride = self.stride or hp.get("ablation_stride", 1)
        if kind is None or width is None:
            raise ValueError("Certification needs the ablation set: pass kind= and width= (the module has no "
                             "'ablation'/'ablation_width' hparams)")
        return kind, width, stride, ablation_masks(kind, ablation_positions(kind, size, width, stride), size, width)

    def _local_counts(self, trainer, pl_module, dataset, masks, token_dropping) -> tuple[torch.Tensor, ...]:
        """Votes of this rank's shard: (indices, targets, counts)."""
        indices = torch.arange(trainer.global_rank, len(dataset), trainer.world_size)
        loader = DataLoader(Subset(dataset, indices.tolist()), batch_size=self.batch_size, shuffle=False)
        kwargs = {} if token_dropping is None else {"token_dropping": token_dropping}
        classify = lambda x, m: pl_module.ablated_logits(x, m, **kwargs)  # noqa: E731
        targets, counts = [], []
        masks = masks.to(pl_module.device)
        for batch in loader:
            images = batch[0].to(pl_module.device)
            counts.append(ablation_votes(classify, images, masks, pl_module.hparams.num_classes))
            targets.append(torch.as_tensor(batch[1]).to(pl_module.device))
        empty = torch.zeros(0, pl_module.hparams.num_classes, dtype=torch.long, device=pl_module.device)
        return (indices.to(pl_module.device), torch.cat(targets) if targets else empty[:, 0],
                torch.cat(counts) if counts else empty)

    def certify(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str) -> dict[str, float]:
        """Certify one split; log and return the flat metrics."""
        if not hasattr(pl_module, "ablated_logits"):
            raise TypeError(f"{type(pl_module).__name__} has no ablated_logits(images, masks): Certification needs "
                            "a smoothed model such as lit_robust.SmoothedViT")
        dataset = getattr(trainer.datamodule, f"{split}_dataset", None)
        if dataset is None or len(dataset) == 0:
            raise ValueError(f"the datamodule has no {split}_dataset to certify: drop '{split}' from "
                             "Certification(splits=...)")
        size = tuple(dataset[0][0].shape[-2:])
        kind, width, stride, masks = self._ablation_set(pl_module, size)
        deltas = {m: patch_delta(masks, m) for m in self.patch_sizes}
        results, records = {}, {}
        for mode in self.token_dropping or [None]:
            tag = f"cert/{split}" + ("" if mode is None else ("/drop" if mode else "/full"))
            indices, targets, counts = self._local_counts(trainer, pl_module, dataset, masks, mode)
            metric = CertifiedAccuracy(deltas).to(pl_module.device)
            metric.update(counts, targets)
            for name, value in metric.compute().items():  # synced over ranks
                results[f"{tag}/{name}"] = float(value)
                pl_module.log(f"{tag}/{name}", float(value), sync_dist=False, rank_zero_only=False)
            if trainer.world_size > 1:  # every rank takes part; only rank zero writes
                indices, targets, counts = (torch.cat(gather_all_tensors(t)) for t in (indices, targets, counts))
            records[mode] = (indices, targets, counts)
        if trainer.is_global_zero:
            self._write(split, kind, width, stride, deltas, results, records)
        return results

    def _write(self, split, kind, width, stride, deltas, results, records) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        payload = {"ablation": kind, "width": width, "stride": stride, "deltas": deltas, "metrics": results,
                   "modes": {}}
        for mode, (indices, targets, counts) in records.items():
            order = indices.argsort()
            indices, targets, counts = indices[order].cpu(), targets[order].cpu(), counts[order].cpu()
            name = "model" if mode is None else ("token_dropping" if mode else "all_tokens")
            payload["modes"][name] = [
                {"index": int(i), "target": int(t), "prediction": int(p), "margin": int(g), "votes": c.tolist()}
                for i, t, p, g, c in zip(indices, targets, smoothed_prediction(counts), certified_margin(counts),
                                         counts)]
        write_json_atomic(self.dirpath / f"{split}_records.json", payload)
        self._plot(split, results)

    def _plot(self, split: str, results: dict[str, float]) -> None:
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
        fig.savefig(self.dirpath / f"{split}_certified_accuracy.png", dpi=120)
        plt.close(fig)

    def on_validation_epoch_end(self, trainer, pl_module):
        if "val" in self.splits and not trainer.sanity_checking:
            self.certify(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module):
        if "test" in self.splits:
            self.certify(trainer, pl_module, "test")
