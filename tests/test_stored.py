"""What a sweep folder holds is data: its stored configs resolve no environment variable and run no resolver, its
stored tracking URI does not choose a server for the caller, and strings from it or from people are inert in the
Markdown the tool writes (sweep/stored.py, sweep/tracking folder_store, sweep/markdown.py). Fast: no sweep runs."""
import logging
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sweep import PROJECT_DIR, stored
from sweep.config import to_typed
from sweep.markdown import code, plain, text
from sweep.tracking import StoreNotNamed, folder_store, recorded_store
from sweep.config import TrackingConfig

from .conftest import compose_cfg

SECRET = "s3cr3t-value-from-the-environment"


def _stored(tmp_path: Path, cfg) -> Path:
    """The file Hydra leaves in a trial's .hydra/: the job's config, unresolved, without its hydra section."""
    data = OmegaConf.to_container(cfg, resolve=False)
    data.pop("hydra", None)
    path = tmp_path / "config.yaml"
    OmegaConf.save(OmegaConf.create(data), path)
    return path


def test_a_demo_folders_config_reads_as_it_did(tmp_path):
    """References (${lr}, ${data.subject_token}) and ${project_dir:} are followed as before: the same typed config."""
    cfg = compose_cfg("lr=3e-4", "steps=4", "train.checkpoint_every=2", root=tmp_path)
    path = _stored(tmp_path, cfg)
    assert "${project_dir:}" in path.read_text() and "${lr}" in path.read_text()
    assert to_typed(stored.load(path)) == to_typed(cfg)
    assert to_typed(stored.load(path)).data.instance_dir == f"{PROJECT_DIR}/assets/demo_subject"


@pytest.mark.parametrize("value", [
    "a photo of sks woman ${oc.env:SOME_SECRET}",
    "a photo of sks woman ${oc.env:NOPE,${oc.env:SOME_SECRET}}",
    "a photo of sks woman ${oc.decode:'${oc.env:SOME_SECRET}'}",
    "a photo of sks woman \\${oc.env:SOME_SECRET} \\\\${oc.env:SOME_SECRET}",
    "a photo of sks woman ${hydra:runtime.cwd} ${.relative} ${no.such.key}",
])
def test_interpolations_that_reach_out_are_read_as_their_text(tmp_path, monkeypatch, value):
    """A crafted prompt is its own characters: the environment is not read, no resolver runs."""
    monkeypatch.setenv("SOME_SECRET", SECRET)
    cfg = compose_cfg(root=tmp_path)
    cfg.data.instance_prompt = value
    cfg.eval.prompts = [value]
    typed = to_typed(stored.load(_stored(tmp_path, cfg)))
    assert typed.data.instance_prompt == value and typed.eval.prompts == [value]
    assert SECRET not in repr(typed)


def test_a_stored_tracking_uri_from_the_environment_is_not_a_uri(tmp_path, monkeypatch):
    """tracking=server stores ${oc.env:MLFLOW_TRACKING_URI,...}: read as text, and the folder's store is then the one
    its sweep.json recorded (what the sweep used)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://elsewhere:5000")
    typed = to_typed(stored.load(_stored(tmp_path, compose_cfg("tracking=server", root=tmp_path))))
    assert typed.tracking.uri == "${oc.env:MLFLOW_TRACKING_URI,http://127.0.0.1:5000}"
    assert recorded_store(None, typed.tracking) is None
    assert recorded_store({"tracking_uri": "http://127.0.0.1:5000"}, typed.tracking) == "http://127.0.0.1:5000"


def test_the_callers_store_wins_and_a_server_nobody_named_is_refused(tmp_path, caplog):
    folder = tmp_path / "sweep"
    mine, theirs = "sqlite:///mine/mlflow.db", "https://user:pw@tracking.example.com"
    with caplog.at_level(logging.WARNING, logger="sweep.tracking"):
        assert folder_store(theirs, mine, folder) == mine
    assert "tracking.example.com" in caplog.text and "user:***@" in caplog.text and ":pw@" not in caplog.text
    with pytest.raises(StoreNotNamed) as exc:
        folder_store(theirs, None, folder)
    assert "tracking_uri=https://user:***@tracking.example.com" in str(exc.value) and "pw" not in str(exc.value)
    for here in ("sqlite:////data/mlruns/mlflow.db", "file:///data/mlruns", "http://127.0.0.1:5000",
                 "http://localhost:5001", None):
        assert folder_store(here, None, folder) == here  # on this machine: a rebuilt report needs no argument
    assert recorded_store({}, TrackingConfig(uri="http://team:5000")) == "http://team:5000"


def test_markup_in_a_string_is_inert_and_still_readable():
    s = "sks woman <img src=x onerror=alert(1)> | ![x](http://evil/) <script>alert(2)</script> `a` \\[b]\n# h"
    out = text(s)
    for raw in ("<img", "<script", "![", "[x]", "`a`", "\n"):
        assert raw not in out
    assert "|" not in out.replace("\\|", "")
    assert out == ("sks woman &lt;img src=x onerror=alert(1)&gt; \\| !\\[x\\](http://evil/) &lt;script&gt;alert(2)"
                   "&lt;/script&gt; \\`a\\` \\\\\\[b\\] # h")
    assert code("lr=0.0001,eval.seeds=[0]@300") == "`lr=0.0001,eval.seeds=[0]@300`"  # code: verbatim
    assert code("a<b|c") == text("a<b|c") and code("x`y") == "x\\`y"  # what code cannot hold: escaped text


def test_the_console_shows_escaped_markdown_as_the_characters_given():
    """The registry line is written as Markdown for report.md and shown plain in the console: a user's string comes
    back as typed (no backslashes, no entities), the tool's own marks gone."""
    given = 'registered with alias `challenger` <img src=x> a|b [x](y) & "q" \\ &lt;'
    assert plain(f"Registry: **`challenger`**: {text(given)}") == f"Registry: challenger: {given}"
