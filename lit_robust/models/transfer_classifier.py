"""Transfer from a pretrained feature extractor: re-initialise the linear layer, then train only that layer
(``mode="linear"``, fixed-feature transfer) or fine-tune everything (``mode="finetune"``, full-network transfer).
The victim of Bullseye Polytope's transfer threat models (BP §4; thesis 000 App. D.3.3 "Transfer Linear" and
"Transfer Fine-Tune"), the robust-feature transfer of Salman 2023 ch. 2 and the bias transfer of its ch. 7."""
from __future__ import annotations

import torch

from lit_robust.models.classifier import ImageClassifier
from lit_robust.models.nets import load_weights

MODES = ("linear", "finetune")


class TransferClassifier(ImageClassifier):
    """``ImageClassifier`` whose extractor comes from ``weights_path`` or, when that is null, from the datamodule's
    crafting extractor (``PoisonedDataModule.poisons.tensors["extractor_state"]``), so the victim sees the features
    the poisons were crafted against. In linear mode the extractor's weights are frozen; its BatchNorm statistics are
    too with ``freeze_bn_stats`` (the default: BP's victim, a fixed extractor in eval mode), or they follow the target
    data with ``freeze_bn_stats=False`` (Salman 2023 App. G.1.2, note 1: "we do not freeze the batch norm statistics,
    but only the weights", after Salman et al. 2020). Full fine-tuning always updates them. The optimiser and its
    ``weight_decay`` (``ImageClassifier``'s ``optimizer``: ``sgd``, ℓ2 added to the gradient as in Eq. G.1, or
    ``adamw``, decoupled) act on the trained parameters only."""

    def __init__(self, mode: str = "linear", freeze_bn_stats: bool = True, weights_path: str | None = None,
                 **kwargs):
        if mode not in MODES:
            raise ValueError(f"model.mode={mode!r}: use one of {MODES}")
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if weights_path:  # the extractor only: the source's head may have another number of classes
            load_weights(self.net, weights_path, keep=self.head_keys())

    def head(self) -> torch.nn.Module:
        net = self.net
        return net.get_classifier() if hasattr(net, "get_classifier") else net.head

    def head_keys(self) -> list[str]:
        """The keys of ``net.state_dict()`` that belong to the head."""
        name = next(name for name, module in self.net.named_modules() if module is self.head())
        return [key for key in self.net.state_dict() if key.startswith(f"{name}.")]

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        poisons = getattr(getattr(self.trainer, "datamodule", None), "poisons", None)
        state = None if poisons is None else poisons.tensors.get("extractor_state")
        if self.hparams.weights_path is None:
            if state is None:
                raise ValueError("TransferClassifier needs an extractor: set model.weights_path, or use a "
                                 "PoisonedDataModule whose attack stores one (bullseye_polytope)")
            self.load_state_dict(state, strict=False)
        for module in self.head().modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        if self.hparams.mode == "linear":
            head_params = {id(p) for p in self.head().parameters()}
            for p in self.net.parameters():
                p.requires_grad_(id(p) in head_params)

    def on_train_epoch_start(self) -> None:
        if self.hparams.mode == "linear" and self.hparams.freeze_bn_stats:
            for module in self.net.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def configure_optimizers(self):
        config = super().configure_optimizers()
        optimizer = config["optimizer"] if isinstance(config, dict) else config
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if p.requires_grad]
        return config
