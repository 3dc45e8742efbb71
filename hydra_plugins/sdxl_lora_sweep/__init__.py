"""Hydra plugins of sdxl-lora-sweep. Hydra 1.3 loads sweeper and launcher classes only from the `hydra_plugins`
namespace package, so these thin classes live here and delegate to `sweep` (imported only when used)."""

from typing import Any, Sequence

from hydra.plugins.launcher import Launcher


class DelegatingLauncher(Launcher):
    """A launcher whose work is done by `self.impl` (set by the subclass), a class in `sweep`."""

    impl: Any

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.impl.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Any:
        return self.impl.launch(job_overrides, initial_job_idx)
