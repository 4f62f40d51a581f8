"""Measure a causal generative model's counterfactual images with a factor regressor trained on rendered scenes
(thesis 000 §3.6.1: interventions must propagate from parents to children only).

After testing, a small CNN regresses the four Pendulum factors from the DataModule's rendered training images; the
report then decodes do(factor = value) for a sweep of values on test images and reads the factors back. Keys
(factor changes as fractions of the factor's range, relative to the regressed values of the plain reconstructions):
``cf/do_<f>/<g>_change`` and ``cf/do_<f>/<f>_tracking`` (|regressed − set value| / range); the regressor's own
error on real test images ``cf/regressor_mae/<g>``; where the DataModule simulates interventions
(``intervene(factors, **values)``, Pendulum), the change the true SCM makes, ``cf/do_<f>/<g>_true_change``; grid
``counterfactual_grid.png`` (rows = intervened factor, columns = values, first column the input).
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from typing_extensions import override

from lit_robust.callbacks.contract import RankZeroReport, SplitRef, evaluated_split
from lit_robust.models.nets import create_backbone
from lit_robust.storage.cache import fingerprint, load_verified, save_atomic


def fit_factor_regressor(images: torch.Tensor, targets: torch.Tensor, epochs: int = 10, batch_size: int = 128,
                         lr: float = 2e-3, seed: int = 0, widths: tuple[int, ...] = (32, 64, 128)) -> torch.nn.Module:
    """A ``small_cnn`` with one output per factor, trained by MSE on standardised ``targets`` (N, F); returns a
    module mapping images to targets in their original units."""
    torch.manual_seed(seed)
    mean, std = targets.mean(0), targets.std(0).clamp_min(1e-6)
    net = create_backbone("small_cnn", num_classes=targets.shape[1], in_chans=images.shape[1], widths=tuple(widths))
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(images) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(images)).split(batch_size):
            loss = F.mse_loss(net(images[idx]), (targets[idx] - mean) / std)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return FactorRegressor(net.eval(), mean, std)


class FactorRegressor(torch.nn.Module):
    def __init__(self, net: torch.nn.Module, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.net = net
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images) * self.std + self.mean


class CounterfactualReport(RankZeroReport):
    """Counterfactual acceptance numbers and grid for a model with ``intervene(x, factor, value)`` and
    ``reconstruct(x)`` (``CausalVAE``), on a DataModule whose targets are the factors (``PendulumDataModule``): the
    train and test splits the loops iterate (``train_split`` / ``split``, ``item_keys``, ``normalization``:
    contract), the numbers logged on every rank (:class:`~lit_robust.callbacks.contract.RankZeroReport`), the grid in
    ``output_dir`` (default: the trainer's output folder). The regressor reads images in [0, 1]; the model is handed
    the loader's pixel space and its images are read back from it."""

    def __init__(self, output_dir: str | None = None,
                 factors: list[str] = ("theta", "sun", "shadow_length", "shadow_position"), num_values: int = 5,
                 eval_size: int = 200, regressor_epochs: int = 10, regressor_widths: list[int] = (32, 64, 128),
                 seed: int = 0, cache_dir: str | None = None, split=None, train_split=None,
                 item_keys: tuple | None = None, normalization=None):
        super().__init__(split, item_keys, normalization, output_dir)
        self.factors, self.num_values, self.train_split = list(factors), num_values, train_split
        self.eval_size, self.regressor_epochs, self.seed, self.cache_dir = eval_size, regressor_epochs, seed, cache_dir
        self.regressor_widths = tuple(regressor_widths)

    def _regressor(self, train_x, train_f) -> FactorRegressor:
        path = None
        if self.cache_dir:
            key = fingerprint(train_x[:32], train_f, self.regressor_epochs, self.regressor_widths, self.seed)
            path = Path(self.cache_dir) / f"factor_regressor-{key}.pt"
            cached = load_verified(path)  # a state dict: caches hold tensors only
            if cached is not None:
                net = create_backbone("small_cnn", num_classes=train_f.shape[1], in_chans=train_x.shape[1],
                                      widths=self.regressor_widths)
                regressor = FactorRegressor(net, torch.zeros(train_f.shape[1]), torch.ones(train_f.shape[1]))
                regressor.load_state_dict(cached)
                return regressor.eval()
        regressor = fit_factor_regressor(train_x, train_f, self.regressor_epochs, seed=self.seed,
                                         widths=self.regressor_widths)
        if path:
            save_atomic(path, regressor.state_dict())
        return regressor

    @override
    def required_methods(self) -> dict[str, str]:
        return {"reconstruct": "(x) → the model's reconstructions of the loader's images x",
                "intervene": "(x, factor, value) → the counterfactual images of x under do(factor = value)"}

    @override
    def run_report(self, trainer: L.Trainer, model: L.LightningModule) -> dict[str, float]:
        train = self.item_format.stack(SplitRef(trainer, "train", self.train_split, "CounterfactualReport").dataset)
        test = self.item_format.stack(evaluated_split(trainer, "test", self.split, "CounterfactualReport"))
        return self.measure(model, (self.pixel_space.to_unit(train[0]), train[1]),
                            (self.pixel_space.to_unit(test[0]), test[1]),
                            getattr(trainer.datamodule, "intervene", None), self.outputs(trainer))

    def measure(self, model, train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
                simulate, folder: Path) -> dict[str, float]:
        """The metrics of ``model`` from the ([0, 1] images, factors) of the train and test splits; ``simulate``: the
        data's own SCM (``intervene(factors, **values)``), where it has one; the grid goes to ``folder``."""
        (train_x, train_f), (test_x, test_f) = train, test
        if test_f.ndim != 2 or test_f.shape[1] != len(self.factors):
            raise ValueError(f"CounterfactualReport measures the factors {self.factors}, but the split's targets "
                             f"have shape {tuple(test_f.shape)}: use a DataModule whose targets are these factors, "
                             "one column each, or pass factors= naming its columns")
        regressor = self._regressor(train_x, train_f).to(model.device)

        def read_back(method, unit: torch.Tensor, *args) -> torch.Tensor:
            """The model's ``method`` of [0, 1] images handed over in the loader's space, its images back in [0, 1]."""
            return self.pixel_space.to_unit(method(self.pixel_space.from_unit(unit), *args), check=False)

        model.eval()
        x, f = test_x[:self.eval_size].to(model.device), test_f[:self.eval_size].to(model.device)
        span = train_f.max(0).values - train_f.min(0).values
        low, high = train_f.min(0).values + 0.1 * span, train_f.max(0).values - 0.1 * span
        metrics, grid = {}, []
        with torch.no_grad():
            for j, name in enumerate(self.factors):
                metrics[f"cf/regressor_mae/{name}"] = ((regressor(x)[:, j] - f[:, j]).abs().mean() / span[j]).item()
            base = regressor(read_back(model.reconstruct, x))
            for i, name in enumerate(self.factors):
                values = torch.linspace(low[i].item(), high[i].item(), self.num_values)
                changes, true_changes = torch.zeros(len(self.factors)), torch.zeros(len(self.factors))
                tracking, row = 0.0, [x[:1]]
                for value in values.tolist():
                    counterfactual = read_back(model.intervene, x, name, value)
                    read = regressor(counterfactual)
                    changes += ((read - base).abs().mean(0) / span.to(read.device)).cpu()
                    if simulate is not None:
                        true_changes += ((simulate(f, **{name: value}) - f).abs().mean(0).cpu() / span)
                    tracking += ((read[:, i] - value).abs().mean() / span[i]).item()
                    row.append(counterfactual[:1])
                grid.append(torch.cat(row))
                for j, other in enumerate(self.factors):
                    key = f"cf/do_{name}/{other}_{'tracking' if j == i else 'change'}"
                    metrics[key] = tracking / len(values) if j == i else (changes[j] / len(values)).item()
                    if simulate is not None and j != i:
                        metrics[f"cf/do_{name}/{other}_true_change"] = (true_changes[j] / len(values)).item()
        self._plot(torch.stack(grid).cpu(), folder)
        return metrics

    def _plot(self, grid: torch.Tensor, folder: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows, cols = grid.shape[:2]
        fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows), squeeze=False)
        for r in range(rows):
            for c in range(cols):
                axes[r, c].imshow(grid[r, c].permute(1, 2, 0).clamp(0, 1).numpy())
                axes[r, c].set_xticks([]), axes[r, c].set_yticks([])
            axes[r, 0].set_ylabel(f"do({self.factors[r]})", fontsize=7)
        axes[0, 0].set_title("input", fontsize=7)
        fig.tight_layout()
        folder.mkdir(parents=True, exist_ok=True)
        fig.savefig(folder / "counterfactual_grid.png", dpi=110)
        plt.close(fig)
