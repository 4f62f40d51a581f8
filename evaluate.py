"""Evaluate a checkpoint with its experiment's config:
``python evaluate.py experiment=<name> ckpt_path=<run>/checkpoints/best.ckpt [trainer=ddp_cpu]``.

Runs validation and the test split with every configured (evaluation) callback and writes ``metrics.json`` —
the numbers of the training run's test phase. The model takes the hyperparameters saved in the checkpoint, except
``model.*`` keys given on the command line (e.g. ``model.num_samples=20``).
"""
import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lit_robust.runner import evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    evaluate(cfg, list(HydraConfig.get().overrides.task))


if __name__ == "__main__":
    main()
