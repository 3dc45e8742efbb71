"""python -m sweep [overrides]      one trial
python -m sweep -m lr=1e-4,1e-5,5e-4    one trial per value, in one process (the base model loads once)"""
import hydra
from omegaconf import DictConfig

from sweep.job import run_job


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    return run_job(cfg)


if __name__ == "__main__":
    main()
