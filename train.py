"""Train any method: ``python train.py experiment=<name> [trainer=ddp_cpu] [key=value ...]``.

Fits, then tests the best checkpoint; ``metrics.json``, ``config.yaml`` and ``checkpoints/`` land in the run's
output dir (``hydra.run.dir=...``). ``ckpt_path=...`` resumes a fit where it stopped.
"""
import hydra
from omegaconf import DictConfig

from lit_robust.runner import build


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    datamodule, model, trainer = build(cfg)
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    if cfg.test:
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.test(model, datamodule=datamodule, ckpt_path=best or None)


if __name__ == "__main__":
    main()
