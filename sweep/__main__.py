"""python -m sweep [overrides]      one trial
python -m sweep -m lr=1e-4,1e-5,5e-4    one trial per value, in one process (the base model loads once)
python -m sweep -m search=demo          an Optuna search (conf/search/)"""
import logging
import sys

import hydra

from common import stop
from sweep import CONF_DIR
from sweep.cli import preflight
from sweep.launchers.resume import resume_command
from sweep.logs import quiet_third_party

log = logging.getLogger("sweep")


def main() -> None:
    """Check the command line (about a second), then hand it to Hydra. Ctrl-C or SIGTERM stops after the current
    step: the runs KILLED, the resume command printed, exit status 130 or 143 (common/stop.py)."""
    argv = sys.argv[1:]
    preflight(argv)  # unreadable overrides and misspelt keys: refused before anything is created
    stop.install()
    stop.at_once(lambda: stop.say(_resume_hint(argv)))
    quiet_third_party()  # before sweep.job imports diffusers, whose imports set transformers off
    # imported here, after the check, on purpose: a typo is refused without waiting for torch and diffusers to load
    from sweep.job import run_job
    from sweep.tracking import close_open_runs

    # the task is run_job itself (importable by name), so that launchers can hand it to other processes
    try:
        hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")(run_job)()
    except stop.Stopped as exc:
        _stopped(argv, exc.signum, close_open_runs)
    except BaseException:  # an error Hydra reported (its exit status 1), a refusal (2): no run is left RUNNING
        if stop.requested():
            _stopped(argv, stop.requested(), close_open_runs)
        close_open_runs("FAILED")
        raise
    if stop.requested():  # the signal came when the work was done (its last records being written)
        _stopped(argv, stop.requested(), close_open_runs)
    close_open_runs("FAILED")  # none are left open by a sweep that ended well; a bug's leftovers are not RUNNING


def _resume_hint(argv: list[str]) -> str:
    return f"to continue: {resume_command(argv)}"


def _stopped(argv: list[str], signum: int, close_open_runs) -> None:
    """The runs this process left open KILLED (a trial's own are already), what to type to continue, the exit status
    a signal's stop has (130 for SIGINT, 143 for SIGTERM)."""
    n = close_open_runs("KILLED")
    what = f"{n} MLflow run(s) marked KILLED; " if n else ""
    print(f"stopped: {what}finished checkpoints and scores are kept\n{_resume_hint(argv)}", file=sys.stderr,
          flush=True)
    raise SystemExit(stop.Stopped(signum).exit_code)


if __name__ == "__main__":
    main()
