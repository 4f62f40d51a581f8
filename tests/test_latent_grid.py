"""``LatentAugmentationGrid``: the PNG's rows are LAVAE's pixel augmentations beside their latent stand-ins (Eqs.
5.6–5.9) for test images spread over the split."""
from types import SimpleNamespace

import matplotlib.pyplot as plt
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lit_robust.callbacks import LatentAugmentationGrid
from lit_robust.models.lavae import LAVAE

ROWS = ["input", "reconstruction (5.6)", "rot90(x)", "latent rot90 (5.7)", "hflip(x)", "latent hflip (5.7)",
        "composition", "latent L1·L2 (5.8)", "latent L2·L1 (5.9)"]


class DictItems(TensorDataset):
    """Items as dicts under names the contract does not guess."""

    def __getitem__(self, i):
        image, label = super().__getitem__(i)
        return {"pixels": image, "digit": label}


def test_grid_rows_are_the_models_augmentations_of_images_spread_over_the_split(tmp_path, monkeypatch):
    """Every tile of the grid equals, clamped to [0, 1], the row's image computed here from the model (random latent
    maps, so that no two latent rows coincide) for the images 0, 3, 6, 9 of the 10 of the split given (dict items,
    normalised in the loader: the tiles are in [0, 1] pixels), in grey; rows are labelled as the paper numbers them;
    another rank draws nothing. Catches rows swapped or mislabelled, the maps' order in Eq. 5.9, the first images
    instead of a spread, the loop's split, item keys or normalisation ignored, and a grid written
    from every rank."""
    torch.manual_seed(0)
    model = LAVAE(img_size=8, latent_dim=4, hidden=32).eval()
    with torch.no_grad():
        model.latent_maps.copy_(torch.randn_like(model.latent_maps))
    images = torch.rand(10, 1, 8, 8)
    held_out = DictItems(images * 2 - 1, torch.arange(10))   # the loader's space: normalised with mean = std = 0.5
    datamodule = SimpleNamespace(held_out=held_out)
    loader = DataLoader(TensorDataset(torch.zeros(3, 1, 8, 8), torch.zeros(3)), batch_size=4)  # not the split used
    figures = []
    subplots = plt.subplots
    monkeypatch.setattr(plt, "subplots", lambda *args, **kwargs: figures.append(subplots(*args, **kwargs))
                        or figures[-1])

    def trainer(rank: int) -> SimpleNamespace:
        return SimpleNamespace(world_size=2, global_rank=rank, is_global_zero=rank == 0, val_dataloaders=None,
                               test_dataloaders=loader, strategy=SimpleNamespace(root_device=torch.device("cpu")),
                               datamodule=datamodule,
                               test_loop=SimpleNamespace(_data_source=SimpleNamespace(instance=datamodule)))

    callback = LatentAugmentationGrid(output_dir=str(tmp_path / "run" / "grid"), num_images=4,
                                      split=lambda dm: dm.held_out, item_keys=("pixels", "digit"),
                                      normalization=((0.5,), (0.5,)))
    callback.on_test_end(trainer(1), model)
    assert not figures and not (tmp_path / "run" / "grid").exists()
    callback.on_test_end(trainer(0), model)
    assert (tmp_path / "run" / "grid" / "latent_augmentation_grid.png").stat().st_size > 1000
    _, axes = figures[0]
    x0 = images[[0, 3, 6, 9]]
    with torch.no_grad():
        expected = [x0, model.reconstruct(x0), torch.rot90(x0, 1, (-2, -1)), model.latent_augment(x0, 0),
                    torch.flip(x0, (-1,)), model.latent_augment(x0, 1), torch.flip(torch.rot90(x0, 1, (-2, -1)), (-1,)),
                    model.latent_compose(x0), model.latent_compose(x0, reverse=True)]
    assert axes.shape == (len(ROWS), 4)
    assert [axes[r, 0].get_ylabel() for r in range(len(ROWS))] == ROWS
    for r, batch in enumerate(expected):
        for c in range(4):
            tile = torch.as_tensor(axes[r, c].images[0].get_array().data)
            assert torch.allclose(tile, batch[c, 0].clamp(0, 1), atol=1e-6), (ROWS[r], c)
            assert axes[r, c].images[0].get_cmap().name == "gray"
    assert not torch.allclose(expected[7], expected[8], atol=1e-3)   # Eq. 5.9's order is told apart
    figure = figures[0][0]
    assert tuple(figure.get_size_inches()) == pytest.approx((1.1 * 4, 1.1 * len(ROWS)))
    label = axes[0, 0].yaxis.label
    assert (label.get_fontsize(), label.get_rotation(), label.get_horizontalalignment()) == (6, 0, "right")
    png = plt.imread(tmp_path / "run" / "grid" / "latent_augmentation_grid.png")
    assert png.shape[:2] == (round(1.1 * len(ROWS) * 110), round(1.1 * 4 * 110))   # 110 dpi
    callback.num_images = 1   # one column: still a (rows, 1) grid, drawn again into the existing folder
    callback.on_test_end(trainer(0), model)
    assert figures[1][1].shape == (len(ROWS), 1) and LatentAugmentationGrid().num_images == 8


def test_a_model_without_latent_augmentations_is_refused_at_test_setup_naming_them():
    """A classifier is refused when testing starts (not when fitting), naming what it lacks and the model to use."""
    with pytest.raises(TypeError, match="Linear has no augmented_set, reconstruct, latent_augment, latent_compose: "
                                        "use lit_robust.LAVAE or leave this callback out"):
        LatentAugmentationGrid().setup(None, torch.nn.Linear(2, 2), "test")
    LatentAugmentationGrid().setup(None, torch.nn.Linear(2, 2), "fit")
    LatentAugmentationGrid().setup(None, LAVAE(img_size=8, latent_dim=4, hidden=32), "test")
