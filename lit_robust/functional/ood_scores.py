"""Out-of-distribution scores of an ensemble of likelihoods (thesis 004, ch. 3 Eqs. 3.3, 3.14–3.19; ch. 4/5 hole
indicator Eq. 5.20), the post-hoc scores of any classifier that OpenOOD compares (MSP, max logit, energy, ODIN,
Mahalanobis, KNN, ViM; :class:`ClassifierOODScores`) and the threshold-free detection metrics of §3.3 (AUROC, AUPRC,
FPR80) with OpenOOD's FPR95 and AUPR-In.

Every score takes the log-likelihoods ``log_liks`` of shape (N, B): ``log p(x_b | θ_n)`` for N posterior draws θ_n
(or, for a classical VAE, N independent importance-sampled estimates with one θ — ch. 5) and B inputs.
Likelihoods stay in log space throughout: ``p(x|θ)`` of a 256-pixel image underflows float32.

``outlier_scores`` and every classifier score orient the score so that **higher means more likely
out-of-distribution** (the papers' in-distribution scores negated); the metrics take OOD as the positive class.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics.functional.classification import binary_auroc, binary_average_precision, binary_roc


def importance_sampled_log_likelihood(log_px_z: torch.Tensor, log_pz: torch.Tensor,
                                      log_qz_x: torch.Tensor) -> torch.Tensor:
    """Eq. 3.3: ``log p_θ(x) ≈ log (1/S) Σ_s p_θ(x|z_s) p(z_s) / q_φ(z_s|x)`` with ``z_s ~ q_φ(z|x)``.

    The terms are shaped (..., S, B); the importance-sample axis is -2. Computed with logsumexp.
    """
    log_w = log_px_z + log_pz - log_qz_x
    return torch.logsumexp(log_w, dim=-2) - math.log(log_w.shape[-2])


def normalised_likelihoods(log_liks: torch.Tensor) -> torch.Tensor:
    """The weights ``w_θ = p(x|θ) / Σ_θ' p(x|θ')`` of Eqs. 3.16 and 3.18: a softmax over the draws (dim 0)."""
    return torch.softmax(log_liks, dim=0)


def expected_log_likelihood(log_liks: torch.Tensor) -> torch.Tensor:
    """Eq. 3.14: ``log E_θ[p(x|θ)] ≈ log (1/N) Σ_n p(x|θ_n)`` — the ensemble's (posterior predictive) log-likelihood."""
    return torch.logsumexp(log_liks, dim=0) - math.log(log_liks.shape[0])


def waic(log_liks: torch.Tensor) -> torch.Tensor:
    """Eq. 3.15: ``WAIC(x) = E_θ[log p(x|θ)] − Var_θ[log p(x|θ)]``.

    The thesis writes the equation with likelihoods; like the work it cites ([22], Choi et al. 2018) we use
    log-likelihoods, because likelihoods of images underflow and their variance is dominated by the largest draw.
    """
    return log_liks.mean(0) - log_liks.var(0, unbiased=True)


def typicality_test(log_liks: torch.Tensor, model_entropy: float | torch.Tensor) -> torch.Tensor:
    """Eq. 3.17 for one-element sequences (M = 1, as in the thesis): ``|−log p(x) − H[p(x; θ)]|``.

    ``log p(x)`` is the ensemble's Eq. 3.14 estimate; ``model_entropy`` estimates ``H`` as the mean negative
    log-likelihood of held-out inliers (Nalisnick et al. 2019 use training data; validation inliers avoid the
    optimistic bias of the training set). Larger = further from the typical set.
    """
    return (-expected_log_likelihood(log_liks) - model_entropy).abs()


def disagreement_score(log_liks: torch.Tensor) -> torch.Tensor:
    """Eq. 3.16: ``D_Θ[x] = 1 / Σ_θ w_θ²`` — the effective number of draws that agree (N when all agree, 1 when one
    dominates). Low = models disagree = OOD."""
    return 1.0 / normalised_likelihoods(log_liks).pow(2).sum(0)


def likelihood_entropy(log_liks: torch.Tensor) -> torch.Tensor:
    """Eq. 3.18: ``H_Θ[x] = −Σ_θ w_θ log w_θ`` — entropy of the normalised likelihoods. Low = OOD."""
    log_w = torch.log_softmax(log_liks, dim=0)
    return -(log_w.exp() * log_w).sum(0)


def std_of_log_likelihoods(log_liks: torch.Tensor) -> torch.Tensor:
    """Eq. 3.19 (= Eq. 5.19): sample standard deviation (1/(N−1)) of ``log p(x|θ)`` across the draws. High = OOD."""
    return log_liks.std(0, unbiased=True)


def hole_indicator(log_px_z: torch.Tensor) -> torch.Tensor:
    """Eq. 5.20 (ch. 4 §4.4.5): ``Σ_z[x]``, the sample standard deviation of the decoder term ``log p(x|z)`` over
    latent codes ``z ~ q_φ(z|x)`` — how far apart nearby codes decode; high = the code lies in a latent hole.

    ``log_px_z`` is (..., S, B); with leading posterior draws the per-draw indicators are averaged.
    """
    std = log_px_z.std(-2, unbiased=True)
    return std.reshape(-1, std.shape[-1]).mean(0)


SCORE_NAMES = ("expected_ll", "waic", "typicality", "disagreement", "entropy", "std_ll", "hole_indicator")


def outlier_scores(log_liks: torch.Tensor, log_px_z: torch.Tensor | None = None,
                   model_entropy: float | torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Every score of ch. 3–5 for B inputs, each oriented so that higher = more likely OOD.

    Scores whose inlier direction is "high" (expected LL, WAIC, disagreement, entropy) are negated. ``typicality``
    needs ``model_entropy`` and ``hole_indicator`` needs the per-sample decoder terms; each is left out without it.
    """
    if log_liks.dim() != 2 or log_liks.shape[0] < 2:
        raise ValueError(f"log_liks has shape {tuple(log_liks.shape)}: expected (N draws ≥ 2, B inputs); "
                         "raise num_draws to at least 2")
    scores = {
        "expected_ll": -expected_log_likelihood(log_liks),
        "waic": -waic(log_liks),
        "disagreement": -disagreement_score(log_liks),
        "entropy": -likelihood_entropy(log_liks),
        "std_ll": std_of_log_likelihoods(log_liks),
    }
    if model_entropy is not None:
        scores["typicality"] = typicality_test(log_liks, model_entropy)
    if log_px_z is not None:
        scores["hole_indicator"] = hole_indicator(log_px_z)
    return {name: scores[name] for name in SCORE_NAMES if name in scores}


def to_unit_interval(scores: torch.Tensor) -> torch.Tensor:
    """Dense ranks scaled to [0, 1]: an exact monotone map (ties kept) so torchmetrics' binary metrics read the
    scores as probabilities — it passes values outside [0, 1] through a sigmoid, which saturates (float32 sigmoid
    of any score above ~17 is 1.0) and turns large log-likelihood scores into ties."""
    unique, inverse = torch.unique(scores, return_inverse=True)
    return inverse.double() / max(len(unique) - 1, 1)


def fpr_at_tpr(scores: torch.Tensor, is_outlier: torch.Tensor, tpr: float = 0.8) -> torch.Tensor:
    """FPR80 of §3.3: the false-positive rate at the first threshold reaching ``tpr`` true-positive rate
    (outliers positive)."""
    fpr, tpr_curve, _ = binary_roc(to_unit_interval(scores), is_outlier.long())
    return fpr[torch.nonzero(tpr_curve >= tpr)[0, 0]]


def detection_metrics(inlier_scores: torch.Tensor, outlier_scores_: torch.Tensor) -> dict[str, float]:
    """One score separating inliers (0) from outliers (1): the thesis' AUROC, AUPRC and FPR80 (§3.3, outliers
    positive; AUPRC is OpenOOD's AUPR-Out) and OpenOOD's FPR95 (FPR at 95 % TPR, outliers positive) and AUPR-In
    (inliers positive, the score negated)."""
    scores = torch.cat([inlier_scores, outlier_scores_]).float()
    if not torch.isfinite(scores).all():
        raise ValueError("non-finite OOD scores: the log-likelihoods overflowed; check the decoder's outputs")
    labels = torch.cat([torch.zeros(len(inlier_scores)), torch.ones(len(outlier_scores_))]).long()
    unit = to_unit_interval(scores)
    return {"auroc": binary_auroc(unit, labels).item(),
            "auprc": binary_average_precision(unit, labels).item(),
            "aupr_in": binary_average_precision(1 - unit, 1 - labels).item(),
            "fpr80": fpr_at_tpr(scores, labels).item(),
            "fpr95": fpr_at_tpr(scores, labels, 0.95).item()}


# ---- post-hoc scores of any classifier (OpenOOD's baselines), oriented higher = more likely OOD --------------------
def msp_score(logits: torch.Tensor) -> torch.Tensor:
    """Hendrycks & Gimpel 2017, "A baseline for detecting misclassified and out-of-distribution examples in neural
    networks": the maximum softmax probability, negated (float64, so that nearly flat softmaxes keep their order)."""
    return -torch.softmax(logits.double(), -1).amax(-1)


def max_logit_score(logits: torch.Tensor) -> torch.Tensor:
    """Hendrycks et al. 2022, "Scaling out-of-distribution detection for real-world settings": the largest logit,
    negated."""
    return -logits.double().amax(-1)


def energy_score(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Liu et al. 2020, "Energy-based out-of-distribution detection", Eq. 1: the free energy
    ``E(x; f) = −T · logsumexp(f(x) / T)`` (their in-distribution score is −E)."""
    return -temperature * torch.logsumexp(logits.double() / temperature, -1)


def odin_inputs(classify: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, temperature: float,
                epsilon: float) -> torch.Tensor:
    """Liang et al. 2018, "Enhancing the reliability of out-of-distribution image detection in neural networks",
    Eq. 2: ``x̃ = x − ε · sign(−∇ₓ log S_ŷ(x; T))``, the step that raises the temperature-scaled softmax score of the
    predicted class ŷ. ``classify`` maps ``images`` to logits; the step is taken in the space of ``images``."""
    with torch.inference_mode(False), torch.enable_grad():
        x = images.detach().clone().requires_grad_(True)
        logits = classify(x) / temperature
        negative_log_score = F.cross_entropy(logits, logits.argmax(-1), reduction="sum")  # −Σ_b log S_ŷ(x_b; T)
        (gradient,) = torch.autograd.grad(negative_log_score, x)
    return (x - epsilon * gradient.sign()).detach()


def odin_score(classify: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, temperature: float = 1000.0,
               epsilon: float = 0.0014) -> torch.Tensor:
    """Liang et al. 2018, Eq. 1 on the perturbed input: the maximum of ``softmax(f(x̃) / T)``, negated (T = 1000 and
    ε = 0.0014 as the paper's CIFAR setting; ε = 0 gives temperature scaling alone)."""
    perturbed = odin_inputs(classify, images, temperature, epsilon) if epsilon else images
    with torch.no_grad():
        return msp_score(classify(perturbed) / temperature)


def class_gaussians(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lee et al. 2018, "A simple unified framework for detecting out-of-distribution samples and adversarial
    attacks", §2: the class means ``μ_c`` and the tied covariance ``Σ = (1/N) Σ_c Σ_{i: y_i = c} (f_i − μ_c)(f_i −
    μ_c)ᵀ`` of in-distribution features. Returns the means of the classes present (C, D) and the precision ``Σ⁺``
    (pseudo-inverse, as scikit-learn's ``EmpiricalCovariance``: few samples give a singular Σ)."""
    if (labels < 0).any():
        raise ValueError("the in-distribution fit split has unlabelled items (targets < 0): Mahalanobis needs class "
                         "labels; fit on a labelled split (fit_split) or drop 'mahalanobis' from scores")
    features = features.double()
    classes = labels.unique()
    means = torch.stack([features[labels == c].mean(0) for c in classes])
    centred = features - means[torch.searchsorted(classes, labels)]
    return means, torch.linalg.pinv(centred.T @ centred / len(features), hermitian=True)


def mahalanobis_score(features: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Lee et al. 2018, Eq. 2 without input pre-processing: ``min_c (f − μ_c)ᵀ Σ⁻¹ (f − μ_c)``, the squared
    Mahalanobis distance to the closest class mean (their confidence score negated)."""
    f = features.double()
    projected = f @ precision
    distances = ((projected * f).sum(-1, keepdim=True) - 2 * projected @ means.T
                 + ((means @ precision) * means).sum(-1))
    return distances.amin(-1)


def knn_score(features: torch.Tensor, bank: torch.Tensor, k: int = 50) -> torch.Tensor:
    """Sun et al. 2022, "Out-of-distribution detection with deep nearest neighbors", §3: the distance from the
    L2-normalised feature ``z = f / ‖f‖`` to its k-th nearest neighbour in ``bank`` (the normalised in-distribution
    features); their score ``−r_k`` negated. k = 50 is OpenOOD's default."""
    if not 1 <= k <= len(bank):
        raise ValueError(f"knn k={k} with {len(bank)} in-distribution features: use 1 ≤ k ≤ {len(bank)}")
    distances = torch.cdist(F.normalize(features.float(), dim=-1), bank.float())
    return distances.topk(k, -1, largest=False).values[:, -1].double()


def vim_fit(features: torch.Tensor, logits: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
            dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Wang et al. 2022, "ViM: out-of-distribution with virtual-logit matching", §3: the origin ``o = −W⁺ b`` of
    the last layer ``logits = W f + b`` (W of shape (C, D)), the basis R of the complement of the principal subspace (eigenvectors of the
    covariance of ``f − o`` beyond the top ``dim``), and ``α = mean max logit / mean ‖(f − o) R‖`` on the fit set."""
    centred_at = -torch.linalg.pinv(weight.double()) @ bias.double()
    centred = features.double() - centred_at
    eigenvalues, eigenvectors = torch.linalg.eigh(centred.T @ centred / len(centred))
    residual = eigenvectors[:, eigenvalues.argsort(descending=True)[dim:]]
    alpha = logits.double().amax(-1).mean() / (centred @ residual).norm(dim=-1).mean()
    return centred_at, residual, alpha


def vim_score(features: torch.Tensor, logits: torch.Tensor, centred_at: torch.Tensor, residual: torch.Tensor,
              alpha: torch.Tensor) -> torch.Tensor:
    """Wang et al. 2022, §3, the ViM score in log-odds form: ``α ‖(f − o) R‖ − logsumexp(logits)``, the virtual logit
    against the energy; the paper's softmax probability of the virtual class is the sigmoid of this."""
    virtual_logit = alpha * ((features.double() - centred_at) @ residual).norm(dim=-1)
    return virtual_logit - torch.logsumexp(logits.double(), -1)


CLASSIFIER_SCORES = ("msp", "max_logit", "energy", "odin", "mahalanobis", "knn", "vim")
FITTED_SCORES = ("mahalanobis", "knn", "vim")


class ClassifierOODScores(nn.Module):
    """The post-hoc OOD scores of any classifier in the ``outlier_scores(images) -> {score: (B,)}`` protocol of
    :class:`~lit_robust.callbacks.OODDetection` (higher = more likely OOD).

    ``images`` are in [0, 1]; ``to_input`` maps them to what the classifier takes (e.g. the loader's ``Normalize``),
    so ODIN's ε is a step in [0, 1] pixels — what the paper's code does by dividing the step on normalised inputs by
    the std. Features are the output of ``feature_layer`` (a name in ``classifier.named_modules()``), flattened, or
    by default the input of the classifier's last ``nn.Linear`` (the penultimate features the Mahalanobis, KNN and
    ViM papers use). Those three need :meth:`fit` on in-distribution features first.
    """

    def __init__(self, classifier: nn.Module, scores: Sequence[str] = ("msp", "energy", "mahalanobis", "knn"),
                 feature_layer: str | None = None, to_input: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 energy_temperature: float = 1.0, odin_temperature: float = 1000.0, odin_epsilon: float = 0.0014,
                 knn_k: int = 50, vim_dim: int | None = None):
        super().__init__()
        check_classifier_scores(scores, {"energy_temperature": energy_temperature, "odin_temperature": odin_temperature,
                                         "knn_k": knn_k})
        self.classifier, self.scores, self.to_input = classifier, tuple(scores), to_input
        self.energy_temperature, self.odin_temperature, self.odin_epsilon = (energy_temperature, odin_temperature,
                                                                             odin_epsilon)
        self.knn_k, self.vim_dim = knn_k, vim_dim
        linears = [m for m in classifier.modules() if isinstance(m, nn.Linear)]
        self.last_linear = linears[-1] if linears else None
        if feature_layer is None:
            if self.last_linear is None:
                raise ValueError(f"{type(classifier).__name__} has no nn.Linear whose input would be the penultimate "
                                 "features: name the feature layer, feature_layer='<name in named_modules()>'")
            self.feature_module = self.last_linear
        else:
            modules = dict(classifier.named_modules())
            if feature_layer not in modules:
                raise ValueError(f"feature_layer={feature_layer!r} is not a module of {type(classifier).__name__}: "
                                 f"use one of {[name for name in modules if name][-8:]} (named_modules())")
            self.feature_module = modules[feature_layer]
        self.feature_is_input = feature_layer is None
        self.fitted: dict[str, tuple] = {}

    @property
    def hparams(self):
        """The classifier's hyperparameters (``in_chans``, ``img_size`` for the callbacks' shape check)."""
        return getattr(self.classifier, "hparams", {})

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.to_input(images) if self.to_input else images)

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (B, D) features (through a forward hook, removed after the call) and the logits of [0, 1] images."""
        captured = []
        if self.feature_is_input:
            handle = self.feature_module.register_forward_pre_hook(lambda _, args: captured.append(args[0]))
        else:
            handle = self.feature_module.register_forward_hook(lambda _, args, out: captured.append(out))
        try:
            logits = self.logits(images)
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError("the feature layer did not run in the classifier's forward: name one that does "
                               "(feature_layer=)")
        return captured[-1].flatten(1), logits

    def fit(self, features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """The statistics of Mahalanobis (class means, tied precision), KNN (the normalised feature bank; k is cut
        to the bank's size) and ViM from in-distribution features, logits and labels."""
        if "mahalanobis" in self.scores:
            self.fitted["mahalanobis"] = class_gaussians(features, labels)
        if "knn" in self.scores:
            self.fitted["knn"] = (F.normalize(features.float(), dim=-1), min(self.knn_k, len(features)))
        if "vim" in self.scores:
            dim = self.vim_dim if self.vim_dim is not None else features.shape[1] // 2
            if self.last_linear is None or self.last_linear.in_features != features.shape[1] or \
                    not 0 < dim < features.shape[1]:
                raise ValueError(f"vim needs the input of the last nn.Linear as features (feature_layer=None) and "
                                 f"0 < vim_dim < {features.shape[1]} (got {dim})")
            bias = self.last_linear.bias if self.last_linear.bias is not None else \
                torch.zeros(self.last_linear.out_features, device=features.device)
            self.fitted["vim"] = vim_fit(features, logits, self.last_linear.weight.detach(), bias.detach(), dim)

    def outlier_scores(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        missing = [name for name in FITTED_SCORES if name in self.scores and name not in self.fitted]
        if missing:
            raise RuntimeError(f"{missing} need fit(features, logits, labels) of in-distribution data first")
        with torch.no_grad():
            features, logits = self.features_and_logits(images)
        fitted = {name: [v.to(features.device) if isinstance(v, torch.Tensor) else v for v in values]
                  for name, values in self.fitted.items()}
        compute = {
            "msp": lambda: msp_score(logits),
            "max_logit": lambda: max_logit_score(logits),
            "energy": lambda: energy_score(logits, self.energy_temperature),
            "odin": lambda: odin_score(self.logits, images, self.odin_temperature, self.odin_epsilon),
            "mahalanobis": lambda: mahalanobis_score(features, *fitted["mahalanobis"]),
            "knn": lambda: knn_score(features, *fitted["knn"]),
            "vim": lambda: vim_score(features, logits, *fitted["vim"]),
        }
        return {name: compute[name]() for name in self.scores}


SCORE_OPTIONS = ("energy_temperature", "odin_temperature", "odin_epsilon", "knn_k", "vim_dim")


def check_classifier_scores(scores: Sequence[str], options: dict | None = None) -> None:
    """Refuses an empty or unknown list of classifier scores and unknown or impossible options, naming the choices."""
    unknown = sorted(set(scores) - set(CLASSIFIER_SCORES))
    if isinstance(scores, str) or not scores or unknown:
        raise ValueError(f"scores={scores!r}: give a list of {list(CLASSIFIER_SCORES)}")
    options = options or {}
    if set(options) - set(SCORE_OPTIONS):
        raise ValueError(f"score options {sorted(set(options) - set(SCORE_OPTIONS))}: use {list(SCORE_OPTIONS)}")
    for name in ("energy_temperature", "odin_temperature", "knn_k"):
        if name in options and not options[name] > 0:
            raise ValueError(f"{name}={options[name]}: use a positive value")
