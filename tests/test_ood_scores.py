import math

import numpy as np
import pytest
import torch

from lit_robust.functional import ood_scores as S


def test_importance_sampled_log_likelihood_is_log_mean_of_weights():
    torch.manual_seed(0)
    a, b, c = (torch.randn(7, 5, dtype=torch.float64) * 3 for _ in range(3))
    expected = np.log(np.exp((a + b - c).numpy()).mean(0))
    assert np.allclose(S.importance_sampled_log_likelihood(a, b, c).numpy(), expected)


def test_expected_log_likelihood_is_log_of_mean_likelihood():
    log_liks = torch.tensor([[0.0], [math.log(3.0)]])
    assert S.expected_log_likelihood(log_liks).item() == pytest.approx(math.log(2.0))


def test_agreement_scores_at_their_extremes():
    agree = torch.full((8, 1), -50.0)
    one_dominates = torch.tensor([[0.0]] + [[-1000.0]] * 7)
    assert S.disagreement_score(agree).item() == pytest.approx(8.0)
    assert S.disagreement_score(one_dominates).item() == pytest.approx(1.0)
    assert S.likelihood_entropy(agree).item() == pytest.approx(math.log(8.0))
    assert S.likelihood_entropy(one_dominates).item() == pytest.approx(0.0, abs=1e-6)


def test_std_waic_typicality_and_hole_indicator_values():
    log_liks = torch.tensor([[-10.0, 1.0], [-12.0, 3.0], [-14.0, 5.0]])
    assert torch.allclose(S.std_of_log_likelihoods(log_liks), torch.tensor([2.0, 2.0]))
    assert torch.allclose(S.waic(log_liks), torch.tensor([-12.0 - 4.0, 3.0 - 4.0]))
    ell = S.expected_log_likelihood(log_liks)
    assert torch.allclose(S.typicality_test(log_liks, 5.0), (-ell - 5.0).abs())
    log_px_z = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [5.0, 0.0]]])  # (N=1, S=3, B=2)
    assert torch.allclose(S.hole_indicator(log_px_z), torch.tensor([2.0, 0.0]))


def test_outlier_scores_are_oriented_higher_for_outliers():
    torch.manual_seed(0)
    inliers = -100 + 0.1 * torch.randn(10, 200)       # models agree
    outliers = -100 + 3.0 * torch.randn(10, 200)      # models disagree, same mean likelihood
    s_in, s_out = S.outlier_scores(inliers), S.outlier_scores(outliers)
    for name in ("disagreement", "entropy", "std_ll"):
        assert S.detection_metrics(s_in[name], s_out[name])["auroc"] > 0.95, name


def test_detection_metrics_on_large_scores_and_reversed_order():
    inl = 1000.0 + torch.arange(100.0)
    out = 2000.0 + torch.arange(100.0)
    metrics = S.detection_metrics(inl, out)  # would be 0.5 if torchmetrics' sigmoid saw raw scores
    assert metrics == {"auroc": 1.0, "auprc": 1.0, "aupr_in": 1.0, "fpr80": 0.0, "fpr95": 0.0}
    assert S.detection_metrics(out, inl)["auroc"] == 0.0


def test_fpr_at_tpr_counts_inliers_above_the_80_percent_threshold():
    scores = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.15, 0.35, 0.6, 0.7, 0.8])
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    # 4 of 5 outliers are caught at threshold 0.35: inliers 0.4 and 0.5 are above it -> FPR 0.4
    assert S.fpr_at_tpr(scores, labels).item() == pytest.approx(0.4)


def test_outlier_scores_rejects_a_single_draw():
    with pytest.raises(ValueError, match="num_draws"):
        S.outlier_scores(torch.zeros(1, 4))


def test_openood_metrics_match_scikit_learn():
    """FPR95 and AUPR-In / AUPR-Out as OpenOOD computes them (outliers positive for FPR and AUPR-Out, inliers for
    AUPR-In), checked against scikit-learn on overlapping scores; swapping the classes or the sign fails."""
    from sklearn.metrics import average_precision_score, roc_curve

    generator = torch.Generator().manual_seed(0)
    inliers, outliers = torch.randn(300, generator=generator), 1.0 + torch.randn(200, generator=generator)
    metrics = S.detection_metrics(inliers, outliers)
    scores = torch.cat([inliers, outliers]).numpy()
    is_outlier = torch.cat([torch.zeros(300), torch.ones(200)]).numpy()
    fpr, tpr, _ = roc_curve(is_outlier, scores)
    assert metrics["fpr95"] == pytest.approx(fpr[(tpr >= 0.95).argmax()], abs=1e-6)
    assert metrics["auprc"] == pytest.approx(average_precision_score(is_outlier, scores), abs=1e-6)
    assert metrics["aupr_in"] == pytest.approx(average_precision_score(1 - is_outlier, -scores), abs=1e-6)
    assert metrics["fpr95"] > metrics["fpr80"] and metrics["aupr_in"] != pytest.approx(metrics["auprc"], abs=0.01)


def test_typicality_is_a_distance_on_both_sides_of_the_entropy():
    log_liks = torch.tensor([[-3.0, -30.0], [-3.0, -30.0]])  # −log p(x) = 3 and 30
    assert S.typicality_test(log_liks, 10.0).tolist() == pytest.approx([7.0, 20.0])


def test_hole_indicator_averages_the_per_draw_deviations():
    # two posterior draws (N=2), S=3 codes, B=2 inputs: sample stds 1 and 3 for input 0, 0 and 2 for input 1
    log_px_z = torch.tensor([[[0.0, 5.0], [1.0, 5.0], [2.0, 5.0]],
                             [[0.0, 0.0], [3.0, 2.0], [6.0, 4.0]]])
    assert S.hole_indicator(log_px_z).tolist() == pytest.approx([2.0, 1.0])
    assert S.hole_indicator(log_px_z[1]).tolist() == pytest.approx([3.0, 2.0])  # (S, B): one draw


def test_every_score_ranks_a_hand_built_outlier_above_an_inlier():
    """Inlier: 3 draws agree on log p = −10. Outlier: they disagree around a lower likelihood."""
    log_liks = torch.tensor([[-10.0, -20.0], [-10.0, -40.0], [-10.0, -60.0]])
    log_px_z = torch.tensor([[[-10.0, -10.0], [-10.0, -30.0], [-10.0, -50.0]]])
    scores = S.outlier_scores(log_liks, log_px_z, model_entropy=10.0)
    assert list(scores) == list(S.SCORE_NAMES)
    for name, score in scores.items():
        assert score.shape == (2,) and score[1] > score[0], name
    assert list(S.outlier_scores(log_liks[:2])) == ["expected_ll", "waic", "disagreement", "entropy", "std_ll"]
    with pytest.raises(ValueError, match=r"^log_liks has shape \(3, 2, 1\): expected \(N draws ≥ 2, B inputs\)"):
        S.outlier_scores(log_liks[..., None])


def test_unit_interval_is_the_dense_rank_scaled_to_one():
    assert S.to_unit_interval(torch.tensor([5.0, -3.0, 5.0, 0.0])).tolist() == [1.0, 0.0, 1.0, 0.5]
    assert S.to_unit_interval(torch.tensor([-3.0, 7.0])).tolist() == [0.0, 1.0]
    assert S.to_unit_interval(torch.tensor([2.0, 2.0])).tolist() == [0.0, 0.0]  # one value: no division by zero


def test_detection_metrics_by_hand_and_non_finite_scores():
    # inliers 1, 3; outliers 2, 4. AUROC: of the 4 (outlier, inlier) pairs 3 are ordered → 0.75.
    # FPR at 80 % TPR: both outliers needed, threshold 2 → inlier 3 above it → 0.5.
    metrics = S.detection_metrics(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 4.0]))
    assert metrics["auroc"] == pytest.approx(0.75) and metrics["fpr80"] == pytest.approx(0.5)
    assert metrics["auprc"] == pytest.approx((1 + 2 / 3) / 2)  # precision 1 at score 4, 2/3 at score 2
    assert metrics["aupr_in"] == pytest.approx((1 + 2 / 3) / 2)  # inliers positive, ranked by −score
    with pytest.raises(ValueError, match=r"^non-finite OOD scores"):
        S.detection_metrics(torch.tensor([1.0, float("nan")]), torch.tensor([2.0]))


# ---- post-hoc classifier scores, each against an independent computation -------------------------------------------
def separable_features(seed: int = 0, dim: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three tight in-distribution classes at ±4 on the axes, and outliers scattered around the origin."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.zeros(3, dim, dtype=torch.float64)
    centres[0, 0], centres[1, 1], centres[2, 2] = 4.0, 4.0, -4.0
    labels = torch.arange(3).repeat(40)
    inliers = centres[labels] + 0.5 * torch.randn(120, dim, generator=g, dtype=torch.float64)
    outliers = 0.5 * torch.randn(60, dim, generator=g, dtype=torch.float64) + torch.tensor([0.0] * (dim - 1) + [3.0])
    return inliers, labels, outliers


def test_logit_scores_match_their_formulas():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    z = logits.numpy().astype(np.float64)
    softmax = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    assert np.allclose(S.msp_score(logits).numpy(), -softmax.max(1))
    assert np.allclose(S.max_logit_score(logits).numpy(), [-2.0, -0.3])
    for t in (1.0, 3.0):
        assert np.allclose(S.energy_score(logits, t).numpy(), -t * np.log(np.exp(z / t).sum(1)))


def test_odin_matches_the_analytic_gradient_of_a_linear_classifier():
    """For logits W x + b, ∇ₓ log S_ŷ(x; T) = (W_ŷ − Σ_c p_c W_c) / T: the perturbed input and its score by hand."""
    g = torch.Generator().manual_seed(1)
    linear = torch.nn.Linear(5, 4).double()
    x = torch.rand(7, 5, generator=g, dtype=torch.float64)
    T, eps = 10.0, 0.05
    W, b = linear.weight.detach().numpy(), linear.bias.detach().numpy()
    logits = x.numpy() @ W.T + b
    p = np.exp(logits / T) / np.exp(logits / T).sum(1, keepdims=True)
    grad_log_score = (W[logits.argmax(1)] - p @ W) / T
    perturbed = x.numpy() + eps * np.sign(grad_log_score)
    assert np.allclose(S.odin_inputs(linear, x, T, eps).numpy(), perturbed)
    q = np.exp((perturbed @ W.T + b) / T)
    expected = -(q / q.sum(1, keepdims=True)).max(1)
    assert np.allclose(S.odin_score(linear, x, T, eps).numpy(), expected)
    assert (S.odin_score(linear, x, T, eps) < S.odin_score(linear, x, T, 0.0)).all()  # the step raises S_ŷ


def test_mahalanobis_matches_sklearn_empirical_covariance():
    from sklearn.covariance import EmpiricalCovariance

    inliers, labels, outliers = separable_features()
    means, precision = S.class_gaussians(inliers, labels)
    x, mu = inliers.numpy(), np.stack([inliers.numpy()[labels.numpy() == c].mean(0) for c in range(3)])
    tied = EmpiricalCovariance(assume_centered=True).fit(x - mu[labels.numpy()])  # Lee et al.'s code
    expected = np.stack([tied.mahalanobis(outliers.numpy() - m) for m in mu], 1).min(1)
    assert np.allclose(S.mahalanobis_score(outliers, means, precision).numpy(), expected)


def test_mahalanobis_refuses_unlabelled_fit_data():
    inliers, labels, _ = separable_features()
    with pytest.raises(ValueError, match="unlabelled.*fit_split"):
        S.class_gaussians(inliers, torch.full_like(labels, -1))


def test_knn_matches_sklearn_nearest_neighbors_on_normalised_features():
    from sklearn.neighbors import NearestNeighbors

    inliers, _, outliers = separable_features()
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    distances, _ = NearestNeighbors(n_neighbors=5).fit(unit(inliers.numpy())).kneighbors(unit(outliers.numpy()))
    bank = torch.nn.functional.normalize(inliers, dim=-1)
    assert np.allclose(S.knn_score(outliers, bank, 5).numpy(), distances[:, -1], atol=1e-5)
    with pytest.raises(ValueError, match="k=121"):
        S.knn_score(outliers, bank, 121)


def test_vim_matches_openood_numpy_recipe():
    """OpenOOD's ViM postprocessor in numpy: u = −pinv(W) b, eig of the covariance of f − u, the complement of the
    top ``dim`` directions, α = mean max logit / mean residual norm, score = energy − α‖(f − u) NS‖ (negated here)."""
    inliers, _, outliers = separable_features()
    g = torch.Generator().manual_seed(2)
    W, b = torch.randn(3, 6, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    fit = S.vim_fit(inliers, inliers @ W.T + b, W, b, 3)
    u = -np.linalg.pinv(W.numpy()) @ b.numpy()
    centred = inliers.numpy() - u
    values, vectors = np.linalg.eig(centred.T @ centred / len(centred))
    ns = np.ascontiguousarray(np.real(vectors[:, np.argsort(-values)[3:]]))
    alpha = (inliers.numpy() @ W.numpy().T + b.numpy()).max(1).mean() / np.linalg.norm(centred @ ns, axis=1).mean()
    logits = outliers.numpy() @ W.numpy().T + b.numpy()
    energy = np.log(np.exp(logits).sum(1))
    expected = alpha * np.linalg.norm((outliers.numpy() - u) @ ns, axis=1) - energy
    assert np.allclose(S.vim_score(outliers, torch.from_numpy(logits), *fit).numpy(), expected)


class TinyClassifier(torch.nn.Module):
    """Features = the input of ``head``: a linear map of the first three coordinates (the toy's classes)."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Flatten()
        self.head = torch.nn.Linear(6, 3).double()
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[1.0, 0, 0, 0, 0, 0], [0, 1.0, 0, 0, 0, 0], [0, 0, -1.0, 0, 0, 0]]))
            self.head.bias.zero_()

    def forward(self, x):
        return self.head(self.body(x))


def test_every_classifier_score_ranks_the_separable_toy_outliers_higher():
    """Higher = more likely OOD for all seven: AUROC near 1 (a flipped sign gives 1 − AUROC, an unfitted or random
    score about 0.5)."""
    inliers, labels, outliers = separable_features()
    scorer = S.ClassifierOODScores(TinyClassifier(), S.CLASSIFIER_SCORES, knn_k=10, vim_dim=3, odin_temperature=10.0)
    features, logits = scorer.features_and_logits(inliers)
    assert torch.equal(features, inliers)  # the input of the last nn.Linear
    scorer.fit(features, logits, labels)
    test_in, _, test_out = separable_features(seed=5)
    ins, outs = scorer.outlier_scores(test_in), scorer.outlier_scores(test_out)
    assert list(ins) == list(S.CLASSIFIER_SCORES)
    for name in S.CLASSIFIER_SCORES:
        assert S.detection_metrics(ins[name], outs[name])["auroc"] > 0.95, name


def test_classifier_scores_read_a_named_feature_layer_and_refuse_bad_arguments():
    scorer = S.ClassifierOODScores(TinyClassifier(), ["knn"], feature_layer="head")
    images = torch.rand(4, 6, dtype=torch.float64)
    features, logits = scorer.features_and_logits(images)
    assert torch.equal(features, logits)  # the named module's output
    assert not scorer.classifier.head._forward_hooks  # the hook is removed after the call
    with pytest.raises(RuntimeError, match=r"\['knn'\] need fit"):
        scorer.outlier_scores(images)
    with pytest.raises(ValueError, match="feature_layer='fc'.*'body', 'head'"):
        S.ClassifierOODScores(TinyClassifier(), ["knn"], feature_layer="fc")
    with pytest.raises(ValueError, match="no nn.Linear.*feature_layer"):
        S.ClassifierOODScores(torch.nn.Flatten(), ["msp"])
    with pytest.raises(ValueError, match="scores='msp'.*list of"):
        S.check_classifier_scores("msp")
    with pytest.raises(ValueError, match=r"scores=\['mls'\]"):
        S.check_classifier_scores(["mls"])


def test_knn_k_is_cut_to_a_small_bank():
    """k = 50 (OpenOOD's default) with 4 in-distribution features: the 4th neighbour, i.e. the farthest one."""
    inliers, labels, outliers = separable_features()
    scorer = S.ClassifierOODScores(TinyClassifier(), ["knn"])
    scorer.fit(inliers[:4], inliers[:4], labels[:4])
    bank = torch.nn.functional.normalize(inliers[:4], dim=-1)
    farthest = torch.cdist(torch.nn.functional.normalize(outliers, dim=-1), bank).amax(-1)
    assert torch.allclose(scorer.outlier_scores(outliers)["knn"], farthest, atol=1e-6)
