"""Evaluate a checkpoint with its experiment's config:
``python evaluate.py experiment=<name> ckpt_path=<run>/checkpoints/best.ckpt [trainer=ddp_cpu]``.

Runs validation and the test split with every configured (evaluation) callback and writes ``metrics.json`` —
the numbers of the training run's test phase.
"""
import hydra
from omegaconf import DictConfig

from lit_robust.runner import build


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    datamodule, model, trainer = build(cfg)
    trainer.validate(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    trainer.test(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)


if __name__ == "__main__":
    main()
