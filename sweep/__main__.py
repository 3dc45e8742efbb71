"""python -m sweep [overrides]      one trial
python -m sweep -m lr=1e-4,1e-5,5e-4    one trial per value, in one process (the base model loads once)
python -m sweep -m search=demo          an Optuna search (conf/search/)"""
import sys

import hydra

from sweep import CONF_DIR
from sweep.cli import preflight
from sweep.logs import quiet_third_party


def main() -> None:
    """Check the command line (about a second), then hand it to Hydra."""
    preflight(sys.argv[1:])  # unreadable overrides and misspelt keys: refused before anything is created
    quiet_third_party()  # before sweep.job imports diffusers, whose imports set transformers off
    # imported here, after the check, on purpose: a typo is refused without waiting for torch and diffusers to load
    from sweep.job import run_job

    # the task is run_job itself (importable by name), so that launchers can hand it to other processes
    hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")(run_job)()


if __name__ == "__main__":
    main()
