import math

import numpy as np
import pytest
import torch

from lit_robust import ood_scores as S


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
