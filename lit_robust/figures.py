"""Figures of a purification run: images before/after and the ℓ2 trajectory of the thesis' Fig. 6.2."""
from __future__ import annotations

from pathlib import Path

import torch


def trajectory_distances(clean: torch.Tensor, poisoned: torch.Tensor, clean_records: list[torch.Tensor],
                         poisoned_records: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean ℓ2 distances along the chains (thesis Fig. 6.2): ‖x − Ψ_T(x)‖ (clean purified), ‖x − Ψ_T(x + δ)‖
    (poisoned purified, from the clean image) and ‖(x + δ) − Ψ_T(x + δ)‖ (poisoned purified, from its start)."""
    def mean_l2(a, b):
        return (a - b).flatten(1).norm(dim=1).mean()

    return {"clean_vs_clean_purified": torch.stack([mean_l2(clean, r) for r in clean_records]),
            "clean_vs_poisoned_purified": torch.stack([mean_l2(clean, r) for r in poisoned_records]),
            "poisoned_vs_poisoned_purified": torch.stack([mean_l2(poisoned, r) for r in poisoned_records])}


def save_trajectory_plot(steps: list[int], distances: dict[str, torch.Tensor], path: str | Path,
                         marker: int | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for (name, values), color in zip(distances.items(), ("tab:blue", "tab:green", "tab:orange")):
        ax.plot(steps, values.cpu().numpy(), label=name.replace("_", " "), color=color)
    if marker is not None:
        ax.axvline(marker, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("Langevin steps")
    ax.set_ylabel("mean ℓ2 distance")
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_before_after_grid(before: torch.Tensor, after: torch.Tensor, path: str | Path) -> None:
    """Two rows of [0, 1] images: originals on top, purified below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(before)
    fig, axes = plt.subplots(2, n, figsize=(1.1 * n, 2.4), squeeze=False)
    for row, images in enumerate((before, after)):
        for col in range(n):
            image = images[col].detach().cpu().permute(1, 2, 0).clamp(0, 1).numpy()
            axes[row, col].imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
            axes[row, col].axis("off")
    axes[0, 0].set_title("before", fontsize=7, loc="left")
    axes[1, 0].set_title("after", fontsize=7, loc="left")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
