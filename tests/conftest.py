import logging
import os
import shutil
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):  # one core per worker: torch's threads would only wait on each other's,
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # here and in the sweeps the tests start (they inherit it)
    import torch

    torch.set_num_threads(1)

import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

import sweep  # noqa: F401  (registers the ${project_dir:} resolver)
from sweep import CONF_DIR, PROJECT_DIR
from sweep.config import SweepConfig, to_typed
from trainer import cache
from trainer.models import release_models

DEMO_DIR = PROJECT_DIR / "assets" / "demo_subject"


def compose_cfg(*overrides: str, root: Path | str = "/tmp/sweep-tests"):
    """The composed DictConfig, as `python -m sweep <overrides>` would see it."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[f"paths.root={root}", *overrides])


def typed(*overrides: str, root: Path | str = "/tmp/sweep-tests") -> SweepConfig:
    return to_typed(compose_cfg(*overrides, root=root))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache per test session: the tiny model is built once and reused, like in a real sweep."""
    return tmp_path_factory.mktemp("cache")


# what MLflow (mlflow.set_tracking_uri) and the tracker (credentials_to_env) put in this process's environment: a
# test's store must not become the next test's, nor reach the commands it starts (they take it as the caller's store)
MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_REGISTRY_URI")


@pytest.fixture(autouse=True)
def _fresh_process_state():
    """Tests see a fresh in-memory cache (the on-disk cache is shared through `cache_dir`) and the MLflow variables
    they started with."""
    saved = {k: os.environ.get(k) for k in MLFLOW_ENV}
    cache.clear_memory_cache()
    yield
    cache.clear_memory_cache()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session", autouse=True)
def _release():
    yield
    release_models()


@pytest.fixture
def demo(tmp_path) -> SweepConfig:
    """The demo preset on a small budget, writing into this test's tmp folder."""
    return typed("steps=6", "train.checkpoint_every=3", "data.resolution=64", root=tmp_path)


@pytest.fixture
def photo_dir(tmp_path) -> Path:
    d = tmp_path / "photos"
    shutil.copytree(DEMO_DIR, d)
    return d


def save_image(path: Path, size=(128, 128), mode="RGB", color=(120, 90, 60)) -> Path:
    Image.new(mode, size, color if mode == "RGB" else None).save(path)
    return path


@pytest.fixture(autouse=True)
def _quiet_libs():
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto` (pyproject's addopts): a worker per core, at most 4 (each builds the tiny model once, and the
    end-to-end tests start sweeps and servers of their own)."""
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


# The test files in the order xdist hands them out (`--dist loadfile --no-loadscope-reorder`): longest first, so no
# long file starts last (from `--durations=0` on a 2-core machine, one thread per worker; test_faults.py takes ~15 min).
# A file not listed goes after these, in collection order.
LONGEST_FIRST = ("test_faults", "test_bench", "test_tracking", "test_registry", "test_ray", "test_readme", "test_stop",
                 "test_flux", "test_search_cli", "test_cli", "test_shared_server", "test_untrusted_folder",
                 "test_security", "test_serving", "test_redaction", "test_cluster", "test_packed", "test_families",
                 "test_train", "test_bad_inputs", "test_search", "test_layers", "test_face", "test_evaluate",
                 "test_config", "test_export", "test_checks", "test_bench_flux")


def pytest_collection_modifyitems(config, items):
    """Whole files go to one xdist worker each (`--dist loadfile`: a module's demo sweep, Ray cluster or database is
    built once), longest file first."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rsplit(".", 1)[-1], len(rank)))  # stable within a file
