"""Errors a user can act on. Their message names the bad value and the fix; callers print it without a traceback."""


class UserError(Exception):
    """Base of every error caused by input (config, photos, model source, machine) rather than a bug."""


class ConfigError(UserError):
    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(self.problems))


class DataError(UserError):
    pass


class ModelSourceError(UserError):
    pass


class DeviceError(UserError):
    pass


class NonFiniteLossError(UserError):
    """Training diverged. The checkpoints written before `step` are intact."""

    def __init__(self, step: int, loss: float, last_checkpoint: str | None, what: str = "loss"):
        self.step, self.loss, self.last_checkpoint = step, loss, last_checkpoint
        keep = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
        super().__init__(f"{what} became {loss} at step {step}; the trial was stopped and {keep}. "
                         f"A lower learning rate (lr) or max_grad_norm usually fixes this.")


class DiskFullError(UserError):
    """A checkpoint could not be written for lack of space; the ones before it are intact."""
