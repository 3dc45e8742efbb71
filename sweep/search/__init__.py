"""Optuna search: the search space from Hydra's sweep syntax (space), the study with its samplers, pruners and
storage (study), the handle through which a job reports checkpoint scores and is pruned (link), and the Hydra
sweeper that asks the study for trials and launches them as jobs with `optuna_trial=<number>` (sweeper). Only this
package imports optuna."""
from .link import TrialLink, objective_value
from .space import check_keys, override_value, parse_space, space_signature, suggest
from .study import (SCORE, SearchSettings, budget, check_settings, coordinates, make_pruner, make_sampler,
                    open_storage, open_study, pareto_rows, recover, worker_attrs)

__all__ = ["SCORE", "SearchSettings", "TrialLink", "budget", "check_keys", "check_settings", "coordinates",
           "make_pruner", "make_sampler", "objective_value", "open_storage", "open_study", "override_value",
           "parse_space", "pareto_rows", "recover", "space_signature", "suggest", "worker_attrs"]
