"""python -m sweep [overrides]      one trial
python -m sweep -m lr=1e-4,1e-5,5e-4    one trial per value, in one process (the base model loads once)
python -m sweep -m search=demo          an Optuna search (conf/search/)"""
import hydra

from sweep import CONF_DIR
from sweep.job import run_job

# the task is run_job itself (importable by name), so that launchers can hand it to other processes
main = hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")(run_job)


if __name__ == "__main__":
    main()
