"""Generation's code compiled in the background while a raced sweep trains (sweep/precompile.py): when a sweep starts
one, and that the second process reads the trial's stored config, loads its base and marks nothing it did not
compile. (Compiling itself is checked on a GPU: bench/racing.py; evaluation's compile_generation in test_evaluate.)"""
import subprocess
import sys

import torch
from omegaconf import OmegaConf

from common import compiling
from sweep import PROJECT_DIR, precompile
from trainer.models import resolve_source

from .conftest import compose_cfg


def test_a_background_compile_is_wanted_only_where_a_cold_compile_does_not_pay_and_a_warm_one_does(monkeypatch):
    """On CUDA with eval.compile=auto, a cold cache, a raced trial's images (too few for a cold compile, enough for a
    warm one) and a GPU with room for a second copy of the base; never on the CPU, when the user chose, when the
    cache is warm or a full-protocol trial compiles in its own process anyway. Deciding costs the sweep no
    compile: whether torch.compile works is the second process's to find out."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(compiling, "compile_works", lambda: 1 / 0)  # not tried on the sweep's clock
    monkeypatch.setattr(compiling, "is_warm", lambda key: key == "warm")
    gib = {"total": 80}  # the CPU cannot say what a GPU holds: an H100's, then a 24 GB card's
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: type("Props", (), {"total_memory": gib["total"] * 2**30})())
    race = 84  # the study's raced trial: racing's share of 5 checkpoints x 24 images, plus the baseline's 24
    assert precompile.wanted(None, cuda, race, "cold")
    assert not precompile.wanted(None, cpu, race, "cold")
    assert not precompile.wanted(False, cuda, race, "cold") and not precompile.wanted(True, cuda, race, "cold")
    assert not precompile.wanted(None, cuda, race, "warm")
    assert not precompile.wanted(None, cuda, compiling.COMPILE_IMAGES, "cold")  # compiles in its own process
    assert not precompile.wanted(None, cuda, compiling.WARM_COMPILE_IMAGES - 1, "cold")  # would never use it
    gib["total"] = 24
    assert not precompile.wanted(None, cuda, race, "cold")


def test_the_background_process_reads_the_trials_stored_config_and_leaves_a_warm_cache_alone(tmp_path, cache_dir,
                                                                                             monkeypatch):
    """`python -m sweep.precompile <trial>/.hydra/config.yaml`, as `start` runs it (its log and pid file in the
    compile cache): one at a time per key, even from another sweep; it loads the trial's base from the sweep's cache
    and, finding generation's code already there for it, stops without compiling or marking anything, and takes
    its pid file with it."""
    monkeypatch.delenv(compiling.CACHE_ENV, raising=False)
    compiling.use_cache(cache_dir)
    cfg = compose_cfg("model=tiny", "data.resolution=64", "train.device=cpu", f"paths.cache_dir={cache_dir}",
                      root=tmp_path)
    config = tmp_path / "trial" / ".hydra" / "config.yaml"
    config.parent.mkdir(parents=True)
    OmegaConf.save({k: v for k, v in OmegaConf.to_container(cfg, resolve=False).items() if k != "hydra"}, config)
    from sweep.config import to_typed

    source = resolve_source(to_typed(cfg).model, cache_dir)
    key = compiling.generation_key(source, 64, torch.device("cpu"))
    compiling.mark_warm(key)
    before = sorted((compiling.cache_folder() / "warm").iterdir())
    proc = precompile.start(config, key)
    pid_file = compiling.cache_folder() / precompile.LOG_DIR / f"{key}.pid"
    assert proc is not None and pid_file.read_text() == str(proc.pid) and precompile.running(pid_file)
    assert precompile.start(config, key) is None  # one at a time per key (a later sweep's process reads the file)
    assert proc.wait(timeout=300) == 0
    log = (compiling.cache_folder() / precompile.LOG_DIR / f"{key}.log").read_text()
    assert "loading base model" in log and "compiling generation" not in log, log[-2000:]
    assert sorted((compiling.cache_folder() / "warm").iterdir()) == before
    assert not pid_file.exists() and not precompile.running(pid_file)


def test_the_background_process_refuses_a_missing_config_with_its_path(tmp_path):
    p = subprocess.run([sys.executable, "-m", "sweep.precompile", str(tmp_path / "nope.yaml")], cwd=PROJECT_DIR,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "nope.yaml" in p.stderr
