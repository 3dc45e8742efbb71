"""The search space, from Hydra's sweep syntax on the command line or in a search config, as Optuna distributions."""
from __future__ import annotations

import math
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from trainer import ConfigError

from ..cli import did_you_mean
from ..config import flatten


def parse_space(params: dict[str, str] | None, arguments: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Distributions by parameter name, and the fixed overrides every trial gets.

    Accepts Hydra's sweep syntax: choice(4,8,16) (categorical), range(4,33,4) (stepped int/float, end excluded),
    interval(1e-5,5e-4) (uniform float), int(interval(1,64)) (integers), tag(log, interval(...)) (log scale).
    Command-line overrides win over `params` from a search config."""
    parser = OverridesParser.create()
    items = [f"{k}={v}" for k, v in (params or {}).items()] + list(arguments)
    try:
        overrides = parser.parse_overrides(items)
    except Exception as exc:
        raise ConfigError([f"search space: {exc}".splitlines()[0] + " (write e.g. 'lr=tag(log, interval(1e-5, 5e-4))' "
                           "or 'lora.rank=choice(4,8,16)')"]) from None
    space: dict[str, Any] = {}
    fixed: dict[str, str] = {}
    problems = []
    for o in overrides:
        key = o.get_key_element()
        if o.is_sweep_override():
            try:
                space[key] = _distribution(key, o)
                fixed.pop(key, None)
            except ValueError as exc:
                problems.append(str(exc))
        else:
            fixed[key] = o.input_line
            space.pop(key, None)
    if problems:
        raise ConfigError(problems)
    if not space:
        raise ConfigError(["the Optuna sweeper got no search space: give one, e.g. 'lr=tag(log, interval(1e-5, 5e-4))' "
                           "'lora.rank=choice(4,8,16)', or search=rank_lr"])
    return space, list(fixed.values())


def _distribution(key: str, o) -> Any:
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    v = o.value()
    tags = set(getattr(v, "tags", set()) or set())
    log_scale = "log" in tags
    if isinstance(v, ChoiceSweep):
        choices = list(o.sweep_iterator())
        if not choices:
            raise ValueError(f"{key}=choice(): no values to choose from; list at least one")
        if log_scale:
            raise ValueError(f"{key}: tag(log, ...) applies to interval(...), not to choice(...)")
        return CategoricalDistribution(choices)
    if isinstance(v, RangeSweep):
        start, stop, step = v.start, v.stop, v.step
        if step is None or step <= 0 or start is None or stop is None or start >= stop:
            raise ValueError(f"{key}=range({start}, {stop}, {step}) is empty or inverted: range(start, end, step) "
                             "needs start < end and step > 0 (the end is excluded)")
        if all(isinstance(x, int) for x in (start, stop, step)):
            last = start + (stop - 1 - start) // step * step
            return IntDistribution(start, last, step=step, log=False)
        n = int(math.floor((stop - start) / step - 1e-9))
        return FloatDistribution(start, start + n * step, step=step)
    if isinstance(v, IntervalSweep):
        lo, hi = v.start, v.end
        if lo is None or hi is None or not lo < hi:
            raise ValueError(f"{key}=interval({lo}, {hi}) is empty or inverted: write interval(low, high) with low < high")
        if log_scale and lo <= 0:
            raise ValueError(f"{key}=tag(log, interval({lo}, {hi})): a log scale needs bounds > 0; raise the low bound "
                             f"(e.g. interval({hi / 100:g}, {hi}))")
        if isinstance(lo, int) and isinstance(hi, int):
            return IntDistribution(lo, hi, log=log_scale)
        return FloatDistribution(float(lo), float(hi), log=log_scale)
    raise ValueError(f"{key}: {o.input_line!r} is not a search space the Optuna sweeper knows "
                     "(choice, range, interval, tag(log, interval))")


def check_keys(space: dict[str, Any], config) -> None:
    """Every searched parameter must exist in the composed config; misspellings get the close matches."""
    cfg = OmegaConf.to_container(config, resolve=False)
    cfg.pop("hydra", None)
    known = set(flatten(cfg))  # a searched parameter is a value, so the leaf keys are the ones to match
    problems = []
    for key in space:
        k = key.lstrip("+~")
        if k not in known and not key.startswith("+"):
            close = did_you_mean(k, known)
            hint = f"; did you mean {' or '.join(close)}?" if close else " (`python -m sweep --cfg job` lists them)"
            problems.append(f"search parameter {k!r} is not in the config{hint}")
    if problems:
        raise ConfigError(problems)


def suggest(trial, space: dict[str, Any]) -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution, IntDistribution

    out = {}
    for k, d in space.items():
        if isinstance(d, CategoricalDistribution):
            out[k] = trial.suggest_categorical(k, d.choices)
        elif isinstance(d, IntDistribution):
            out[k] = trial.suggest_int(k, d.low, d.high, step=d.step, log=d.log)
        else:
            out[k] = trial.suggest_float(k, d.low, d.high, step=d.step, log=d.log)
    return out


def override_value(v: Any) -> str:
    return repr(v) if isinstance(v, float) else str(v)


def space_signature(space: dict[str, Any]) -> dict[str, str]:
    from optuna.distributions import distribution_to_json

    return {k: distribution_to_json(d) for k, d in sorted(space.items())}
