"""lit-robust: a PyTorch Lightning trainer for robust machine learning.

``lit_robust`` holds the LightningModules and shared nets; ``lit_robust.datamodules`` the clean, poisoned and shifted
data; ``lit_robust.callbacks`` the defences (purification, certification, filtering, OOD detection) usable in any
Lightning ``Trainer``.

The LightningModules are imported on first use (PEP 562), so that ``import lit_robust.<light module>`` — the entry
points checking their arguments — does not pay the seconds Lightning takes to import.
"""
from importlib import import_module

_MODULES = {"BayesianVAE": "bayesian_vae", "CausalVAE": "causal_vae", "DDPM": "ddpm", "DeepCAMA": "deep_cama",
            "EBM": "ebm", "ImageClassifier": "classifier", "LAVAE": "lavae",
            "SmoothedClassifier": "smoothed_classifier", "SmoothedViT": "smoothed_vit",
            "TransferClassifier": "transfer_classifier", "AdversarialClassifier": "adversarial"}
__all__ = sorted(_MODULES)


def __getattr__(name: str):
    if name in _MODULES:
        value = getattr(import_module(f"lit_robust.{_MODULES[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lit_robust' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
