"""Evaluate a checkpoint: ``python evaluate.py experiment=<name> ckpt_path=<run>/checkpoints/best.ckpt`` (installed:
``lit-robust-evaluate``); see ``lit_robust.run.cli.evaluate``."""
from lit_robust.run.cli import evaluate

if __name__ == "__main__":
    evaluate()
