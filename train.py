"""Train any method: ``python train.py experiment=<name> [trainer=ddp_cpu] [key=value ...]`` (installed:
``lit-robust-train``); see ``lit_robust.run.cli.train``."""
from lit_robust.run.cli import train

if __name__ == "__main__":
    train()
