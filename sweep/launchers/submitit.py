"""Slurm through submitit: the sweep's batches (sweep/plan.py), one Slurm job each, whose jobs train together as
packs on the job's GPU (`pack_size` trainings at most; 1: a Slurm job per trial), as hydra/launcher=packed does on
one machine. Built on Hydra's submitit launcher (hydra-submitit-launcher, the `[slurm]` extra), imported only when
this launcher is used: its executor settings, its array submission and its requeue on preemption or timeout
(`max_num_timeout`: the batch is submitted again and its trials resume from their checkpoints).

On the node, the batch runs as in a process of hydra/launcher=processes (process.execute_batch): every job's config
composed there, in the launching command's sweep folder. A Slurm job that fails (killed, node lost, out of time
with no requeue left) has each of its trials reported lost by name (process.lost_job); the other batches go on, and
the sweep's end marks the lost trials failed and exits 1."""
from __future__ import annotations

import logging
import os
from typing import Any, Sequence

from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
from omegaconf import OmegaConf

from .packing import check_pack_size, in_launch_order, plan_jobs
from .process import batch_returns, execute_batch, lost_batch, prepare_launch

log = logging.getLogger(__name__)


class PackedSubmititLauncher(BaseSubmititLauncher):
    """Hydra's submitit launcher with one submitit job per batch of the plan. `executor`: "slurm" or "local"."""

    def __init__(self, executor: str, pack_size: int = 8, **params: Any) -> None:
        super().__init__(**params)
        self._EXECUTOR = executor
        self.pack_size = check_pack_size(pack_size)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
        sweep_dir, state = prepare_launch(self.config)
        jobs = [(initial_job_idx + i, list(o)) for i, o in enumerate(job_overrides)]
        kind = "Slurm job" if self._EXECUTOR == "slurm" else "submitit job"
        plan = plan_jobs(self.hydra_context, self.config, jobs, self.pack_size,
                         lambda p: p.label(lambda b: f"{kind} {b} of the array"))
        if plan is None:  # plan_only=true
            return []
        batches = [[jobs[i] for i in positions] for positions in plan.batches]
        log.info("submitit %r: %d batch(es) of %d job(s) into %s", self._EXECUTOR, len(batches), len(jobs), sweep_dir)
        numbers = list(range(1, len(batches) + 1))
        submitted = self._executor().map_array(self, numbers, batches, [state] * len(batches),
                                               [sweep_dir.name] * len(batches))
        outs = []
        for number, batch, job in zip(numbers, batches, submitted):
            try:
                outcome = job.results()[0]
            except Exception as exc:  # the job failed outside its trials (killed, node lost, out of time)
                why = f"its {kind} {job.job_id} ended abnormally ({type(exc).__name__}: {str(exc)[-500:]})"
                outs.append(lost_batch(sweep_dir, batch, why))
                continue
            outs.append(batch_returns(sweep_dir, batch, outcome))
        return in_launch_order(plan, outs)

    def __call__(self, number: int, batch: list, singleton_state, sweep_name: str):  # on the node
        threads = int(self.params.get("cpus_per_task") or os.cpu_count() or 1)
        return execute_batch(number, batch, self.hydra_context, self.config, singleton_state, self.task_function,
                             sweep_name, None, threads)

    def _executor(self):
        """submitit's executor with this launcher's settings, as Hydra's submitit launcher makes it."""
        import submitit

        init_keys = {"max_num_timeout"}
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, folder=self.params["submitit_folder"],
                                         **{f"{self._EXECUTOR}_{k}": v for k, v in self.params.items()
                                            if k in init_keys})
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in base else f"{self._EXECUTOR}_{k}": v for k, v in self.params.items()
                                      if k not in init_keys | {"submitit_folder"}})
        return executor
