"""Every preset composes into a valid typed config; bad values are reported together, naming the fix."""
import pytest
from omegaconf import OmegaConf

from sweep import CONF_DIR
from trainer import ConfigError

from .conftest import compose_cfg, typed


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")))
@pytest.mark.parametrize("model", sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml")))
def test_every_model_and_experiment_composes(experiment, model):
    cfg = compose_cfg(f"experiment={experiment}", f"model={model}", "data.instance_dir=/photos")
    conf = typed(f"experiment={experiment}", f"model={model}", "data.instance_dir=/photos")
    assert conf.model.name == cfg.model.name == model
    assert (conf.model.pretrained is None) != (conf.model.architecture is None)


def test_shorthands_drive_the_train_and_lora_settings():
    conf = typed("lr=5e-4", "steps=40", "rank=16", "train.checkpoint_every=10")
    assert conf.train.lr == 5e-4 and conf.train.max_steps == 40 and conf.lora.rank == 16
    assert typed("train.lr=3e-5").train.lr == 3e-5  # the full key still works


def test_demo_preset_points_at_the_bundled_subject():
    conf = typed()
    assert conf.model.name == "tiny" and conf.data.instance_dir.endswith("assets/demo_subject")
    assert "sks" in conf.data.instance_prompt.split()


def test_sdxl_preset_is_the_original_study():
    from evaluation import STUDY_PROMPTS

    conf = typed("experiment=sdxl", "data.instance_dir=/photos")
    assert conf.model.pretrained == "stabilityai/stable-diffusion-xl-base-1.0"
    assert (conf.train.max_steps, conf.train.checkpoint_every, conf.data.resolution) == (500, 100, 1024)
    assert conf.eval.prompts == STUDY_PROMPTS and conf.eval.clip_model == "openai/clip-vit-large-patch14"
    assert conf.eval.settings("clip").resolution == 1024 and conf.eval.face_backend == "dlib"


def test_sdxl_arch_preset_holds_the_published_architecture():
    import json

    from sweep import PROJECT_DIR

    ref = PROJECT_DIR.parent / "shared" / "reference" / "sdxl_base_arch.json"
    conf = typed("model=sdxl_base_random")
    arch = conf.model.architecture
    assert arch["unet"]["transformer_layers_per_block"] == [1, 2, 10]
    assert arch["unet"]["cross_attention_dim"] == 2048 and arch["text_encoder_2"]["hidden_size"] == 1280
    if ref.is_file():  # beside a developer checkout: the preset must match the reference values exactly
        published = json.loads(ref.read_text())
        for part in ("unet", "vae"):
            assert arch[part] == published[part]


def test_sdxl_preset_without_photos_says_which_key_is_missing():
    with pytest.raises(ConfigError, match="instance_dir"):
        typed("experiment=sdxl")


@pytest.mark.parametrize("override, needle", [
    ("lr=-1e-4", "train.lr (lr)=-0.0001 must be > 0"),
    ("lr=0", "must be > 0"),
    ("rank=0", "lora.rank=0 must be a positive integer"),
    ("steps=0", "train.max_steps (steps)=0 must be > 0"),
    ("train.checkpoint_every=50", "larger than train.max_steps=30"),
    ("data.instance_prompt='a photo of a woman'", "does not contain the subject token 'sks'"),
    ("data.resolution=100", "multiple of 8"),
    ("train.optimizer=sgd", "train.optimizer='sgd' is not one of"),
    ("train.device=tpu", "train.device='tpu' is not one of"),
    ("eval.face_backend=opencv", "eval.face_backend='opencv' is not one of"),
    ("eval.seeds=[]", "eval.seeds is empty"),
    ("eval.budget=fast", "eval.budget='fast' is not one of ('auto', 'race', 'full')"),
    ("eval.race_alpha=1.5", "eval.race_alpha=1.5 must be between 0 and 1"),
    ("eval.lora_scales=[]", "eval.lora_scales=[] must be LoRA strengths in (0, 2]"),
    ("eval.lora_scales=[0,1.0]", "eval.lora_scales=[0.0, 1.0] must be LoRA strengths in (0, 2]"),
    ("eval.lora_scales=[0.7,0.7]", "lists a strength twice"),
    ("eval.prompts=['a picture of a woman']", "eval.prompts without the subject token"),
    ("lr=fast", "lr"),
    ("+train.max_step=10", "Key 'max_step' not in 'TrainConfig'; did you mean train.max_steps"),
])
def test_bad_values_are_named(override, needle):
    with pytest.raises(ConfigError) as err:
        typed(override)
    assert needle in str(err.value)


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as err:
        typed("lr=-1", "rank=0", "steps=0")
    assert len(err.value.problems) >= 3


def test_prior_preservation_class_prompt_must_not_name_the_subject():
    with pytest.raises(ConfigError, match="class_prompt"):
        typed("data.with_prior_preservation=true", "data.class_prompt='a photo of sks woman'")


def test_composed_yaml_has_no_unknown_keys_for_the_schema():
    cfg = compose_cfg()
    assert set(OmegaConf.to_container(cfg)) == {"model", "data", "lora", "train", "eval", "tracking", "selection",
                                                "paths", "lr", "steps", "rank", "progress", "resume", "plan_only",
                                                "optuna_trial"}


def test_low_memory_preset_sets_what_a_16_gb_card_needs():
    conf = typed("preset=low_memory", "experiment=sdxl", "data.instance_dir=/photos", "data.with_prior_preservation=true")
    assert conf.train.gradient_checkpointing and conf.train.max_pack == 1 and conf.eval.batch_size == 2
    assert conf.data.with_prior_preservation and conf.data.resolution == 1024


def test_trial_folder_names_stay_short_and_unique():
    from sweep import _trial_dir

    assert _trial_dir(3, "lr=0.0001") == "3_lr=0.0001"
    long_a = "eval.clip_architecture={" + "x" * 300 + "},lr=0.0001"
    long_b = long_a.replace("0.0001", "0.0005")
    a, b = _trial_dir(0, long_a), _trial_dir(0, long_b)
    assert len(a) <= 120 and len(b) <= 120 and a != b and a.startswith("0_eval.clip_architecture=")
    assert _trial_dir(0, long_a) == a  # the same trial finds its folder again (resume)


def test_a_trial_is_named_by_the_values_its_sweep_varies(tmp_path):
    """Only swept keys name a trial: a fixed dict or list value (which holds commas) is not a sweep."""
    from sweep.job import trial_name

    task = ["lr=1e-4,5e-4", "lora.rank=choice(4,8)", "eval.seeds=[0,1,2,3]", "eval.clip_architecture={a:1,b:2}"]
    OmegaConf.save(OmegaConf.create({"hydra": {"overrides": {"task": task}}}), tmp_path / "multirun.yaml")
    hc = OmegaConf.create({"overrides": {"task": ["lr=5e-4", "lora.rank=8", "eval.seeds=[0,1,2,3]",
                                                  "eval.clip_architecture={a:1,b:2}"]},
                           "job": {"override_dirname": "whatever", "num": 1}})
    assert trial_name(hc, tmp_path) == "lr=5e-4,lora.rank=8"


def test_compile_auto_is_on_only_on_cuda_where_it_repays_compiling(monkeypatch):
    """train.compile / eval.compile = null (auto): never on the CPU, off below the pay-back point, as given when
    set; a sweep's trial weighs all the images it will score (baseline + every checkpoint), not one call's."""
    import torch

    import sweep.job
    from common.compiling import COMPILE_IMAGES, COMPILE_TRIAL_STEPS, WARM_COMPILE_IMAGES, want_compile

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not want_compile(None, cpu, 10**9, 1)
    assert want_compile(True, cpu, 0, 1) and not want_compile(False, cuda, 10**9, 1)
    assert not want_compile(None, cuda, COMPILE_TRIAL_STEPS - 1, COMPILE_TRIAL_STEPS)  # nothing compiled to find out
    conf = typed("steps=500", "train.checkpoint_every=100")
    assert conf.train.compile is None and conf.eval.compile is None
    per_checkpoint = (len(conf.eval.prompts) + 1) * len(conf.eval.seeds)  # + the prior-drift prompt
    work = sweep.job._compile_work(conf.eval.settings("clip"), conf)
    assert work == 6 * per_checkpoint  # 5 checkpoints + baseline, not one call's images
    # a race expects racing's share of the checkpoints' images: the study's raced trial ~84, too few for a cold
    # compile (which cost a race on an H100 ~2.8 minutes), enough for a warm one
    study = typed("experiment=none", "eval=default", "steps=500", "train.checkpoint_every=100", "eval.seeds=[0,1,2,3]")
    assert study.eval.settings("clip").images_per_checkpoint() == 24  # 5 prompts + the prior-drift one, x 4 seeds
    work = sweep.job._compile_work(study.eval.settings("clip"), study, race=True)
    assert work == 5 * 24 // 2 + 24 and WARM_COMPILE_IMAGES <= work < COMPILE_IMAGES
    monkeypatch.setattr("common.compiling.compile_works", lambda: True)
    assert not want_compile(None, cuda, work, COMPILE_IMAGES) and want_compile(None, cuda, work, COMPILE_IMAGES, True)


def test_compiled_code_is_cached_in_the_project_cache_folder_and_a_warm_cache_compiles_for_fewer_images(
        tmp_path, monkeypatch):
    """A sweep keeps Inductor's and AOTAutograd's caches under <paths.cache_dir>/compile (a user's
    TORCHINDUCTOR_CACHE_DIR wins); once generation compiled there for a model and resolution, "auto" compiles from
    WARM_COMPILE_IMAGES images instead of COMPILE_IMAGES (racing's rounds, a trial's first-round scoring)."""
    import torch
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    from common import compiling

    monkeypatch.setattr(compiling, "compile_works", lambda: True)
    monkeypatch.delenv(compiling.CACHE_ENV, raising=False)
    assert compiling.use_cache(tmp_path / "cache") == (tmp_path / "cache" / "compile").resolve()
    assert compiling.cache_folder() == (tmp_path / "cache" / "compile").resolve()
    assert inductor_config.fx_graph_cache and functorch_config.enable_autograd_cache
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    key = compiling.generation_key("stabilityai/sdxl", 1024, cpu)
    assert key != compiling.generation_key("stabilityai/sdxl", 512, cpu) and not compiling.is_warm(key)
    with pytest.raises(RuntimeError), compiling.compiled_for_generation(torch.nn.Linear(2, 2), True, key):
        raise RuntimeError("generation failed: nothing to trust in the cache")
    assert not compiling.is_warm(key)
    with compiling.compiled_for_generation(torch.nn.Linear(2, 2), True, key):
        pass
    assert compiling.is_warm(key) and (tmp_path / "cache" / "compile" / "warm" / f"{key}.json").is_file()
    images = 15 * 5  # the study's race: one round of 15 checkpoints x 5 prompts
    assert not compiling.want_compile(None, cuda, images, compiling.COMPILE_IMAGES)  # cold: ~45 s does not pay
    assert compiling.want_compile(None, cuda, images, compiling.COMPILE_IMAGES, warm=True)
    assert not compiling.want_compile(None, cuda, compiling.WARM_COMPILE_IMAGES - 1, compiling.COMPILE_IMAGES, True)
    assert not compiling.want_compile(None, cpu, images, compiling.COMPILE_IMAGES, warm=True)
    assert not compiling.want_compile(False, cuda, images, compiling.COMPILE_IMAGES, warm=True)
    # importing diffusers sets the variable to torch's default (Inductor's cache_dir()): not the user's choice
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv(compiling.CACHE_ENV, default_cache_dir())
    assert compiling.use_cache(tmp_path / "cache") == (tmp_path / "cache" / "compile").resolve() == \
        compiling.cache_folder_for(tmp_path / "cache") and compiling.is_warm(key)
    monkeypatch.setenv(compiling.CACHE_ENV, str(tmp_path / "mine"))
    assert compiling.use_cache(tmp_path / "cache") == tmp_path / "mine" and not compiling.is_warm(key)


def test_speed_only_settings_keep_the_champion_protocol():
    """A champion registered by a sweep is only challenged on the same evaluation protocol: how fast images come
    (eval.compile, eval.batch_size, the device) does not make two sweeps incomparable; what is scored does."""
    from sweep.tracking.registry import protocol

    base = protocol(typed())
    assert protocol(typed("eval.compile=false")) == protocol(typed("eval.compile=true")) == base
    assert protocol(typed("eval.batch_size=2")) == base
    assert protocol(typed("eval.seeds=[0,1,2]")) != base


def test_racing_is_the_default_of_a_multirun_and_needs_two_seeds():
    conf = typed()
    assert conf.eval.budget == "auto" and conf.eval.races(multirun=True) and not conf.eval.races(multirun=False)
    assert typed("eval.budget=race").eval.races(multirun=False)
    assert not typed("eval.budget=full").eval.races(multirun=True)
    assert not typed("eval.seeds=[0]").eval.races(multirun=True)  # one seed: nothing to save
    assert not typed("eval.enabled=false").eval.races(multirun=True)
