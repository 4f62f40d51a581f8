"""lit-robust: a PyTorch Lightning trainer for robust machine learning.

One folder per role, imports pointing down only: ``storage`` (files) and ``datasets`` (plain tensor data) →
``functional`` (pure tensor math) → ``models`` (the LightningModules, re-exported here) → ``poisons`` →
``datamodules`` (clean, poisoned and shifted data) and ``callbacks`` (the defences, usable in any Lightning
``Trainer``) → ``run`` (configs to objects, the console scripts).

The LightningModules are imported on first use (PEP 562), so that ``import lit_robust.<light module>`` — the entry
points checking their arguments — does not pay the seconds Lightning takes to import.
"""
from importlib import import_module

_MODULES = {"AdversarialClassifier": "adversarial", "BayesianVAE": "bayesian_vae", "CausalVAE": "causal_vae",
            "ClassSubsetEnsemble": "class_subset_ensemble",
            "CSHTest": "cshtest", "CSVHTest": "cshtest", "DDPM": "ddpm", "DeepCAMA": "deep_cama", "EBM": "ebm",
            "ImageClassifier": "classifier", "LAVAE": "lavae", "SCNN": "scnn",
            "SmoothedClassifier": "smoothed_classifier", "SmoothedViT": "smoothed_vit",
            "TransferClassifier": "transfer_classifier", "Unadversarial": "unadversarial",
            "LatentDiffusion": "latent_diffusion"}  # class → its module in lit_robust.models
__all__ = sorted(_MODULES)


def __getattr__(name: str):
    if name in _MODULES:
        value = getattr(import_module(f"lit_robust.models.{_MODULES[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lit_robust' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
