"""The Optuna search: search-space syntax, bad input refused before training, the trainer's checkpoint hook,
and the study storage (dead trials failed and re-queued, budget, mismatching studies refused)."""
import json
import math
import multiprocessing
import os
import socket

import optuna
import pytest
import torch
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
from safetensors.torch import load_file

from sweep import search
from trainer import ConfigError, TrialSpec, train

from .conftest import compose_cfg


def test_search_space_syntax_becomes_optuna_distributions():
    space, fixed = search.parse_space(
        {"lr": "tag(log, interval(1e-5, 5e-4))", "lora.rank": "choice(4, 8)"},
        ["lora.rank=choice(4,8,16,32)", "train.max_steps=range(100, 501, 100)", "lora.alpha=int(interval(1, 8))", "train.noise_offset=interval(0, 0.1)",
         "steps=30", "search=demo"])
    assert space["lr"] == FloatDistribution(1e-5, 5e-4, log=True)
    assert space["lora.rank"] == CategoricalDistribution([4, 8, 16, 32])  # the command line wins over the file
    assert space["train.max_steps"] == IntDistribution(100, 500, step=100)  # range's end is excluded
    assert space["lora.alpha"] == IntDistribution(1, 8)  # int(interval(...)): integers
    assert space["train.noise_offset"] == FloatDistribution(0.0, 0.1)  # interval(...) is continuous, as in Hydra
    assert fixed == ["steps=30", "search=demo"]


@pytest.mark.parametrize("override, needle", [
    ("lr=interval(5e-4, 1e-5)", "lr=interval(0.0005, 1e-05) is empty or inverted"),
    ("lr=interval(1e-4, 1e-4)", "is empty or inverted"),
    ("lr=tag(log, interval(0, 1e-3))", "a log scale needs bounds > 0"),
    ("lora.rank=range(8, 4)", "lora.rank=range(8, 4, 1) is empty or inverted"),
    ("lr=tag(log, choice(1e-4, 1e-5))", "tag(log, ...) applies to interval"),
])
def test_bad_ranges_are_named_with_the_fix(override, needle):
    with pytest.raises(ConfigError) as e:
        search.parse_space(None, [override])
    assert needle in str(e.value)


def test_no_search_space_is_an_error():
    with pytest.raises(ConfigError, match="got no search space"):
        search.parse_space(None, ["steps=30"])


def test_unknown_parameter_names_close_matches():
    cfg = compose_cfg()
    search.check_keys({"lr": None, "lora.rank": None, "+lora.new_key": None}, cfg)
    with pytest.raises(ConfigError) as e:
        search.check_keys({"lora.rnak": None, "train.lrr": None}, cfg)
    msg = str(e.value)
    assert "'lora.rnak' is not in the config; did you mean lora.rank" in msg
    assert "'train.lrr' is not in the config; did you mean train.lr" in msg


@pytest.mark.parametrize("settings, needle", [
    (dict(objectives=["face_similarity", "clip_t"], directions=["maximize", "maximize"]), "cannot prune multi-objective"),
    (dict(sampler={"name": "grid"}), "sampler grid needs choice(...) or range(...) values; ['lr']"),
    (dict(sampler={"name": "cmaes"}, objectives=["a", "b"], directions=["maximize", "maximize"],
          pruner={"name": "none"}), "cmaes handles one objective"),
    (dict(objectives=["score"], directions=["maximize", "minimize"]), "must pair up one to one"),
    (dict(pruner={"name": "mediam"}), "pruner.name='mediam' is not one of"),
    (dict(objectives=["face_similarty"]), "'face_similarty' is neither 'score' (the selection rule's objective) nor a "
                                          "metric (did you mean face_similarity"),
])
def test_inconsistent_settings_are_refused(settings, needle):
    space = {"lr": FloatDistribution(1e-5, 1e-3, log=True)}
    with pytest.raises(ConfigError) as e:
        search.check_settings(search.SearchSettings(**settings), space)
    assert needle in str(e.value)


def test_samplers_and_pruners_by_short_name_or_any_target():
    space = {"lr": FloatDistribution(1e-5, 1e-3, log=True), "lora.rank": CategoricalDistribution([4, 8])}
    s = search.SearchSettings(sampler={"name": "tpe", "seed": 1, "n_startup_trials": 4}, pruner={"name": "median"})
    sampler = search.make_sampler(s, space, seed_offset=2)
    assert type(sampler) is optuna.samplers.TPESampler and sampler._n_startup_trials == 4
    assert type(search.make_pruner(s)) is optuna.pruners.MedianPruner
    # a `_target_` wins over the `name` merged in from the defaults; the seed still moves with the worker's offset
    s = search.SearchSettings(sampler={"name": "tpe", "_target_": "optuna.samplers.QMCSampler", "seed": 1},
                              pruner={"_target_": "optuna.pruners.PercentilePruner", "percentile": 25.0})
    search.check_settings(s, space)
    sampler = search.make_sampler(s, space, seed_offset=2)
    assert type(sampler) is optuna.samplers.QMCSampler and sampler._seed == 3
    assert type(search.make_pruner(s)) is optuna.pruners.PercentilePruner
    grid = search.make_sampler(search.SearchSettings(sampler={"_target_": "optuna.samplers.GridSampler"}),
                               {"lora.rank": CategoricalDistribution([4, 8])})
    assert grid._search_space == {"lora.rank": [4, 8]}  # the grid is the search space, given by the sweeper
    nothing = search.make_pruner(search.SearchSettings(pruner={"name": "none", "n_startup_trials": 2}))
    assert type(nothing) is optuna.pruners.NopPruner  # keys merged from the defaults are moot when nothing prunes


def test_hydra_hands_the_sweeper_its_sampler_unbuilt():
    """Hydra instantiates plugins recursively; the sweeper's node says not to, so that a sampler `_target_` reaches
    the sweeper as settings (it adds the seed offset and the grid) rather than as a sampler built by Hydra."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from hydra_plugins.sdxl_lora_sweep.optuna_sweeper import OptunaSweeperConf

    conf = OmegaConf.structured(OptunaSweeperConf(sampler={"_target_": "optuna.samplers.RandomSampler", "seed": 3}))
    assert instantiate(conf).impl.s.sampler == {"_target_": "optuna.samplers.RandomSampler", "seed": 3}


@pytest.mark.parametrize("settings, needle", [
    (dict(sampler={"name": "tpee"}), "sampler.name='tpee' is not one of ('tpe', 'random', 'grid', 'cmaes', 'nsga2') "
                                     "(did you mean tpe?); or give any Optuna sampler as hydra.sweeper.sampler._target_="),
    (dict(pruner={"_target_": "optuna.pruners.Median"}), "pruner._target_='optuna.pruners.Median' cannot be imported"),
    (dict(sampler={"name": "random", "seed": 0, "n_startup_trials": 3}),
     "optuna.samplers.RandomSampler takes no ['n_startup_trials'] (it takes ['seed']); drop them with "
     "~hydra.sweeper.sampler.n_startup_trials"),
    (dict(pruner={"_target_": "optuna.pruners.PercentilePruner"}), "PercentilePruner.__init__() missing 1 required"),
])
def test_samplers_and_pruners_that_cannot_be_built_are_refused_before_a_trial(settings, needle):
    with pytest.raises(ConfigError) as e:
        search.check_settings(search.SearchSettings(**settings), {"lr": FloatDistribution(1e-5, 1e-3, log=True)})
    assert needle in str(e.value)


@pytest.mark.parametrize("overrides, needle", [
    (["hydra/launcher=basic", "hydra.sweeper.n_jobs=2"],
     "hydra.sweeper.n_jobs=2 runs trials side by side, which Hydra's basic launcher cannot: drop hydra/launcher=basic"),
    (["plan_only=true"], "plan_only=true prints the plan of a grid sweep; an Optuna search picks its trials as it "
                         "goes, so there is none to print: drop plan_only"),
])
def test_a_search_no_launcher_can_run_is_refused_before_anything_is_written(overrides, needle, tmp_path):
    from hydra import compose, initialize_config_dir

    from sweep.search.sweeper import prepare

    from .conftest import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"paths.root={tmp_path}", f"hydra.sweep.dir={tmp_path}/sweep",
                                           "search=demo", *overrides], return_hydra_config=True)
    with pytest.raises(ConfigError) as e:
        prepare(search.SearchSettings.from_config(cfg.hydra.sweeper), cfg, [])
    assert needle in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_storage_that_cannot_be_opened_is_named_without_its_password():
    port = _free_port()  # nothing listens there
    url = f"postgresql+psycopg://me:hunter2@127.0.0.1:{port}/nothing"
    with pytest.raises(ConfigError) as e:
        search.open_storage(url, search.SearchSettings())
    msg = str(e.value)
    assert f"postgresql+psycopg://me:***@127.0.0.1:{port}/nothing cannot be opened" in msg
    assert "hunter2" not in msg


def test_a_study_of_another_search_space_or_direction_is_refused(tmp_path):
    s = search.SearchSettings()
    storage = search.open_storage(f"sqlite:///{tmp_path}/o.db", s)
    space = {"lr": FloatDistribution(1e-5, 1e-3, log=True)}
    search.open_study(storage, "study", s, space)
    search.open_study(storage, "study", s, dict(space))  # the same search: continued
    with pytest.raises(ConfigError, match=r"another search space \(differs in \['lora.rank', 'lr'\]\)"):
        search.open_study(storage, "study", s, {"lr": FloatDistribution(1e-5, 1e-2, log=True),
                                                "lora.rank": CategoricalDistribution([4, 8])})
    with pytest.raises(ConfigError, match="exists with objectives"):
        search.open_study(storage, "study", search.SearchSettings(directions=["minimize"]), space)


def test_trials_of_a_dead_worker_are_failed_requeued_and_counted_once(tmp_path):
    s = search.SearchSettings(n_trials=3)
    storage = search.open_storage(f"sqlite:///{tmp_path}/o.db", s)
    space = {"lr": FloatDistribution(1e-5, 1e-3, log=True)}
    study = search.open_study(storage, "s", s, space)
    done = study.ask()
    search.suggest(done, space)
    study.tell(done, 1.0)
    dead = study.ask()
    params = search.suggest(dead, space)
    p = multiprocessing.get_context("spawn").Process(target=int)
    p.start()
    p.join()  # a pid that no longer runs
    dead.set_user_attr("worker_host", socket.gethostname())
    dead.set_user_attr("worker_pid", p.pid)
    alive = study.ask()  # another worker's trial, still running: left alone
    search.suggest(alive, space)
    alive.set_user_attr("worker_host", socket.gethostname())
    alive.set_user_attr("worker_pid", os.getpid())
    assert search.budget(study, 3) == (3, 0)
    assert search.recover(study, storage) == [dead.number]
    trials = study.get_trials()
    assert trials[dead.number].state == TrialState.FAIL
    assert "died" in trials[dead.number].user_attrs["fail_reason"]
    assert trials[alive.number].state == TrialState.RUNNING
    [retry] = [t for t in trials if t.state == TrialState.WAITING]
    assert retry.system_attrs["failed_trial"] == dead.number and retry.params == params
    assert search.budget(study, 3) == (3, 1)  # the failed trial counts once, through its re-run
    again = study.ask()
    assert again.number == retry.number and search.suggest(again, space) == params


def test_a_rerun_that_only_reports_a_finished_trial_tells_the_study_its_checkpoint_scores(tmp_path):
    """A trial killed after its work was done (result.json written) but before the study heard of it is re-run as
    a retry that only reports: the retry gets every checkpoint's score as an intermediate value (what later
    trials are pruned against), then its end state; a trial the study has heard from is not told twice."""
    from sweep.selection import Candidate, SelectionConfig

    s = search.SearchSettings()
    url = f"sqlite:///{tmp_path}/o.db"
    space = {"lr": FloatDistribution(1e-5, 1e-3, log=True)}
    study = search.open_study(search.open_storage(url, s), "s", s, space)
    retry = study.ask()
    search.suggest(retry, space)
    link = search.TrialLink(s, url, "s", retry.number, SelectionConfig())
    cands = [Candidate("t", step, {"face_similarity": f, "clip_t": 30.0, "face_detection_rate": 1.0}, "", "pruned")
             for step, f in ((20, 0.4), (10, 0.5))]
    link.replay(cands, {"clip_t": 30.0})
    assert link.finish("pruned", cands, {"clip_t": 30.0}) is None
    got = study.get_trials()[retry.number]
    assert got.state == TrialState.PRUNED and sorted(got.intermediate_values) == [10, 20]
    assert got.intermediate_values[10] > got.intermediate_values[20]  # each checkpoint's own score
    link.replay(cands[:1], {"clip_t": 30.0})  # told already: nothing more is reported
    assert study.get_trials()[retry.number].intermediate_values == got.intermediate_values


def test_checkpoint_hook_stops_a_trial_and_never_changes_what_it_trains(demo, cache_dir, tmp_path):
    """Scoring a checkpoint mid-training (eval mode, own RNG use) leaves the trial's weights bit-identical;
    a hook that answers True stops the trial there."""
    from dataclasses import replace

    lora = replace(demo.lora, dropout=0.1)  # dropout draws from the global RNG: the hook must not shift it
    seen = []

    def noisy_hook(step, folder):
        seen.append((step, folder.name))
        torch.randn(1000)  # what image generation does to the global RNG
        return False

    def run(out, hook):
        spec = TrialSpec("t", lora, demo.train, out, on_checkpoint=hook)
        return train([spec], demo.model, demo.data, cache_dir, progress=False)[0]

    plain = run(tmp_path / "plain", None)
    hooked = run(tmp_path / "hooked", noisy_hook)
    assert seen == [(3, "step-000003"), (6, "step-000006")]
    a = load_file(plain.checkpoints[-1] / "pytorch_lora_weights.safetensors")
    b = load_file(hooked.checkpoints[-1] / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    stopped = run(tmp_path / "stopped", lambda step, folder: step == 3)
    assert stopped.status == "pruned" and stopped.steps == 3
    assert [c.name for c in stopped.checkpoints] == ["step-000003"]
    assert math.isfinite(stopped.final_loss)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_live_scores_equal_scores_of_the_saved_checkpoint(demo, cache_dir, tmp_path):
    """A checkpoint scored live (the trainer's adapter in place) gets the numbers the saved file gets later."""
    from evaluation import evaluate
    from sweep.offline_models import build_clip
    from trainer.models import shared_pipeline

    from .conftest import DEMO_DIR

    from dataclasses import replace

    t = replace(demo.train, device="cpu")  # fp32: the two ways must agree to float precision
    cfg = replace(demo.eval.settings(build_clip(demo.eval.clip_architecture, cache_dir)), device="cpu")
    pipe = shared_pipeline(demo.model, t.device, t.mixed_precision, cache_dir)
    live = {}

    def hook(step, folder):
        live.update(evaluate([folder], cfg, instance_dir=DEMO_DIR, pipeline=pipe, out_dir=tmp_path / "live",
                             baseline=False, applied=True))
        return False

    [r] = train([TrialSpec("t", demo.lora, t, tmp_path / "t", on_checkpoint=hook)], demo.model, demo.data,
                cache_dir, progress=False)
    pipe = shared_pipeline(demo.model, t.device, t.mixed_precision, cache_dir)  # all modules on the device again
    later = evaluate(r.checkpoints, cfg, instance_dir=DEMO_DIR, pipeline=pipe, out_dir=tmp_path / "later",
                     baseline=False)
    assert set(live) == set(later) == {"step-000003", "step-000006"}
    for ck in live:
        for k in ("clip_t", "clip_i", "pairwise_clip_i"):
            assert live[ck][k] == pytest.approx(later[ck][k], rel=1e-4, abs=1e-4), (ck, k)
    # metrics.json gathers every call's results, so live scoring builds up one file
    gathered = json.loads((tmp_path / "live" / "metrics.json").read_text())["metrics"]
    assert set(gathered) == {"step-000003", "step-000006"}


def check_trial_scores_live_and_catches_up(demo, cache_dir, tmp_path, device):
    """run_trial: a checkpoint written before an interruption is scored after training, the others live; the
    callback hears each score once, with the baseline."""
    from dataclasses import replace

    from sweep.job import run_trial

    conf = replace(demo, train=replace(demo.train, device=device, max_steps=4, checkpoint_every=2),
                   eval=replace(demo.eval, seeds=[0], resolution=64))
    out = tmp_path / "trial"
    train([TrialSpec("t", conf.lora, replace(conf.train, max_steps=2), out)], conf.model, conf.data, cache_dir,
          progress=False)  # interrupted after its first checkpoint, before scoring it
    heard = []
    result, metrics = run_trial(conf, "t", out, tmp_path / "baseline_metrics.json",
                                lambda scored, base: heard.extend((e, "clip_t" in m, "clip_t" in base)
                                                                  for e, m in scored.items()))
    assert result.status == "finished" and result.resumed_from == 2
    assert set(metrics) == {"baseline", "step-000002", "step-000004"}
    assert [h[0] for h in heard] == ["step-000004", "step-000002"]  # live first, then the catch-up
    assert all(h[1] and h[2] for h in heard)  # scores, judged against the baseline
    return metrics


def test_trial_scores_live_and_catches_up(demo, cache_dir, tmp_path):
    check_trial_scores_live_and_catches_up(demo, cache_dir, tmp_path, "cpu")
