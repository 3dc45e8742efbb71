"""A sweep checked as a whole before anything exists (sweep/checks.py), in process with Hydra's own config loader:
every swept value named with its fix, rules across keys checked on the jobs themselves, keys of other trainers
answered with this config's names, and a new sweep's folder its own."""
import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode

from sweep import CONF_DIR
from sweep.checks import check_sweep
from sweep.cli import SYNONYMS, did_you_mean, flat_keys
from sweep.launchers import resume
from trainer import ConfigError

from .conftest import compose_cfg, typed


def problems(*overrides: str, optuna: bool = False) -> list[str]:
    """check_sweep's problems for `python -m sweep -m <overrides>` (none: [])."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="sweep"):
        gh = GlobalHydra.instance()
        config = gh.hydra.compose_config("config", ["paths.root=/tmp/sweep-tests", *overrides], RunMode.MULTIRUN)
        try:
            check_sweep(config, gh.config_loader(), optuna)
        except ConfigError as exc:
            return exc.problems
    return []


def test_every_bad_value_of_every_swept_key_is_named():
    found = problems("lr=fast,1e-4,slow", "rank=abc,4", "lora.dropout=0.0,1.5")
    assert found == ["lr='fast' is not a number: give one, e.g. lr=0.0001",
                     "lr='slow' is not a number: give one, e.g. lr=0.0001",
                     "rank='abc' is not a whole number: give one, e.g. rank=4",
                     "lora.dropout=1.5 must be in [0, 1)"], found  # its range: checked on the readable values


def test_a_rule_across_swept_keys_names_the_job_that_breaks_it():
    found = problems("steps=4,8", "train.checkpoint_every=2,6")
    assert found == ["steps=4: train.checkpoint_every=6 is larger than train.max_steps=4: no checkpoint would be "
                     "written; use at most 4"]  # not steps=4 with the default checkpoint_every=10: no such job


def test_a_problem_of_the_fixed_overrides_is_said_once_beside_the_swept_ones():
    found = problems("lr=-1", "lora.rank=-4,8", "data.resolution=64")
    assert found == ["train.lr (lr)=-1.0 must be > 0, e.g. lr=1e-4",
                     "lora.rank=-4 must be a positive integer (4 to 64 is usual)"]


def test_swept_photos_and_group_options_are_checked_each():
    found = problems("data.instance_dir=/no/a,/no/b", "model=tiny,tinyy")
    assert any("model=tinyy" in p and "Could not find 'model/tinyy'" in p for p in found), found
    assert not problems("lr=1e-4,2e-4", "steps=4", "train.checkpoint_every=2")  # a good sweep passes
    found = problems("data.instance_dir=/no/a,/no/b")
    assert [p.split(" does not exist")[0] for p in found] == ["data.instance_dir='/no/a'", "data.instance_dir='/no/b'"]


def test_what_this_machine_cannot_run_is_said_before_anything_loads():
    """8-bit AdamW (preset=flux_24gb asks for it) on a machine without CUDA, and train.device=cuda without a GPU:
    refused in the sweep's check, each with its fix, not once a trial has loaded its model (this CPU has no CUDA)."""
    found = problems("model=flux_tiny", "lr=1e-4,2e-4", "preset=flux_24gb")
    assert found == [("train.optimizer=adamw8bit runs on CUDA only (bitsandbytes) and this sweep trains on cpu: use "
                      "train.optimizer=adamw")], found
    assert not problems("model=flux_tiny", "lr=1e-4,2e-4", "preset=flux_24gb", "train.optimizer=adamw")
    found = problems("lr=1e-4", "train.device=cuda")
    assert len(found) == 1 and found[0].startswith("train.device=cuda but no CUDA GPU is visible"), found


def test_an_optuna_search_is_checked_at_its_choices_and_ends():
    found = problems("hydra/sweeper=optuna", "lr=tag(log, interval(1e-5, 1e-4))", "rank=choice(-4,8)",
                     "data.resolution=int(interval(60, 64))", optuna=True)
    assert sorted(found) == [
        "data.resolution=60 (an end of its search range): data.resolution=60 must be a positive multiple of 8 "
        "(SDXL: 1024)",
        "data.resolution=60 (an end of its search range): eval.resolution=60 must be a positive multiple of 8",
        "rank=-4 (one of its choices): lora.rank=-4 must be a positive integer (4 to 64 is usual)"], found


@pytest.mark.parametrize("typed_key, meant", [
    ("learning_rate", "lr"), ("max_train_steps", "steps"), ("num_steps", "steps"), ("network_dim", "lora.rank"),
    ("lora_rank", "rank"), ("alpha", "lora.alpha"), ("network_alpha", "lora.alpha"),
    ("resolution", "data.resolution"), ("instance_data_dir", "data.instance_dir"), ("seed", "train.seed"),
    ("train_batch_size", "train.batch_size"), ("checkpointing_steps", "train.checkpoint_every"),
    ("pretrained_model_name_or_path", "model.pretrained"), ("mixed_precision", "train.mixed_precision"),
    ("lrr", "lr"), ("train.lrr", "train.lr"),
])
def test_keys_of_other_trainers_get_this_configs_names(typed_key, meant):
    assert meant in did_you_mean(typed_key, flat_keys(compose_cfg()))


def test_every_synonym_names_a_key_of_the_config():
    assert set(SYNONYMS) <= flat_keys(compose_cfg())


def test_an_added_unknown_key_gets_its_synonym_not_advice_to_add_it():
    with pytest.raises(ConfigError, match="did you mean lr") as err:
        typed("+learning_rate=1e-4")
    assert "+" not in str(err.value).split("did you mean")[1]


def test_a_new_sweep_whose_second_is_taken_gets_its_own_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(resume, "_CHOSEN", {})
    monkeypatch.delenv(resume.FOLDER_ENV, raising=False)
    name = resume.sweep_folder(False, str(tmp_path), ["lr=1e-4"])
    (tmp_path / name).mkdir()  # another sweep started in the same second
    mine = resume.claim_new_folder(tmp_path / name)
    assert mine == tmp_path / f"{name}_2" and mine.is_dir()
    assert resume.sweep_folder(False, str(tmp_path), ["lr=1e-4"]) == mine.name  # the sweep's config follows
    assert resume.claim_new_folder(mine) == mine  # claimed once


def test_a_resumed_folder_is_not_renamed(tmp_path, monkeypatch):
    monkeypatch.setattr(resume, "_CHOSEN", {"name": "2026-01-01_00-00-00"})
    assert resume.claim_new_folder(tmp_path / "2026-01-01_00-00-00") == tmp_path / "2026-01-01_00-00-00"
    assert not (tmp_path / "2026-01-01_00-00-00_2").exists()
