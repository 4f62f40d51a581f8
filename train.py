"""Train any method: ``python train.py experiment=<name> [trainer=ddp_cpu] [key=value ...]``.

Fits, then tests the best checkpoint; ``metrics.json``, ``config.yaml`` and ``checkpoints/`` land in the run's
output dir (``hydra.run.dir=...``). ``ckpt_path=...`` resumes a fit where it stopped.
"""
import hydra
from omegaconf import DictConfig

from lit_robust.runner import fit_and_test


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    fit_and_test(cfg)


if __name__ == "__main__":
    main()
