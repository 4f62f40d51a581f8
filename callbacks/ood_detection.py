"""``OODDetection``: threshold-free OOD metrics and fitted thresholds for any classifier or any LightningModule that
scores inputs.

Two ways to score. ``scores=["msp", "energy", "mahalanobis", "knn"]`` computes OpenOOD's post-hoc scores from the
classifier under test (or ``detector=``): MSP, max logit, energy, ODIN, Mahalanobis, KNN, ViM
(:class:`~lit_robust.functional.ood_scores.ClassifierOODScores`); the classifier takes the loader's images (the declared
``normalization`` redone), its features are the input of its last ``nn.Linear`` or ``feature_layer=``'s output, and
Mahalanobis / KNN / ViM are fitted on the features of the in-distribution ``fit_split`` ("train" by default, as the
papers; "val" for the split the thresholds use), extracted shard by shard as every other pass. Otherwise the module
has ``outlier_scores(images) -> {name: (B,) tensor}`` (higher = more likely OOD), and optionally
``fit_outlier_scores(inlier_scores)`` (called with the scores of the validation inliers, e.g. to set a reference
entropy) and ``encode(images) -> (mean, log_var)`` (enables the encoder attack). ``lit_robust.BayesianVAE`` has all
three. A module with neither is refused at ``on_test_start``, naming both options. Every score is oriented
**higher = more likely OOD**.

At the end of ``trainer.test`` the callback
1. scores the validation inliers and fits one threshold per score (the ``keep_inliers`` quantile: inputs above it
   are rejected, so about ``1 − keep_inliers`` of inliers are lost);
2. scores the test inliers and every outlier set — the datamodule's ``ood_test_dataset`` (or the ``ood_datasets``
   given), adversarial examples against the encoder (Eq. 5.1) and against a victim classifier (FGSM/PGD, ch. 5);
3. reports AUROC, AUPRC and FPR80 (thesis §3.3; outliers positive) and the rejection rate at the fitted threshold
   for every score and pair as ``ood/<table>/<pair>/<score>/<metric>`` in ``metrics.json`` (``<table>`` = the
   module's ``posterior`` hyperparameter when it has one), a markdown table and ID-vs-OOD histograms (PNG).

The detector is the module under test, or any ``detector=`` module with that protocol — so a fitted detector can
be dropped into a project that trains its own classifier. Splits, item format and pixel space follow
:mod:`lit_robust.callbacks.contract`: the detector and the attacks see [0, 1] images, whatever the loader's
``Normalize`` (declare it with ``normalization=``). Under DDP every rank scores and attacks its batches and the results
are gathered in order (:func:`shard_map`), so every rank computes the same metrics, those of one process; they are logged
through ``log_dict`` and rank zero writes the files. ``accept`` / ``FilteredClassifier`` put the fitted detector in
front of any classifier.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import Dataset, Subset
from typing_extensions import override

from lit_robust.callbacks.contract import ContractCallback, SplitRef, evaluated_split, shard_map
from lit_robust.functional.ood_adversarial import classifier_attack, encoder_attack
from lit_robust.functional.ood_scores import (FITTED_SCORES, ClassifierOODScores, check_classifier_scores,
                                              detection_metrics)


def fit_victim(images: torch.Tensor, labels: torch.Tensor, num_classes: int, epochs: int, seed: int) -> nn.Module:
    """A small CNN classifier (``ImageClassifier`` with ``small_cnn``) trained on [0, 1] ``images`` with Adam; the
    victim whose adversarial examples the detector must catch (the thesis uses Cleverhans' default classifier)."""
    from lit_robust.models.classifier import ImageClassifier, train_on_tensors

    in_chans = images.shape[1]
    if (labels < 0).any():
        raise ValueError("the inlier training set has no class labels (targets −1): a victim classifier needs them; "
                         "set callbacks.ood_detection.victim=null or use labelled inliers")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = ImageClassifier(backbone="small_cnn", num_classes=num_classes, in_chans=in_chans)
    return train_on_tensors(images, labels, num_classes, model=model, epochs=epochs, lr=2e-3, weight_decay=0.0,
                            max_shift=0, cosine_schedule=False, generator=torch.Generator().manual_seed(seed),
                            progress=False)


def accept(scores: dict[str, torch.Tensor], thresholds: dict[str, float], score: str) -> torch.Tensor:
    """Boolean mask of inputs whose ``score`` is at most its fitted threshold (treated as in-distribution)."""
    if score not in thresholds:
        raise KeyError(f"no fitted threshold for score {score!r}; have {sorted(thresholds)}")
    return scores[score] <= thresholds[score]


class FilteredClassifier(nn.Module):
    """Any classifier behind a fitted OOD detector: ``forward`` returns ``(logits, accepted)`` where ``accepted`` is
    False for inputs the detector flags as out-of-distribution or adversarial (thesis ch. 5's filtering layer)."""

    def __init__(self, classifier: nn.Module, detector: nn.Module, thresholds: dict[str, float],
                 score: str = "std_ll"):
        super().__init__()
        self.classifier, self.detector, self.thresholds, self.score = classifier, detector, dict(thresholds), score

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            mask = accept(self.detector.outlier_scores(images), self.thresholds, self.score)
        return self.classifier(images), mask


class OODDetection(ContractCallback):
    """Fit thresholds on validation inliers; report AUROC/AUPRC/FPR80 per score and outlier set after testing.

    Args:
        output_dir: where ``ood_<table>.md`` and ``ood_<table>_<pair>.png`` go (default: the trainer's output folder).
        ood_datasets: ``{name: dataset}`` of outliers, items and pixel space as the loader's (default: the
            datamodule's ``ood_test_datasets``, else its ``ood_test_dataset``).
        keep_inliers: quantile of the validation inlier scores used as threshold.
        encoder_eps, classifier_eps: ℓ∞ budgets of the encoder attack (Eq. 5.1) and the classifier attack;
            None skips that attack. ``attack_count`` test inliers are attacked.
        classifier_attack_method: ``fgsm`` or ``pgd``.
        victim: ``"train"`` (fit a small CNN on the labelled inlier training set for ``victim_epochs``), a path to
            an ``ImageClassifier`` checkpoint, or None.
        restoration_steps, restoration_step_size: Algorithm 2 (ch. 5) when the detector has ``restoration_gain``:
            the SSIM gain of a latent Langevin re-evaluation on ``attack_count`` images of every set, reported as its
            mean and as the AUROC separating each adversarial set from each OOD set (0 steps: skipped).
        filter_score: the score ``accept``/``FilteredClassifier`` use by default.
        detector: the scoring module (default: the module under test).
        scores: post-hoc scores of the classifier (the module under test, or ``detector``) from
            :data:`~lit_robust.functional.ood_scores.CLASSIFIER_SCORES`, instead of its own ``outlier_scores``.
        feature_layer: the module (name in ``named_modules()``) whose output is the feature for Mahalanobis, KNN and
            ViM (default: the input of the last ``nn.Linear``).
        fit_split: ``"train"`` or ``"val"``: the inliers whose features fit Mahalanobis, KNN and ViM.
        score_options: keyword arguments of :class:`~lit_robust.functional.ood_scores.ClassifierOODScores`
            (``energy_temperature``, ``odin_temperature``, ``odin_epsilon``, ``knn_k``, ``vim_dim``).
        val_split, test_split, train_split: DataModule attributes (or callables) of the inlier splits (default: the
            loaders' datasets; the train split feeds the victim and, with ``fit_split="train"``, the fitted scores).
        item_keys, normalization: the loader's item format and normalisation (contract).
    """

    def __init__(self, output_dir: str | None = None, ood_datasets: dict[str, Dataset] | None = None,
                 keep_inliers: float = 0.95, batch_size: int = 250, encoder_eps: float | None = 0.1,
                 classifier_eps: float | None = 0.2, classifier_attack_method: str = "fgsm",
                 attack_count: int = 500, attack_steps: int = 20, victim: str | None = "train",
                 victim_epochs: int = 5, restoration_steps: int = 20, restoration_step_size: float = 0.3,
                 filter_score: str = "std_ll", histograms: bool = True, seed: int = 0,
                 detector: nn.Module | None = None, scores: Sequence[str] | None = None,
                 feature_layer: str | None = None, fit_split: str = "train", score_options: dict | None = None,
                 val_split=None, test_split=None, train_split=None, item_keys: tuple | None = None,
                 normalization=None):
        super().__init__(None, item_keys, normalization, output_dir)
        if not 0.0 < keep_inliers < 1.0:
            raise ValueError(f"keep_inliers={keep_inliers}: use a quantile in (0, 1), e.g. 0.95")
        if scores is not None:
            check_classifier_scores(scores, score_options)
        if fit_split not in ("train", "val"):
            raise ValueError(f"fit_split={fit_split!r}: use 'train' (the papers' choice) or 'val'")
        self.scores, self.feature_layer, self.fit_split = scores, feature_layer, fit_split
        self.score_options = dict(score_options or {})
        self.scorer: nn.Module | None = None
        self.ood_datasets = ood_datasets
        self.keep_inliers, self.batch_size = keep_inliers, batch_size
        self.encoder_eps, self.classifier_eps = encoder_eps, classifier_eps
        self.classifier_attack_method, self.attack_count, self.attack_steps = (classifier_attack_method,
                                                                               attack_count, attack_steps)
        self.victim, self.victim_epochs = victim, victim_epochs
        self.restoration_steps, self.restoration_step_size = restoration_steps, restoration_step_size
        self.filter_score, self.histograms, self.seed = filter_score, histograms, seed
        self.detector, self.val_split, self.test_split, self.train_split = detector, val_split, test_split, train_split
        self.thresholds: dict[str, float] = {}
        self.results: dict[str, float] = {}

    @override
    def state_key_fields(self) -> dict:
        return {"keep_inliers": self.keep_inliers, "scores": self.scores}  # beside a detector's OODDetection

    @override
    def state_dict(self) -> dict:
        return {"thresholds": dict(self.thresholds)}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        self.thresholds = dict(state_dict.get("thresholds", {}))

    # ---- scoring --------------------------------------------------------------------------------------------------
    @override
    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.scorer = self.resolve_scorer(pl_module)

    def resolve_scorer(self, pl_module: nn.Module) -> nn.Module:
        """The module whose ``outlier_scores`` are evaluated: the classifier's post-hoc scores when ``scores`` is set,
        else ``detector`` or the module under test; refused (naming both options) when it cannot score inputs."""
        model = self.detector or pl_module
        if self.scores is not None:
            return ClassifierOODScores(model, self.scores, self.feature_layer, self.pixel_space.from_unit,
                                       **self.score_options)
        if not hasattr(model, "outlier_scores"):
            raise TypeError(f"OODDetection: {type(model).__name__} has no outlier_scores(images): pass "
                            "scores=['msp', 'energy', 'mahalanobis', 'knn'] for the post-hoc scores of this classifier, "
                            "or detector= a module that scores inputs (e.g. a fitted lit_robust.BayesianVAE)")
        return model

    def gather(self, trainer: L.Trainer, data: Dataset | torch.Tensor,
               compute: Callable[[torch.Tensor, torch.Tensor | None], dict[str, torch.Tensor]]) -> dict:
        """``compute([0, 1] images, targets)`` over a dataset (loader space) or over [0, 1] images (targets None),
        shared out over ranks and gathered in order (:func:`shard_map`; the same result on every rank)."""
        device = trainer.strategy.root_device

        def compute_batch(rows, images, targets):
            unit = images if isinstance(data, torch.Tensor) else self.pixel_space.to_unit(images)
            return compute(unit.to(device), None if targets is None else targets.to(device))

        with torch.no_grad():
            return shard_map(trainer, data, self.batch_size, compute_batch, self.item_format)

    def score(self, trainer: L.Trainer, detector: nn.Module, data: Dataset | torch.Tensor) -> dict:
        """All scores of a dataset (loader space) or of [0, 1] images, gathered in order on every rank (CPU)."""
        scores = self.gather(trainer, data, lambda images, _: {name: value.float() for name, value in
                                                                detector.outlier_scores(images).items()})
        return {name: value.cpu() for name, value in scores.items()}

    def fit_classifier_scores(self, trainer: L.Trainer, scorer: ClassifierOODScores) -> None:
        """Mahalanobis / KNN / ViM statistics from the features of the ``fit_split`` inliers (every rank extracts its
        share; all ranks fit on the same gathered features)."""
        split = {"train": self.train_split, "val": self.val_split}[self.fit_split]
        dataset = SplitRef(trainer, self.fit_split, split, "OODDetection (inliers fitting Mahalanobis/KNN/ViM)").dataset

        def features(images: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
            values, logits = scorer.features_and_logits(images)
            return {"features": values.float(), "logits": logits.float(), "labels": targets.long()}

        fit = self.gather(trainer, dataset, features)
        scorer.fit(fit["features"], fit["logits"], fit["labels"])

    def unit_images(self, data: Dataset | torch.Tensor, count: int | None = None) -> torch.Tensor:
        """The first ``count`` images of a dataset or tensor, in [0, 1]."""
        if isinstance(data, torch.Tensor):
            return data[:count]
        subset = Subset(data, range(min(count or len(data), len(data))))
        return self.pixel_space.to_unit(self.item_format.stack(subset)[0])

    def fit(self, trainer: L.Trainer, detector: nn.Module, dataset: Dataset) -> dict:
        """Score validation inliers (after the detector's own fit hook) and set ``thresholds``."""
        scores = self.score(trainer, detector, dataset)
        if hasattr(detector, "fit_outlier_scores"):
            detector.fit_outlier_scores(scores)
            scores = self.score(trainer, detector, dataset)
        self.thresholds = {name: torch.quantile(value, self.keep_inliers).item() for name, value in scores.items()}
        return scores

    def adversarial_sets(self, trainer: L.Trainer, detector: nn.Module, inliers: Dataset) -> dict[str, torch.Tensor]:
        """[0, 1] adversarial versions of the first ``attack_count`` test inliers (:func:`shard_map`; the encoder
        attack's random start of image i is the i-th of one stream seeded ``seed``, whatever the batches and ranks)."""
        subset = Subset(inliers, range(min(self.attack_count, len(inliers))))
        victim = None
        if self.classifier_eps is not None and self.victim is not None:
            with torch.inference_mode(False), torch.enable_grad():  # the victim may be trained here
                victim = self._victim(trainer).to(trainer.strategy.root_device)
        encoder = f"adv_encoder_pgd{self.encoder_eps:g}" if self.encoder_eps is not None else ""
        classifier = (f"adv_classifier_{self.classifier_attack_method}{self.classifier_eps:g}" if victim is not None
                      else "")

        def attack(x: torch.Tensor, y: torch.Tensor, first: int) -> dict[str, torch.Tensor]:
            out = {}
            with torch.inference_mode(False), torch.enable_grad():
                x, y = x.clone(), y.clone()
                if encoder and hasattr(detector, "encode"):
                    generator = torch.Generator().manual_seed(self.seed)  # random_start draws on the CPU
                    torch.rand(first * x[0].numel(), generator=generator)  # past the earlier images' starts
                    out[encoder] = encoder_attack(detector.encode, x, self.encoder_eps, self.attack_steps,
                                                  generator=generator).detach()
                if victim is not None:
                    adv = classifier_attack(victim, x, y.clone(), self.classifier_eps, self.classifier_attack_method,
                                            self.attack_steps).detach()
                    with torch.no_grad():
                        out["victim_correct"] = torch.stack([(victim(x).argmax(-1) == y),
                                                             (victim(adv).argmax(-1) == y)], 1).float()
                    out[classifier] = adv
            return out

        out = shard_map(trainer, subset, self.batch_size, lambda rows, images, targets: attack(
            self.pixel_space.to_unit(images.to(trainer.strategy.root_device)),
            targets.to(trainer.strategy.root_device), int(rows[0])), self.item_format)
        if "victim_correct" in out:
            self.results["adv/victim_clean_acc"], self.results["adv/victim_adv_acc"] = \
                out.pop("victim_correct").mean(0).tolist()
        return {name: adv.cpu() for name, adv in out.items()}

    def _victim(self, trainer: L.Trainer) -> nn.Module:
        if self.victim == "train":
            dm = trainer.datamodule
            dataset = SplitRef(trainer, "train", self.train_split, "OODDetection's victim").dataset
            images, labels = self.item_format.stack(dataset)
            return fit_victim(self.pixel_space.to_unit(images), labels, getattr(dm, "num_classes", None) or
                              int(labels.max()) + 1, self.victim_epochs, self.seed)
        from lit_robust.models.classifier import ImageClassifier
        from lit_robust.storage.serialization import load_plain

        load_plain(self.victim, "victim checkpoint", mmap=True)  # refuses a file that would run code, naming it
        return ImageClassifier.load_from_checkpoint(self.victim, map_location="cpu", weights_only=True).eval()

    def restoration_gain(self, trainer: L.Trainer, detector: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Algorithm 2's SSIM gain of a batch of [0, 1] images."""
        with torch.inference_mode(False), torch.enable_grad():
            gain = detector.restoration_gain(images.clone().to(trainer.strategy.root_device), self.restoration_steps,
                                             self.restoration_step_size)
        return gain.detach().float()

    def restoration_report(self, trainer: L.Trainer, detector: nn.Module, table: str,
                           sets: dict[str, Dataset | torch.Tensor]) -> dict[str, float]:
        """Algorithm 2's second stage: mean SSIM gain per set and the gain's AUROC for adversarial vs OOD sets."""
        gains = {}
        for pair, data in sets.items():
            gains[pair] = shard_map(trainer, self.unit_images(data, self.attack_count), self.batch_size,
                                    lambda rows, images, _: {"gain": self.restoration_gain(trainer, detector, images)}
                                    )["gain"].cpu()
        out = {f"ood/{table}/{pair}/restoration_gain": g.mean().item() for pair, g in gains.items()}
        for adv in (p for p in gains if p.startswith("adv_")):
            for ood in (p for p in gains if p != "inliers" and not p.startswith("adv_")):
                out[f"ood/{table}/{adv}_vs_{ood}/gain_auroc"] = detection_metrics(gains[ood], gains[adv])["auroc"]
        return out

    # ---- the hook -------------------------------------------------------------------------------------------------
    @override
    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        detector = (self.scorer or self.resolve_scorer(pl_module)).to(trainer.strategy.root_device).eval()
        test = evaluated_split(trainer, "test", self.test_split, "OODDetection (test inliers)")
        val = SplitRef(trainer, "val", self.val_split, "OODDetection (validation inliers for the thresholds)").dataset
        self.check_shape(self.unit_images(test, 1), detector, "detector")
        outliers: dict[str, Dataset | torch.Tensor] = dict(self.ood_datasets or getattr(dm, "ood_test_datasets", None)
                                                           or {})
        if not outliers and getattr(dm, "ood_test_dataset", None) is not None:
            outliers["ood"] = dm.ood_test_dataset
        if not outliers and not (self.encoder_eps or self.classifier_eps):
            raise ValueError("OODDetection has no outlier set: pass ood_datasets={name: dataset} or enable an attack")
        table = str(getattr(detector, "hparams", {}).get("posterior", "scores"))
        if isinstance(detector, ClassifierOODScores) and set(detector.scores) & set(FITTED_SCORES):
            self.fit_classifier_scores(trainer, detector)
        self.fit(trainer, detector, val)
        inlier = self.score(trainer, detector, test)
        self.results[f"ood/{table}/inliers/count"] = float(len(next(iter(inlier.values()))))
        outliers.update(self.adversarial_sets(trainer, detector, test))
        folder = self.outputs(trainer)
        rows = {}
        for pair, data in outliers.items():
            scores = self.score(trainer, detector, data)
            rows[pair] = {}
            for name, value in scores.items():
                metrics = detection_metrics(inlier[name], value)
                metrics["rejected"] = (value > self.thresholds[name]).float().mean().item()
                rows[pair][name] = metrics
                for key, number in metrics.items():
                    self.results[f"ood/{table}/{pair}/{name}/{key}"] = number
            self.results[f"ood/{table}/{pair}/count"] = float(len(next(iter(scores.values()))))
            if self.histograms and trainer.is_global_zero:
                save_histograms(inlier, scores, folder / f"ood_{table}_{pair}.png", f"{table}: inliers vs {pair}")
        for name, value in self.thresholds.items():
            self.results[f"ood/{table}/threshold/{name}"] = value
        if self.restoration_steps and hasattr(detector, "restoration_gain"):
            self.results.update(self.restoration_report(trainer, detector, table, {"inliers": test, **outliers}))
        pl_module.log_dict(self.results, sync_dist=False)  # identical on every rank (gathered scores)
        if trainer.is_global_zero:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"ood_{table}.md").write_text(markdown_table(table, rows))


def markdown_table(table: str, rows: dict[str, dict[str, dict[str, float]]]) -> str:
    """One markdown table per outlier set: scores × (AUROC, AUPRC = AUPR-Out, AUPR-In, FPR80, FPR95, rejected at
    threshold), in percent."""
    lines = []
    for pair, scores in rows.items():
        lines += [f"### {table}: inliers vs {pair}", "",
                  "| score | AUROC | AUPRC (out) | AUPR-In | FPR80 | FPR95 | rejected |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {name} | {m['auroc'] * 100:.2f} | {m['auprc'] * 100:.2f} | {m['aupr_in'] * 100:.2f} | "
                  f"{m['fpr80'] * 100:.2f} | {m['fpr95'] * 100:.2f} | {m['rejected'] * 100:.1f} |"
                  for name, m in scores.items()]
        lines.append("")
    return "\n".join(lines)


def save_histograms(inlier: dict[str, torch.Tensor], outlier: dict[str, torch.Tensor], path: Path,
                    title: str) -> None:
    """ID-vs-OOD histograms of every score in one PNG (as the thesis' Fig. 3.1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(inlier)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        both = torch.cat([inlier[name], outlier[name]])
        low, high = torch.quantile(both, 0.005).item(), torch.quantile(both, 0.995).item()
        bins = torch.linspace(low, high if high > low else low + 1.0, 41).numpy()
        # one polygon per histogram (stepfilled), not one patch per bar: drawing cost stays small
        ax.hist(inlier[name].numpy(), bins=bins, alpha=0.6, label="ID", density=True, histtype="stepfilled")
        ax.hist(outlier[name].numpy(), bins=bins, alpha=0.6, label="OOD", density=True, histtype="stepfilled")
        ax.set_title(name, fontsize=9)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.1, top=0.8, wspace=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
