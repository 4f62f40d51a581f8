"""What an adversarial training step costs against a standard one (issue #32: ≤ attack steps + 1.3 standard steps):
one optimiser step of ``ImageClassifier``'s loss and of the model's own adversarial loss on the same model, batch and
device, timed interleaved (``benchmarks/timing.py``), optionally under bf16 autocast as ``precision=bf16-mixed`` runs
it. Used by ``adversarial_digits_table.py`` (CPU) and ``gpu_check.py`` (CIFAR-10's PreAct ResNet-18)."""
from __future__ import annotations

import contextlib

import torch
from timing import interleaved, print_table


def step_timings(model, x: torch.Tensor, y: torch.Tensor, repeats: int = 5, bf16: bool = False) -> dict:
    """Interleaved seconds of a standard and an adversarial optimiser step (``model`` an ``AdversarialClassifier``
    in train mode, ``x``/``y`` one batch on its device); returns the printed table plus ``ratio`` (adversarial /
    standard, minimum over repeats) and the model's attack steps."""
    from lit_robust.models.classifier import ImageClassifier

    optimizer = torch.optim.AdamW(model.parameters())
    autocast = (lambda: torch.autocast(x.device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def step(loss_of) -> None:
        with autocast():
            loss, _ = loss_of(model, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if x.device.type == "cuda":
            torch.cuda.synchronize()

    method = f"{model.hparams.method} step"
    timings = interleaved({"standard step": lambda: step(ImageClassifier.training_loss),
                           method: lambda: step(type(model).training_loss)}, repeats=repeats)
    table = print_table(timings, reference="standard step", work=len(x), unit="images")
    return {"ratio": timings[method].best / timings["standard step"].best, "method": model.hparams.method,
            "attack_steps": model.hparams.attack_steps, "bf16": bf16, "batch": len(x), "timings": table}
