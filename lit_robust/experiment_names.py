"""Experiment names, checked before anything heavy is imported: a wrong name fails in a second, not after the
seconds Lightning takes to import."""
from __future__ import annotations

from importlib import resources

# The Hydra configs: the repo's conf/, installed as this package (pyproject.toml), so they travel with the wheel.
CONFIG_MODULE = "lit_robust.conf"


def shipped_experiments() -> list[str]:
    return sorted(entry.name[:-5] for entry in resources.files(CONFIG_MODULE).joinpath("experiment").iterdir()
                  if entry.name.endswith(".yaml"))


def check_experiment(name: str | None) -> None:
    """An experiment is the name of a file in an ``experiment/`` config folder — the package's, or a user's on the
    search path (``--config-dir``) — never a path such as ``../model/ebm`` that reaches other config groups."""
    if name is not None and ("/" in name or "\\" in name or ".." in name):
        raise ValueError(f"experiment={name} is a path, not an experiment name; use one of: "
                         f"{', '.join(shipped_experiments())} (or a file of your own experiment/ folder, added with "
                         "--config-dir)")
