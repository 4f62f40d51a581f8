"""Config group choices (``experiment=``, ``data=``, ``model=``, ...), checked before anything heavy is imported: a
wrong name fails in a second, not after the seconds Lightning takes to import."""
from __future__ import annotations

from collections.abc import Mapping
from importlib import resources

# The Hydra configs: the repo's conf/, installed as this package (pyproject.toml), so they travel with the wheel.
CONFIG_MODULE = "lit_robust.conf"


def shipped_choices(group: str) -> list[str]:
    """The names of the package's configs of ``group`` (``experiment``, ``data``, ...)."""
    folder = resources.files(CONFIG_MODULE).joinpath(group)
    return sorted(entry.name[:-5] for entry in folder.iterdir() if entry.name.endswith(".yaml")) \
        if folder.is_dir() else []


def shipped_experiments() -> list[str]:
    return shipped_choices("experiment")


def check_choice(group: str, name: str | None) -> None:
    """A choice of a config group is the name of a file in the group's folder — the package's, or a user's on the
    search path (``--config-dir``) — never a path such as ``../model/ebm`` or ``../../../elsewhere/evil`` that
    reaches other config groups or YAML files outside the config folders (whose ``_target_`` the run would build)."""
    if isinstance(name, str) and ("/" in name or "\\" in name or ".." in name):
        article = "an" if group[0] in "aeiou" else "a"
        raise ValueError(f"{group}={name} is a path, not {article} {group} name; use one of: "
                         f"{', '.join(shipped_choices(group))} (or a file of your own {group}/ folder, added with "
                         "--config-dir)")


def check_experiment(name: str | None) -> None:
    check_choice("experiment", name)


def check_choices(choices: Mapping[str, str | None]) -> None:
    """:func:`check_choice` for every group a run chose (Hydra's ``runtime.choices``: ``data``, ``model``,
    ``callbacks``, ``trainer``, ``logger``, ``data_filter``, ``experiment``), except Hydra's own ``hydra/...``."""
    for group, name in choices.items():
        if not group.startswith("hydra"):
            check_choice(group, name)
