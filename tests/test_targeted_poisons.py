"""Direct correctness of Gradient Matching and Bullseye Polytope on a tiny fixed surrogate (sklearn 8×8 digits)."""
import pytest
import torch

from lit_robust.datasets import load_digits_source
from lit_robust.poisons import CraftingData, craft_bullseye_polytope, craft_gradient_matching
from lit_robust.poisons.bullseye import bullseye_loss, collide_features, feature_maps
from lit_robust.poisons.crafted import project_linf
from lit_robust.poisons.gradient_matching import match_gradients, matching_loss_of, parameter_gradient
from lit_robust.poisons.surrogate import load_or_train_surrogate

EPS = 16 / 255


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    images, labels = load_digits_source("sklearn8x8")
    path = tmp_path_factory.mktemp("surrogate") / "surrogate.pt"
    model = load_or_train_surrogate(str(path), images[:800], labels[:800], 10, epochs=2, progress=False)
    poisons = images[:800][labels[:800] == 4][:12]
    return model, images, labels, poisons, path


def _random_delta(poisons, seed=1):
    noise = (torch.rand(poisons.shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1) * EPS
    return project_linf(noise, poisons, EPS)


def test_gradient_matching_lowers_loss_below_start_and_random(setting):
    model, images, labels, poisons, _ = setting
    poison_labels = torch.full((len(poisons),), 4)
    target = images[1000]
    delta, info = match_gradients(model, poisons, poison_labels, target, 4, EPS, restarts=2, steps=24,
                                  max_shift=1, generator=torch.Generator().manual_seed(0), progress=False)
    target_grad = [g.detach() for g in parameter_gradient(model, target[None], torch.tensor([4]))]
    random_loss = float(matching_loss_of(model, poisons, poison_labels, _random_delta(poisons), target_grad).detach())
    final = float(matching_loss_of(model, poisons, poison_labels, delta, target_grad).detach())
    assert final == pytest.approx(info["final_loss"], abs=1e-5)
    assert final < info["initial_loss"] and final < random_loss
    assert delta.abs().max() <= EPS + 1e-6 and (poisons + delta).min() >= 0 and (poisons + delta).max() <= 1
    assert info["final_loss"] == min(info["restart_losses"])  # the lowest-loss restart is the one kept
    assert info["restart_losses"][info["best_restart"]] == info["final_loss"]


def test_craft_gradient_matching_budget_clean_labels(setting):
    _, images, labels, _, path = setting
    data = CraftingData(images[:800], labels[:800], images[1000:1100], labels[1000:1100], 10)
    p = craft_gradient_matching(data, eps=EPS, budget=0.01, restarts=1, steps=4, target_index=3, adversarial_class=None,
                                surrogate_epochs=2,
                                surrogate_path=str(path), generator=torch.Generator().manual_seed(0), progress=False)
    assert len(p.indices) == 8 == len(p.indices.unique())
    assert (data.train_labels[p.indices] == p.target_class).all() and torch.equal(p.labels, data.train_labels[p.indices])
    assert p.target_class != int(data.test_labels[3]) and p.target_index == 3
    assert (p.images - data.train_images[p.indices]).abs().max() <= EPS + 1e-6


@pytest.mark.parametrize("threat_model", ["linear", "finetune"])
def test_bullseye_lowers_feature_distance_below_start_and_random(setting, threat_model):
    model, images, _, poisons, _ = setting
    target = images[1000]
    delta, info = collide_features(model, poisons, target, EPS, threat_model, steps=40, lr=0.01, progress=False)
    with torch.no_grad():
        target_features = feature_maps(model, target[None], threat_model)
        random_loss = float(bullseye_loss(target_features, feature_maps(model, poisons + _random_delta(poisons),
                                                                          threat_model)))
    assert info["final_loss"] < info["initial_loss"] and info["final_loss"] < random_loss
    assert delta.abs().max() <= EPS + 1e-6 and (poisons + delta).min() >= 0 and (poisons + delta).max() <= 1
    assert len(feature_maps(model, poisons, threat_model)) == (1 if threat_model == "linear" else 4)


def test_craft_bullseye_stores_extractor_and_keeps_labels(setting):
    _, images, labels, _, path = setting
    data = CraftingData(images[:800], labels[:800], images[1000:1100], labels[1000:1100], 10)
    p = craft_bullseye_polytope(data, budget=0.02, steps=3, target_index=5, adversarial_class=2, surrogate_epochs=2,
                                surrogate_path=str(path), generator=torch.Generator().manual_seed(0), progress=False)
    assert len(p.indices) == 16 and (p.labels == 2).all() and p.target_class == 2
    assert "net.head.1.weight" in p.tensors["extractor_state"]
    with pytest.raises(ValueError, match="other than"):
        craft_bullseye_polytope(data, target_index=5, adversarial_class=int(data.test_labels[5]), surrogate_epochs=2,
                                surrogate_path=str(path), generator=torch.Generator(), progress=False)
