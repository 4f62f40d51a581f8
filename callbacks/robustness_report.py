"""Robustness reports that compare the trained (generative) model with discriminative baselines on manipulated test
data: translation sweeps with and without test-time fine-tuning (deep CAMA §4.1, Fig. 7) and FGSM/PGD (§4.1,
Fig. 11).

The baselines are ordinary ``ImageClassifier`` modules trained in sequence inside the report (a nested ``Trainer``
on the same DataModule), so one run of ``train.py experiment=cama_digits_shift`` (or ``evaluate.py`` on a
checkpoint) yields the whole comparison. The report runs at the end of testing on global rank zero
(:class:`~lit_robust.callbacks.contract.RankZeroReport`); its numbers are logged through ``log_dict`` on every rank
(every logger, and ``metrics.json`` through ``MetricsFile``) and its curves saved as PNG in the output folder. The
splits are those the trainer's loops iterate (contract). Shifts and attacks act on images in [0, 1] (zeros are
black, ε is in [0, 1] pixels); every model — trained on the loader's images, as the baselines are — is handed them
back in the loader's pixel space (``normalization``).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Callable

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import Metric
from typing_extensions import override

from lit_robust.callbacks.contract import RankZeroReport, SplitRef, evaluated_split
from lit_robust.functional.attacks import fgsm, pgd_linf, random_sign
from lit_robust.functional.shifts import translate
from lit_robust.storage.cache import check_writable, fingerprint, load_verified, save_atomic
from lit_robust.storage.run_paths import expand_path

Predictor = Callable[[torch.Tensor], torch.Tensor]   # images → class log-probabilities or logits
FINE_TUNED_COPY = {"fine_tuned_copy": "(x_test, x_train, y_train) → a copy adapted to the unlabelled manipulated "
                                      "x_test (deep CAMA Eq. 8), images in the loader's space"}


def batched_predictions(predict: Predictor, images: torch.Tensor, batch_size: int = 100) -> torch.Tensor:
    """Predicted classes of all ``images``, ``batch_size`` at a time, without gradients."""
    with torch.no_grad():
        return torch.cat([predict(images[i:i + batch_size]).argmax(-1) for i in range(0, len(images), batch_size)])


def accuracy(predict: Predictor, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 100) -> float:
    """Top-1 accuracy in [0, 1]."""
    return (batched_predictions(predict, images, batch_size).cpu() == labels.cpu()).float().mean().item()


def shifted(images: torch.Tensor, direction: str, pixels: int) -> torch.Tensor:
    """Translate by ``pixels`` down (``vertical``) or right (``horizontal``)."""
    if direction == "vertical":
        return translate(images, dy=pixels)
    if direction == "horizontal":
        return translate(images, dx=pixels)
    raise ValueError(f"shift direction {direction!r}: use 'vertical' or 'horizontal'")


def fit_baselines(datamodule: L.LightningDataModule, images: torch.Tensor, specs: dict[str, dict], max_epochs: int,
                  seed: int, cache_dir: str | None = None) -> dict[str, L.LightningModule]:
    """Train one ``ImageClassifier(**spec)`` per name on ``datamodule`` (CPU/GPU as available, one device), reusing
    weights from ``cache_dir`` when the same spec, epochs, seed and training ``images`` were trained before."""
    from lit_robust.models.classifier import ImageClassifier

    models = {}
    for name, spec in specs.items():
        spec = dict(spec)
        epochs = int(spec.pop("max_epochs", max_epochs))
        L.seed_everything(seed, workers=True)  # before the initial weights: a baseline depends on the seed alone
        model = on_this_process_alone(ImageClassifier(**spec))
        path = Path(expand_path(str(cache_dir), "cache_dir")) / f"{name}-{fingerprint(spec, epochs, seed, images[:64], len(images))}.pt" \
            if cache_dir else None
        state = load_verified(path) if path else None
        if state is not None:
            model.load_state_dict(state)
        else:
            if path:  # before the training whose weights it would hold
                check_writable(path.parent, "the report's cache_dir")
            trainer = L.Trainer(max_epochs=epochs, devices=1, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False)
            trainer.fit(model, datamodule=datamodule)
            if path:
                save_atomic(path, model.state_dict())
        models[name] = model.eval()
    return models


def on_this_process_alone(model: L.LightningModule) -> L.LightningModule:
    """``model`` with its torchmetrics computed from this process's updates only: the report trains it on global rank
    zero alone, where a metric gathering from the other ranks of a DDP run would wait for them forever."""
    for metric in model.modules():
        if isinstance(metric, Metric):
            metric.distributed_available_fn = lambda: False
    return model


class RobustnessReport(RankZeroReport):
    """Base: after ``trainer.test``, train the baselines, evaluate everything on a fixed subset of the test split and
    log the numbers. Subclasses implement ``report``.

    Args:
        output_dir: where the PNGs go (default: the trainer's output folder).
        baselines: name → ``ImageClassifier`` keyword arguments (``max_epochs`` may override ``baseline_epochs``).
        eval_size: test images evaluated (the first of a seeded permutation; the rest can feed fine-tuning).
        split, train_split, item_keys, normalization: the test and train splits, the item format and the loader's
            pixel space (contract).
    """

    def __init__(self, output_dir: str | None = None, baselines: dict[str, dict] | None = None,
                 baseline_epochs: int = 10, eval_size: int = 1000, batch_size: int = 100, seed: int = 0,
                 cache_dir: str | None = None, split=None, train_split=None, item_keys: tuple | None = None,
                 normalization=None):
        super().__init__(split, item_keys, normalization, output_dir)
        self.baselines, self.train_split = baselines or {}, train_split
        self.baseline_epochs, self.eval_size, self.batch_size = baseline_epochs, eval_size, batch_size
        self.seed, self.cache_dir = seed, cache_dir

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.baselines and trainer.datamodule is None:
            raise RuntimeError(f"{type(self).__name__} trains its baselines {sorted(self.baselines)} on the "
                               "trainer's DataModule, but the trainer has none: pass datamodule= to the trainer's "
                               "fit/test, or baselines={}")

    def train_images(self, trainer: L.Trainer) -> tuple[torch.Tensor, torch.Tensor]:
        """The train split the loader iterates, stacked, in the loader's pixel space (what the models train on);
        refuses, before the baselines train on that loader, items they cannot read."""
        dataset = SplitRef(trainer, "train", self.train_split, type(self).__name__).dataset
        if self.baselines and isinstance(dataset[0], Mapping):
            raise TypeError(f"{type(self).__name__} trains its baselines (ImageClassifier) on the DataModule's train "
                            f"loader, which must give (image, label) batches, but its items are dicts with keys "
                            f"{sorted(dataset[0])}: make the train split yield (image, label) tuples, or pass "
                            "baselines={}")
        return self.item_format.stack(dataset)

    @override
    def run_report(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        images, labels = self.item_format.stack(evaluated_split(trainer, "test", self.split, type(self).__name__))
        images = self.pixel_space.to_unit(images)
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.seed))
        self.folder = self.outputs(trainer)
        train = self.train_images(trainer)
        baselines = fit_baselines(trainer.datamodule, train[0], self.baselines, self.baseline_epochs, self.seed,
                                  self.cache_dir)
        for model in baselines.values():
            model.to(pl_module.device)
        torch.manual_seed(self.seed)
        return self.report(pl_module, baselines, images[order], labels[order], train)

    def report(self, model, baselines, images, labels, train) -> dict[str, float]:
        """The metrics of ``model`` and the ``baselines`` on the ordered test ``images`` (in [0, 1]); ``train``: the
        train split (images in the loader's space, labels)."""
        raise NotImplementedError

    def _plot(self, curves: dict[str, dict[str, dict[float, float]]], xlabel: str, filename: str) -> None:
        """One panel per key of ``curves``, one line per model: accuracy against the manipulation strength."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 4), squeeze=False)
        for ax, (panel, lines) in zip(axes[0], curves.items()):
            for name, points in lines.items():
                xs = sorted(points)
                ax.plot(xs, [100 * points[x] for x in xs], marker="o", label=name)
            ax.set(title=panel, xlabel=xlabel, ylabel="test accuracy (%)", ylim=(0, 100))
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        self.folder.mkdir(parents=True, exist_ok=True)
        fig.savefig(self.folder / filename, dpi=120)
        plt.close(fig)


class ShiftRobustnessReport(RobustnessReport):
    """Accuracy against vertical and horizontal translations (seed 002 Fig. 7): every baseline, the generative model
    as trained (``<model_name>``), and after test-time fine-tuning (``<model_name>_ft``) on ``ft_fraction`` of the
    shifted test set — images disjoint from the evaluated ones, spread evenly over the non-zero shifts of a direction
    (one fine-tuned copy per direction; ``ft_per_shift`` fine-tunes one copy per shift as the paper's panels b/d).
    Also reports the clean accuracy of each fine-tuned copy (``.../<model_name>_ft_clean``).
    Keys: ``shift/<direction>_<s>px/<name>``; plot ``shift_accuracy.png``.
    """

    def __init__(self, output_dir: str | None = None, shifts: list[int] = (0, 1, 2, 3, 4, 5), ft_fraction: float = 0.1,
                 ft_per_shift: bool = False, directions: list[str] = ("vertical", "horizontal"),
                 model_name: str = "cama", **kwargs):
        super().__init__(output_dir, **kwargs)
        if not 0 < ft_fraction <= 0.5:
            raise ValueError(f"ft_fraction={ft_fraction}: use a fraction of the test set in (0, 0.5]")
        self.shifts, self.ft_fraction, self.ft_per_shift = list(shifts), ft_fraction, ft_per_shift
        self.directions, self.model_name = list(directions), model_name

    @override
    def required_methods(self) -> dict[str, str]:
        return FINE_TUNED_COPY

    def report(self, model, baselines, images, labels, train):
        train_x, train_y = train
        n_ft = int(self.ft_fraction * len(images))
        ft_pool, eval_x, eval_y = images[:n_ft], images[n_ft:][:self.eval_size], labels[n_ft:][:self.eval_size]
        predictors = {name: self.pixel_space.on_unit(b) for name, b in (baselines | {self.model_name: model}).items()}
        metrics, curves = {}, {}
        for direction in self.directions:
            lines = {name: {} for name in [*predictors, f"{self.model_name}_ft"]}
            for s in self.shifts:
                x = shifted(eval_x, direction, s).to(model.device)
                for name, predict in predictors.items():
                    lines[name][s] = accuracy(predict, x, eval_y, self.batch_size)
            nonzero = [s for s in self.shifts if s != 0]
            groups = [[s] for s in nonzero] if self.ft_per_shift else [nonzero]
            lines[f"{self.model_name}_ft"][0] = lines[self.model_name].get(0, float("nan"))
            for group in groups:
                chunks = ft_pool.chunk(len(group))
                x_ft = torch.cat([shifted(chunk, direction, s) for chunk, s in zip(chunks, group)])
                x_ft = self.pixel_space.from_unit(x_ft.to(model.device))
                tuned = self.pixel_space.on_unit(model.fine_tuned_copy(x_ft, train_x, train_y))
                for s in group:
                    x = shifted(eval_x, direction, s).to(model.device)
                    lines[f"{self.model_name}_ft"][s] = accuracy(tuned, x, eval_y, self.batch_size)
                tag = f"{direction}" + (f"_{group[0]}px" if self.ft_per_shift else "")
                metrics[f"shift/{tag}/{self.model_name}_ft_clean"] = accuracy(tuned, eval_x.to(model.device), eval_y,
                                                                              self.batch_size)
                metrics[f"shift/{tag}/ft_images"] = float(len(x_ft))
            for name, points in lines.items():
                for s, acc in points.items():
                    metrics[f"shift/{direction}_{s}px/{name}"] = acc
            curves[direction] = lines
        metrics["shift/eval_images"] = float(len(eval_x))
        self._plot(curves, "shift (pixels)", "shift_accuracy.png")
        return metrics


class AdversarialRobustnessReport(RobustnessReport):
    """Accuracy under FGSM and ℓ∞ PGD at each ε (seed 002 Fig. 11), white-box against each model: for the
    generative classifier the attacked loss is the cross-entropy of its Eq. 6 prediction with ``attack_samples``
    importance samples (the sampling noise makes this an expectation-over-randomness attack). ``noise`` (random ±ε
    per pixel) is the reference the attacks must beat: a model that random noise hurts more than an attack has a
    problem the attack does not find.

    With ``ft_size`` > 0 the generative model is also fine-tuned at test time (Eq. 8, as the paper's Fig. 11) on
    ``ft_size`` other test images attacked the same way, and that copy is evaluated on the attacked evaluation images
    (``<model_name>_ft``). The attacks are crafted against the model as trained: the copy meets them unseen.
    Keys: ``adv/<attack>_eps<ε>/<name>``; plot ``adversarial_accuracy.png``.
    """

    def __init__(self, output_dir: str | None = None, epsilons: list[float] = (0.1, 0.2, 0.3), attacks: list[str] = ("fgsm", "pgd"),
                 pgd_steps: int = 10, attack_samples: int = 2, model_name: str = "cama", ft_size: int = 0, **kwargs):
        super().__init__(output_dir, **kwargs)
        unknown = set(attacks) - {"noise", "fgsm", "pgd"}
        if unknown:
            raise ValueError(f"attacks {sorted(unknown)}: use 'noise', 'fgsm' and/or 'pgd'")
        self.epsilons, self.attacks, self.pgd_steps = list(epsilons), list(attacks), pgd_steps
        self.attack_samples, self.model_name, self.ft_size = attack_samples, model_name, ft_size

    @override
    def required_methods(self) -> dict[str, str]:
        attacked = {"predict_log_probs": "(x, num_samples) → class log-probabilities of the loader's images x, the "
                                         "attacked loss"}
        return attacked | FINE_TUNED_COPY if self.ft_size else attacked

    def _attacked(self, attack: str, loss_fn, x_all: torch.Tensor, y_all: torch.Tensor, eps: float) -> torch.Tensor:
        """``x_all`` attacked ``batch_size`` images at a time; ``loss_fn(x, y)`` is the per-sample loss to raise."""
        batches = []
        for i in range(0, len(x_all), self.batch_size):
            x, y = x_all[i:i + self.batch_size], y_all[i:i + self.batch_size]
            batch_loss = lambda v, y=y: loss_fn(v, y)
            if attack == "noise":
                batches.append(random_sign(x, eps))
            elif attack == "fgsm":
                batches.append(fgsm(batch_loss, x, eps))
            else:
                batches.append(pgd_linf(batch_loss, x, eps, steps=self.pgd_steps))
        return torch.cat(batches)

    def report(self, model, baselines, images, labels, train):
        x_all, y_all = images[:self.eval_size].to(model.device), labels[:self.eval_size].to(model.device)
        ft_x = images[self.eval_size:self.eval_size + self.ft_size].to(model.device)
        ft_y = labels[self.eval_size:self.eval_size + self.ft_size].to(model.device)
        train = train if self.ft_size else None
        predictors = {name: self.pixel_space.on_unit(b) for name, b in (baselines | {self.model_name: model}).items()}
        losses = {name: (lambda b: lambda x, y: F.cross_entropy(b(x), y, reduction="none"))(predictors[name])
                  for name in baselines}
        log_probs = self.pixel_space.on_unit(lambda x: model.predict_log_probs(x, self.attack_samples))
        losses[self.model_name] = lambda x, y: F.nll_loss(log_probs(x), y, reduction="none")
        metrics, curves = {}, {a: {name: {} for name in predictors} for a in self.attacks}
        for name, predict in predictors.items():
            clean = accuracy(predict, x_all, y_all, self.batch_size)
            for attack in self.attacks:
                curves[attack][name][0.0] = clean
                for eps in self.epsilons:
                    adv = self._attacked(attack, losses[name], x_all, y_all, eps)
                    curves[attack][name][eps] = accuracy(predict, adv, y_all, self.batch_size)
                    metrics[f"adv/{attack}_eps{eps:g}/{name}"] = curves[attack][name][eps]
                    if name == self.model_name and self.ft_size:
                        attacked_ft = self.pixel_space.from_unit(self._attacked(attack, losses[name], ft_x, ft_y, eps))
                        tuned = self.pixel_space.on_unit(model.fine_tuned_copy(attacked_ft, *train))
                        tuned_acc = accuracy(tuned, adv, y_all, self.batch_size)
                        curves[attack].setdefault(f"{name}_ft", {0.0: clean})[eps] = tuned_acc
                        metrics[f"adv/{attack}_eps{eps:g}/{name}_ft"] = tuned_acc
            metrics[f"adv/clean/{name}"] = clean
        metrics["adv/eval_images"] = float(len(x_all))
        self._plot(curves, "ε (ℓ∞, [0, 1] pixels)", "adversarial_accuracy.png")
        return metrics
