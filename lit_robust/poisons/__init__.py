"""Poisoning attacks as pure functions ``craft_<name>(data, *, generator, progress, **params) -> Poisons``.

``ATTACKS`` maps the config name to the function; ``attack_defaults(name)`` gives its keyword defaults (the values a
config may override), so the manifest always records every parameter that shaped the poisons.
"""
from __future__ import annotations

import inspect

from lit_robust.poisons.badnets import craft_badnets
from lit_robust.poisons.crafted import CraftingData, Poisons, additive_trigger, apply_trigger, stamp_trigger
from lit_robust.poisons.narcissus import craft_narcissus
from lit_robust.poisons.planted import craft_planted
from lit_robust.poisons.gradient_matching import craft_gradient_matching
from lit_robust.poisons.bullseye import craft_bullseye_polytope
from lit_robust.poisons.logo import craft_logo
from lit_robust.poisons.narcissus_all_classes import craft_narcissus_all_classes

ATTACKS = {"badnets": craft_badnets, "narcissus": craft_narcissus, "gradient_matching": craft_gradient_matching,
           "bullseye_polytope": craft_bullseye_polytope, "planted": craft_planted, "logo": craft_logo,
           "narcissus_all_classes": craft_narcissus_all_classes}


def attack_defaults(name: str) -> dict:
    """The keyword defaults of attack ``name`` (every parameter except ``data``, ``generator`` and ``progress``)."""
    if name not in ATTACKS:
        raise ValueError(f"attack={name!r}: use one of {sorted(ATTACKS)}")
    return {key: param.default for key, param in inspect.signature(ATTACKS[name]).parameters.items()
            if param.kind is inspect.Parameter.KEYWORD_ONLY and key not in ("generator", "progress")}


__all__ = ["ATTACKS", "attack_defaults", "CraftingData", "Poisons", "apply_trigger", "additive_trigger",
           "stamp_trigger", "craft_badnets", "craft_narcissus", "craft_gradient_matching", "craft_bullseye_polytope",
           "craft_planted", "craft_logo", "craft_narcissus_all_classes"]
