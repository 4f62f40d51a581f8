"""A 3DB-style controlled-variation debugger for any digit classifier (thesis 001 ch. 6; Leclerc et al. 2022, "3DB:
a framework for debugging computer vision models"), in 2D: at the end of testing, the test split's digits are
rendered on a grid of controls — rotation × scale × stroke texture × corruption × background photograph — and the
model's accuracy is logged per control value, per pair of control values, per background (with the background's
complexity and the Spearman rank correlation of accuracy with complexity) and on backgrounds held out of training;
with ``cue_textures``, the shares of cue-conflict predictions (shape of class a, texture of class b) that follow
the shape or the texture.

Scenes are rendered in [0, 1] (:mod:`lit_robust.functional.scene_controls`) and handed to the model in the
loader's pixel space (``normalization``). Every rank renders and predicts its batches of the grid (noise seeded per
batch), the predictions are gathered in order, and every rank logs the single-process numbers.
"""
from __future__ import annotations

from typing import Sequence

import lightning as L
import torch
from torchmetrics.functional import spearman_corrcoef
from typing_extensions import override

from lit_robust.callbacks.contract import ContractCallback, evaluated_split, shard_map
from lit_robust.datasets import HELD_OUT_BACKGROUNDS, photo_backgrounds
from lit_robust.functional.scene_controls import (CONTROLS, NO_CORRUPTION, SceneControls, check_cue_textures,
                                                  conflicting_classes, control_grid, cue_decisions, grouped_accuracy,
                                                  pairwise_accuracy, sobel_complexity)


def value_name(value) -> str:
    """A control value as the logged keys spell it: ``45``, ``0.6``, ``stripes_h``."""
    return f"{value:g}" if isinstance(value, float) else str(value)


class ControlledVariationReport(ContractCallback):
    """Accuracy over a grid of rendered controls, logged as ``<prefix>/…`` at the end of every test epoch.

    Args:
        backgrounds: the scikit-image photographs whose crops are the sweep's backgrounds.
        crops_per_photo: fixed crops of each photograph (each crop is one background, named ``<photo>_<crop>``).
        seen_backgrounds: the photographs the model was trained on; the others count as held out.
        rotations, scales, textures, corruptions, severity: the grid's control values
            (:class:`~lit_robust.functional.scene_controls.SceneControls`).
        digits_per_cell: test digits (a seeded choice) rendered at every grid point.
        cue_textures: class c → its planted texture; with it, the cue-conflict scenes are rendered too.
        prefix: the logged keys' first part; batch_size: scenes per forward pass; seed: digits, crops and noise.
        split, item_keys, normalization: the split whose digits are rendered (default: the test loader's), the item
            format and the loader's pixel space (contract: :class:`ContractCallback`).
    """

    def __init__(self, backgrounds: Sequence[str] = HELD_OUT_BACKGROUNDS, crops_per_photo: int = 2,
                 seen_backgrounds: Sequence[str] = (), rotations: Sequence[float] = (-45, 0, 45),
                 scales: Sequence[float] = (0.6, 0.8, 1.0), textures: Sequence[str] = ("solid", "stripes_h", "checker"),
                 corruptions: Sequence[str] = (NO_CORRUPTION, "gaussian_noise", "gaussian_blur"), severity: int = 3,
                 digits_per_cell: int = 10, cue_textures: Sequence[str] | None = None, prefix: str = "controls",
                 batch_size: int = 256, seed: int = 0, split=None, item_keys: tuple | None = None,
                 normalization=None):
        super().__init__(split, item_keys, normalization)
        self.controls = SceneControls(rotations, scales, textures, corruptions, severity)
        if len(backgrounds) * crops_per_photo < 2:
            raise ValueError(f"{len(backgrounds)} background photographs × crops_per_photo={crops_per_photo}: the "
                             "complexity correlation needs at least 2 backgrounds")
        if cue_textures is not None:
            check_cue_textures(cue_textures, len(cue_textures))
        self.conflict_controls = None if cue_textures is None else SceneControls((0,), (1,), cue_textures)
        self.backgrounds, self.crops_per_photo = list(backgrounds), crops_per_photo
        self.seen_backgrounds = set(seen_backgrounds)
        self.digits_per_cell, self.prefix, self.batch_size, self.seed = digits_per_cell, prefix, batch_size, seed

    def state_key_fields(self) -> dict:
        return {"prefix": self.prefix}

    def digits(self, trainer: L.Trainer) -> tuple[torch.Tensor, torch.Tensor]:
        """``digits_per_cell`` digits of the split (a seeded choice) in [0, 1], and their labels."""
        images, labels = self.item_format.stack(evaluated_split(trainer, "test", self.split, type(self).__name__))
        chosen = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))[:self.digits_per_cell]
        return self.pixel_space.to_unit(images[chosen]), labels[chosen].long()

    def predictions(self, trainer: L.Trainer, pl_module: L.LightningModule, controls: SceneControls,
                    digits: torch.Tensor, backgrounds: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        """The predicted class of every scene ``factors[i]`` (control and background indices, then the digit's),
        rendered batch by batch on the rank that predicts it; the same on every rank."""
        model, device = self.pixel_space.on_unit(pl_module), pl_module.device

        def predict(rows: torch.Tensor, batch: torch.Tensor, _) -> dict[str, torch.Tensor]:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(rows[0]))
            scenes = controls.render(digits[batch[:, -1]], backgrounds, batch[:, :-1], generator)
            return {"predicted": model(scenes.to(device)).argmax(-1)}

        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            predicted = shard_map(trainer, factors, self.batch_size, predict)["predicted"]
        pl_module.train(was_training)
        return predicted.cpu()

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Every number of the report, the same on every rank."""
        digits, labels = self.digits(trainer)
        self.check_shape(digits, pl_module)
        if digits.shape[-1] != digits.shape[-2]:
            raise ValueError(f"{type(self).__name__} renders onto square photograph crops, but the split's images "
                             f"are {digits.shape[-2]}×{digits.shape[-1]}: resize them to a square in the DataModule")
        backgrounds, names = photo_backgrounds(self.backgrounds, self.crops_per_photo, digits.shape[-1], self.seed)
        grid = control_grid([*self.controls.sizes, len(backgrounds), len(digits)])
        correct = self.predictions(trainer, pl_module, self.controls, digits, backgrounds, grid) == labels[grid[:, -1]]
        metrics = {f"{self.prefix}/acc": correct.double().mean().item(),
                   **self.control_metrics(correct, grid),
                   **self.background_metrics(correct, grid[:, len(CONTROLS)], backgrounds, names)}
        if self.conflict_controls is not None:
            metrics |= self.cue_conflict_metrics(trainer, pl_module, digits, labels, backgrounds)
        return metrics

    def control_metrics(self, correct: torch.Tensor, grid: torch.Tensor) -> dict[str, float]:
        """Accuracy at each value of each control and at each pair of values of two controls."""
        values, metrics = self.controls.values, {}
        for first, name in enumerate(CONTROLS):
            accuracy = grouped_accuracy(correct, grid[:, first], len(values[name]))
            metrics |= {f"{self.prefix}/{name}={value_name(v)}/acc": a.item() for v, a in zip(values[name], accuracy)}
            for second, other in enumerate(CONTROLS[first + 1:], first + 1):
                table = pairwise_accuracy(correct, grid[:, first], grid[:, second], len(values[name]),
                                          len(values[other]))
                metrics |= {f"{self.prefix}/{name}={value_name(v)}/{other}={value_name(w)}/acc": table[i, j].item()
                            for i, v in enumerate(values[name]) for j, w in enumerate(values[other])}
        return metrics

    def background_metrics(self, correct: torch.Tensor, background: torch.Tensor, backgrounds: torch.Tensor,
                           names: list[str]) -> dict[str, float]:
        """Accuracy and complexity per background, their Spearman correlation, and accuracy on held-out and seen
        backgrounds."""
        accuracy, complexity = grouped_accuracy(correct, background, len(names)), sobel_complexity(backgrounds)
        metrics = {f"{self.prefix}/background={name}/{key}": value.item() for name, a, c in
                   zip(names, accuracy, complexity) for key, value in (("acc", a), ("complexity", c))}
        metrics[f"{self.prefix}/background/spearman_acc_complexity"] = spearman_corrcoef(
            complexity.double(), accuracy).item()
        seen = torch.tensor([name.rsplit("_", 1)[0] in self.seen_backgrounds for name in names])[background]
        for key, chosen in (("heldout_acc", ~seen), ("seen_acc", seen)):
            if chosen.any():
                metrics[f"{self.prefix}/background/{key}"] = correct[chosen].double().mean().item()
        return metrics

    def cue_conflict_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule, digits: torch.Tensor,
                             labels: torch.Tensor, backgrounds: torch.Tensor) -> dict[str, float]:
        """Each digit on each background, upright, at scale 1, uncorrupted, wearing another class's texture."""
        num_classes = len(self.conflict_controls.values["texture"])
        if labels.max() >= num_classes:
            raise ValueError(f"{type(self).__name__}: label {labels.max().item()} has no texture in cue_textures "
                             f"({num_classes} given): give one texture per class")
        cells = control_grid([len(backgrounds), len(digits)])
        texture_classes = conflicting_classes(labels[cells[:, 1]], num_classes)
        zeros = torch.zeros_like(texture_classes)
        factors = torch.stack([zeros, zeros, texture_classes, zeros, cells[:, 0], cells[:, 1]], 1)
        predicted = self.predictions(trainer, pl_module, self.conflict_controls, digits, backgrounds, factors)
        decisions = cue_decisions(predicted, labels[cells[:, 1]], texture_classes)
        return {f"{self.prefix}/cue_conflict/{key}": value for key, value in decisions.items()}

    @override
    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.log_dict(self.evaluate(trainer, pl_module), sync_dist=False)  # the gathered numbers
