"""Checkpoints as MLflow LoggedModels (sweep/tracking/models.py), on a real SQLite store: names MLflow accepts, the
roles the rule gives, the runs view the sweep shares. The end-to-end checks (a demo sweep's models against its
report.csv, the UI) are in tests/test_readme.py."""
import json

import pytest
from mlflow import MlflowClient

from sweep.selection import Candidate, SelectionConfig, select
from sweep.tracking.models import SHARED_VIEW, model_name, order, roles, share_runs_view


@pytest.fixture
def client(tmp_path):
    return MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")


@pytest.mark.parametrize("key, name", [
    ("lr=0.0001@400", "lr=1e-4@400"),
    ("lr=1e-05@2", "lr=1e-05@2"),
    ("lr=0.0005@4x0.7", "lr=5e-4@4x0,7"),
    ("lr=0.00015,rank=8@100", "lr=15e-5,rank=8@100"),
    ("prompt='a: b/c'@3", "prompt=_a_ b_c_@3"),
])
def test_a_checkpoint_key_becomes_a_name_mlflow_accepts(client, key, name):
    assert model_name(key) == name
    exp = client.create_experiment("e")
    assert client.create_logged_model(exp, name=model_name(key)).name == name  # MLflow refuses . : / % and quotes


def _cand(trial: str, step: int, face: float, clip_t: float = 30.0) -> Candidate:
    return Candidate(trial, step, {"face_similarity": face, "clip_t": clip_t, "face_detection_rate": 1.0})


def test_roles_say_what_the_rule_made_of_each_checkpoint():
    cands = [_cand("lr=1e-4", 2, 0.5), _cand("lr=1e-4", 4, 0.7), _cand("lr=1e-5", 4, 0.6),
             _cand("lr=5e-4", 4, 0.9, clip_t=10.0)]
    sel = select(cands, {"clip_t": 30.0}, SelectionConfig())
    race = {"dropped": [{"key": "lr=1e-4@2", "rounds": 1, "why": "behind the leader (p=0.01)"}]}
    said = roles(sel, race)
    assert said["lr=1e-4@4"][0] == "champion" and said["lr=1e-5@4"][0] == "runner-up"
    assert said["lr=5e-4@4"][0] == "not eligible" and "clip_t" in said["lr=5e-4@4"][1]
    assert said["lr=1e-4@2"] == ("dropped by racing", "after 1 seed(s): behind the leader (p=0.01)")
    assert [c.key for c in order(cands, sel)][:2] == ["lr=1e-4@4", "lr=1e-5@4"]  # the Models tab's order


def test_the_runs_view_is_shared_once_with_the_deciding_columns(client):
    exp = client.create_experiment("e")
    key = share_runs_view(client, exp, "face_similarity")
    assert share_runs_view(client, exp, "face_similarity") == key
    tags = {k: v for k, v in client.get_experiment(exp).tags.items() if k.startswith(SHARED_VIEW)}
    assert list(tags) == [SHARED_VIEW + key]
    state = json.loads(tags[SHARED_VIEW + key])
    assert state["orderByKey"] == "metrics.`best_face_similarity`" and state["orderByAsc"] is False
    assert state["selectedColumns"][1:] == ["metrics.`best_face_similarity`", "metrics.`best_clip_t`",
                                            "metrics.`best_step`"]
