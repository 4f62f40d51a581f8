"""``ControlledVariationReport``: every logged accuracy equals a hand count over scenes rendered one at a time for a
fixed classifier; the cue-conflict shares are exact for a classifier that reads only the texture and one that
reads only the shape; two gloo ranks log the one-process numbers; and in a user's project whose loader normalises,
the report hands the model normalised scenes."""
from __future__ import annotations

import sys
from collections import defaultdict
from itertools import combinations, product
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import REPO
from gloo_ranks import run_forked_ranks
from scipy.signal import convolve2d
from scipy.stats import spearmanr
from torch.utils.data import DataLoader
from torchvision import transforms

from lit_robust.callbacks import ControlledVariationReport
from lit_robust.callbacks import controlled_variation
from lit_robust.callbacks.contract import ItemFormat
from lit_robust.datamodules import DigitsDataModule
from lit_robust.datasets import photo_backgrounds, stack_dataset
from lit_robust.functional.scene_controls import TEXTURES, SceneControls, control_grid, stroke_textures

sys.path.insert(0, str(REPO / "examples" / "plain_lightning"))

from project import MNIST_MEAN, MNIST_STD, LitClassifier, MNISTDataModule  # noqa: E402

QUIET = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
             enable_checkpointing=False)
GRID = dict(rotations=(0, 90), scales=(0.6, 1.0), textures=("solid", "stripes_v"),
            corruptions=("none", "gaussian_blur"))
VALUES = {"rotation": ["0", "90"], "scale": ["0.6", "1"], "texture": ["solid", "stripes_v"],
          "corruption": ["none", "gaussian_blur"]}
PHOTOS = ["grass", "hubble_deep_field"]


class NearestTemplate(L.LightningModule):
    """A fixed classifier: the class of the nearest class-mean training digit (no training), so its accuracy
    depends on pose, texture and background."""

    def __init__(self, templates: torch.Tensor):
        super().__init__()
        self.register_buffer("templates", templates.flatten(1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return -torch.cdist(images.flatten(1), self.templates)

    def test_step(self, batch, batch_idx):
        return None


@pytest.fixture(scope="module")
def digits() -> tuple[DigitsDataModule, NearestTemplate]:
    data = DigitsDataModule(source="sklearn8x8", img_size=16, seed=0)
    data.setup("fit")
    images, labels = stack_dataset(data.train_dataset)
    return data, NearestTemplate(torch.stack([images[labels == c].mean(0) for c in range(10)]))


def hand_sobel(image: np.ndarray) -> float:
    gx = np.array([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
    return float(np.hypot(convolve2d(image, gx, mode="valid"), convolve2d(image, gx.T, mode="valid")).mean())


def test_every_logged_accuracy_is_the_hand_count_of_scenes_rendered_one_at_a_time(digits, tmp_path):
    """2 × 2 × 2 × 2 controls × 4 backgrounds (grass seen in training) × 4 digits, in batches of 37: per control
    value, per pair of values, per background (and its Sobel complexity, and their Spearman correlation by scipy),
    held-out and seen — each the count made here over the 256 scenes rendered one by one. Catches batches scored
    against the wrong digits, a pair table transposed, backgrounds mislabelled, and stubs; the template classifier
    loses most of its accuracy at 90°."""
    data, model = digits
    report = ControlledVariationReport(backgrounds=PHOTOS, crops_per_photo=2, seen_backgrounds=["grass"],
                                       digits_per_cell=4, batch_size=37, **GRID)
    logged = L.Trainer(default_root_dir=tmp_path, callbacks=[report], **QUIET).test(model, datamodule=data,
                                                                                    verbose=False)[0]
    images, labels = stack_dataset(data.test_dataset)
    chosen = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:4]
    backgrounds, names = photo_backgrounds(PHOTOS, 2, 16, 0)
    controls, counts = SceneControls(**GRID), defaultdict(lambda: [0, 0])
    for *values, background, digit in product(range(2), range(2), range(2), range(2), range(4), range(4)):
        scene = controls.render(images[chosen[digit]][None], backgrounds, torch.tensor([[*values, background]]))
        hit = int(model(scene).argmax().item() == labels[chosen[digit]].item())
        settings = [f"{name}={VALUES[name][v]}" for name, v in zip(VALUES, values)]
        seen = "seen_acc" if names[background].startswith("grass") else "heldout_acc"
        for key in ["acc", *settings, *("/".join(pair) for pair in combinations(settings, 2)),
                    f"background={names[background]}", f"background/{seen}"]:
            counts[key][0] += hit
            counts[key][1] += 1
    expected = {f"controls/{key}" + ("" if key in ("acc",) or key.endswith("_acc") else "/acc"): hits / total
                for key, (hits, total) in counts.items()}
    complexity = [hand_sobel(background[0].numpy()) for background in backgrounds]
    expected |= {f"controls/background={name}/complexity": value for name, value in zip(names, complexity)}
    expected["controls/background/spearman_acc_complexity"] = spearmanr(
        complexity, [expected[f"controls/background={name}/acc"] for name in names]).statistic
    assert len(expected) == 1 + 8 + 24 + 8 + 1 + 2
    assert {key: logged[key] for key in expected} == pytest.approx(expected, abs=1e-5)
    assert expected["controls/rotation=90/acc"] < expected["controls/rotation=0/acc"] - 0.1
    assert not any(key.startswith("controls/cue_conflict") for key in logged)


class TextureReader(L.LightningModule):
    """Reads only the texture: the cue texture that agrees with the most stroke pixels of full opacity (pixels at 0
    or 1 on a flat 0.5 background), minus the pixels it disagrees with."""

    def __init__(self, size: int):
        super().__init__()
        self.register_buffer("patterns", stroke_textures(list(TEXTURES), size, size).flatten(1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images.flatten(1)
        full = ((pixels - 0.5).abs() > 0.49).float()
        agree = (pixels.round()[:, None] == self.patterns[None]).float()
        return (full[:, None] * (2 * agree - 1)).sum(-1)

    def test_step(self, batch, batch_idx):
        return None


class ShapeReader(L.LightningModule):
    """Reads only the shape: the label of the test digit whose inked pixels are the scene's pixels off the flat
    0.5 background (the fewest differing pixels)."""

    def __init__(self, digits: torch.Tensor, labels: torch.Tensor):
        super().__init__()
        self.register_buffer("masks", (digits.flatten(1) > 0).float())
        self.register_buffer("labels", labels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        ink = ((images.flatten(1) - 0.5).abs() > 1e-6).float()
        nearest = torch.cdist(ink, self.masks, p=1).argmin(1)
        return torch.nn.functional.one_hot(self.labels[nearest], 10).float()

    def test_step(self, batch, batch_idx):
        return None


def flat_backgrounds(names, per_photo, size, seed):
    return torch.full((len(names) * per_photo, 1, size, size), 0.5), [f"{n}_{c}" for n in names for c in
                                                                      range(per_photo)]


def test_cue_conflict_shares_are_all_texture_for_a_texture_reader_and_all_shape_for_a_shape_reader(monkeypatch,
                                                                                                     tmp_path):
    """On flat grey backgrounds (so the readers can tell stroke from background), 20 MNIST digits each wearing
    another class's texture: the texture reader names the texture's class every time (texture 1, shape 0, shape
    bias 0), the shape reader the digit's own (shape 1). Catches the two shares swapped, a conflict texture equal
    to the digit's own class's, and stubs."""
    monkeypatch.setattr(controlled_variation, "photo_backgrounds", flat_backgrounds)
    data = DigitsDataModule(num_images=100, seed=0)
    data.setup("test")
    images, labels = stack_dataset(data.test_dataset)
    report = lambda: ControlledVariationReport(backgrounds=PHOTOS, crops_per_photo=1, digits_per_cell=20,  # noqa
                                               cue_textures=list(TEXTURES), rotations=(0,), scales=(1,),
                                               textures=("solid",), corruptions=("none",))
    for model, shares in ((TextureReader(28), {"texture": 1.0, "shape": 0.0, "other": 0.0, "shape_bias": 0.0}),
                          (ShapeReader(images, labels), {"texture": 0.0, "shape": 1.0, "other": 0.0,
                                                         "shape_bias": 1.0})):
        logged = L.Trainer(default_root_dir=tmp_path, callbacks=[report()], **QUIET).test(model, datamodule=data,
                                                                                          verbose=False)[0]
        assert {key: logged[f"controls/cue_conflict/{key}"] for key in shares} == pytest.approx(shares)


# ---- 2 gloo ranks ---------------------------------------------------------------------------------------------------
def noisy_report() -> ControlledVariationReport:
    """96 scenes in batches of 40 (rank 0 takes batches 0 and 2, rank 1 batch 1), noise among the corruptions, and
    the cue-conflict scenes."""
    return ControlledVariationReport(backgrounds=PHOTOS, crops_per_photo=2, digits_per_cell=3, batch_size=40,
                                     rotations=(0, 45), scales=(1,), textures=("solid", "checker"),
                                     corruptions=("none", "gaussian_noise"), cue_textures=list(TEXTURES))


def _fake_trainer(rank: int, world: int, data: DigitsDataModule) -> SimpleNamespace:
    """The trainer attributes the report reads (contract: loaders, ranks, root device)."""
    return SimpleNamespace(world_size=world, global_rank=rank, is_global_zero=rank == 0, datamodule=data,
                           strategy=SimpleNamespace(root_device=torch.device("cpu")), val_dataloaders=None,
                           test_dataloaders=DataLoader(data.test_dataset))


def _rank(rank: int, world: int, port: int, root, model, data) -> None:
    torch.set_num_threads(1)  # a forked child must not wait on the parent's OpenMP threads
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.save(noisy_report().evaluate(_fake_trainer(rank, world, data), model), root / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_give_the_single_process_numbers(digits, tmp_path):
    """Each rank renders and predicts its own batches (noise seeded per batch, not per rank); the gathered numbers
    equal one process's. Catches a rank scoring only its share, noise drawn per rank, or an out-of-order gather."""
    data, model = digits
    single = noisy_report().evaluate(_fake_trainer(0, 1, data), model)
    assert single["controls/corruption=gaussian_noise/acc"] != single["controls/corruption=none/acc"]
    run_forked_ranks(_rank, 2, tmp_path, model, data)
    for rank in (0, 1):
        assert torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) == pytest.approx(single, abs=1e-9,
                                                                                            nan_ok=True)


# ---- a user's project -----------------------------------------------------------------------------------------------
def test_a_users_normalising_project_gets_the_numbers_of_normalised_scenes(tmp_path):
    """The plain Lightning project (``Normalize`` in the loader, splits in ``mnist_*``): with
    ``normalization=(mean, std)`` the report renders the test digits in [0, 1] and logs the accuracies of the model
    on those scenes normalised again, computed here; without it the split is refused naming ``normalization``.
    Catches scenes built from normalised digits, a model handed [0, 1] scenes, and stubs."""
    L.seed_everything(0)
    model, data = LitClassifier(), MNISTDataModule()
    L.Trainer(max_epochs=2, **QUIET).fit(model, datamodule=data)
    grid = dict(rotations=(0, 60), scales=(1.0,), textures=("solid",), corruptions=("none", "gaussian_blur"))
    report = ControlledVariationReport(backgrounds=PHOTOS, crops_per_photo=1, digits_per_cell=30,
                                       normalization=(MNIST_MEAN, MNIST_STD), **grid)
    logged = L.Trainer(default_root_dir=tmp_path, callbacks=[report], **QUIET).test(model, datamodule=data,
                                                                                    verbose=False)[0]
    images, labels = ItemFormat().stack(data.mnist_test)
    chosen = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:30]
    unit = images[chosen] * MNIST_STD[0] + MNIST_MEAN[0]
    factors = control_grid([2, 1, 1, 2, 2, 30])
    scenes = SceneControls(**grid).render(unit[factors[:, -1]], photo_backgrounds(PHOTOS, 1, 28, 0)[0],
                                          factors[:, :-1])
    normalize = transforms.Normalize(MNIST_MEAN, MNIST_STD)
    expected, unnormalised = (accuracies(model, images, factors, labels[chosen])
                              for images in (normalize(scenes), scenes))
    assert {key: logged[key] for key in expected} == pytest.approx(expected, abs=1e-6)
    assert expected["controls/acc"] > unnormalised["controls/acc"] + 0.05  # handed [0, 1] scenes, the model errs more
    with pytest.raises(ValueError, match="declare the loader's normalisation with normalization="):
        L.Trainer(callbacks=[ControlledVariationReport(backgrounds=PHOTOS, crops_per_photo=1)], **QUIET).test(
            model, datamodule=data, verbose=False)


def accuracies(model: L.LightningModule, scenes: torch.Tensor, factors: torch.Tensor,
               labels: torch.Tensor) -> dict[str, float]:
    """Overall, per rotation and per background accuracy of the 2-rotation, 2-background grid's scenes."""
    with torch.no_grad():
        correct = model(scenes).argmax(-1) == labels[factors[:, -1]]
    return {"controls/acc": correct.float().mean().item(),
            **{f"controls/rotation={r}/acc": correct[factors[:, 0] == i].float().mean().item()
               for i, r in enumerate(("0", "60"))},
            **{f"controls/background={name}_0/acc": correct[factors[:, 4] == i].float().mean().item()
               for i, name in enumerate(PHOTOS)}}


@pytest.mark.parametrize("options, message", [
    (dict(backgrounds=["grass"], crops_per_photo=1), "the complexity correlation needs at least 2 backgrounds"),
    (dict(cue_textures=["solid", "solid"]), r"cue_textures \['solid', 'solid'\]: give 2 different textures, one per class"),
    (dict(textures=["velvet"]), r"textures \['velvet'\]"),
])
def test_bad_settings_are_refused_at_construction(options, message):
    with pytest.raises(ValueError, match=message):
        ControlledVariationReport(**options)
