"""``OODDetection(scores=[...])`` in a Lightning project written the usual way (``examples/plain_lightning``'s
``LitClassifier`` and ``MNISTDataModule``: splits in ``mnist_train`` / ``mnist_test``, ``Normalize`` in the loader,
tuple or dict items): the post-hoc scores of the project's own CNN, fitted on its train split, equal the scores
computed here by hand in the loader's normalised space — ODIN's step included, taken the paper's way (ε / std on
normalised inputs)."""
from __future__ import annotations

import json
import sys

import lightning as L
import pytest
import torch
from conftest import REPO
from torch.utils.data import TensorDataset

sys.path.insert(0, str(REPO / "examples" / "plain_lightning"))

from project import MNIST_MEAN, MNIST_STD, LitClassifier, MNISTDataModule  # noqa: E402

from lit_robust.callbacks import MetricsFile, OODDetection  # noqa: E402
from lit_robust.datamodules.ood import natural_image_crops  # noqa: E402
from lit_robust.datasets import stack_dataset  # noqa: E402
from lit_robust.functional import ood_scores as S  # noqa: E402

SCORES = ["msp", "energy", "odin", "mahalanobis", "knn"]
MEAN, STD = MNIST_MEAN[0], MNIST_STD[0]
ODIN_T, ODIN_EPS = 1000.0, 0.0014


def trainer(callbacks=()) -> L.Trainer:
    return L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, callbacks=list(callbacks))


@pytest.fixture(scope="module")
def project_model() -> LitClassifier:
    L.seed_everything(0)
    model = LitClassifier()
    trainer().fit(model, datamodule=MNISTDataModule())
    return model.eval()


def natural_crops_in_loader_space() -> TensorDataset:
    """200 natural-image crops, 28×28, normalised as the project's loader normalises (items as its tuples)."""
    crops = (natural_image_crops(200, 28, seed=3) - MEAN) / STD
    return TensorDataset(crops, torch.full((200,), -1))


def scores_by_hand(model: LitClassifier, normalised: torch.Tensor, train: torch.Tensor, labels: torch.Tensor) -> dict:
    """Every score from the project's CNN on loader-space images: features = the input of its last Linear."""
    body = model.net[:-1]
    with torch.no_grad():
        features, logits = body(normalised), model(normalised)
        train_features = body(train)
    x = normalised.clone().requires_grad_(True)  # ODIN as in Liang et al.'s code: the step on normalised inputs / std
    log_score = torch.log_softmax(model(x) / ODIN_T, -1).amax(-1).sum()
    (gradient,) = torch.autograd.grad(log_score, x)
    with torch.no_grad():
        odin = -torch.softmax(model(x + ODIN_EPS / STD * gradient.sign()).double() / ODIN_T, -1).amax(-1)
    return {"msp": S.msp_score(logits), "energy": S.energy_score(logits), "odin": odin,
            "mahalanobis": S.mahalanobis_score(features, *S.class_gaussians(train_features, labels)),
            "knn": S.knn_score(features, torch.nn.functional.normalize(train_features, dim=-1), 10)}


@pytest.mark.parametrize("dict_items", [False, True])
def test_post_hoc_scores_of_the_project_classifier(tmp_path, project_model, dict_items):
    callback = OODDetection(scores=SCORES, normalization=(MNIST_MEAN, MNIST_STD),
                            ood_datasets={"natural": natural_crops_in_loader_space()}, encoder_eps=None,
                            classifier_eps=None, histograms=False, output_dir=str(tmp_path),
                            score_options={"knn_k": 10, "odin_epsilon": ODIN_EPS})
    dm = MNISTDataModule(dict_items=dict_items)
    trainer([callback, MetricsFile(str(tmp_path))]).test(project_model, datamodule=dm, verbose=False)
    metrics = json.loads((tmp_path / "metrics.json").read_text())

    plain = MNISTDataModule()
    plain.setup("fit"), plain.setup("test")
    train, labels = stack_dataset(plain.mnist_train)
    inliers = scores_by_hand(project_model, stack_dataset(plain.mnist_test)[0], train, labels)
    outliers = scores_by_hand(project_model, natural_crops_in_loader_space().tensors[0], train, labels)
    for score in SCORES:
        expected = S.detection_metrics(inliers[score].float(), outliers[score].float())
        for metric in ("auroc", "fpr95", "aupr_in"):
            assert metrics[f"ood/scores/natural/{score}/{metric}"] == pytest.approx(expected[metric], abs=1e-6), score
    assert metrics["ood/scores/natural/mahalanobis/auroc"] > 0.9
    assert metrics["ood/scores/natural/odin/auroc"] != metrics["ood/scores/natural/msp/auroc"]
