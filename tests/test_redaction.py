"""One redaction for every line and file the sweep writes: each secret form hidden, ordinary values left as they are."""
import logging
import os
from pathlib import Path

import pytest

from sweep.redaction import MASK, RedactingFilter, is_secret_key, redact, redact_text, redact_tree

SECRET = "S3cr3t"


@pytest.mark.parametrize("text, expected", [
    # user:password@ in URLs: a plain one, an empty user, a password holding @ (the last @ before the host), encoded
    ("http://me:S3cr3t@127.0.0.1:5000/x", "http://me:***@127.0.0.1:5000/x"),
    ("postgresql://:S3cr3t@db/mlflow", "postgresql://:***@db/mlflow"),
    ("postgresql+psycopg://me:S3cr3t@x@db:5432/mlflow", "postgresql+psycopg://me:***@db:5432/mlflow"),
    ("tracking.uri=http://me:S3cr3t%40x@host", "tracking.uri=http://me:***@host"),
    ("see mysql://u:p@S3cr3t@h and http://u:S3cr3t@h2/", "see mysql://u:***@h and http://u:***@h2/"),
    # query parameters
    ("https://h/db?password=S3cr3t&x=1", "https://h/db?password=***&x=1"),
    ("https://h/?token=S3cr3t", "https://h/?token=***"),
    ("https://h/?user=a&passwd=S3cr3t;pwd=S3cr3t", "https://h/?user=a&passwd=***;pwd=***"),
    ("https://acct.blob/c?sv=2022&sig=S3cr3t%2Bx&se=1", "https://acct.blob/c?sv=2022&sig=***&se=1"),
    ("https://h/?api_key=S3cr3t&access_key=S3cr3t&secret=S3cr3t", "https://h/?api_key=***&access_key=***&secret=***"),
    ("https://s3/b?X-Amz-Signature=S3cr3t&authorization=S3cr3t", "https://s3/b?X-Amz-Signature=***&authorization=***"),
    # libpq key=value connection strings, quoted or not
    ("host=db user=me password=S3cr3t dbname=mlflow", "host=db user=me password=*** dbname=mlflow"),
    ("host=db password='S3 cr3t' port=5432", "host=db password='***' port=5432"),
    ("+hydra.job.env_set.PGCONN='host=db password=S3cr3t'", "+hydra.job.env_set.PGCONN='host=db password=***'"),
    # overrides and config entries whose key names a secret
    ("lr=1e-4 +model.hf_token=hf_S3cr3t steps=2", "lr=1e-4 +model.hf_token=*** steps=2"),
    ("aws_secret_access_key=S3cr3t AWS_REGION=x", "aws_secret_access_key=*** AWS_REGION=x"),
    ("++api_key=S3cr3t", "++api_key=***"),
    ('{"hf_token": "S3cr3t", "lr": 0.0001}', '{"hf_token": "***", "lr": 0.0001}'),
    ("  password: S3cr3t", "  password: ***"),
    ("PGPASSWORD=S3cr3t psql", "PGPASSWORD=*** psql"),
    # Authorization headers
    ("-H 'Authorization: Bearer S3cr3tS3cr3t'", "-H 'Authorization: ***'"),
    ("sent Bearer eyJhbGciOiJIUzI1NiJ9.S3cr3t", "sent Bearer ***"),
    ("Authorization: Basic dXNlcjpTM2NyM3Q=", "Authorization: ***"),
    # token shapes wherever they stand
    ("a log line with hf_" + "a" * 34, "a log line with ***"),
])
def test_each_secret_form_is_hidden(text, expected):
    assert redact_text(text) == expected
    assert SECRET not in expected


@pytest.mark.parametrize("text", [
    "lr=1e-4", "a photo of sks woman", "data.subject_token=sks", "eval.max_token_length=77",
    "lr=0.0001,steps=2,train.checkpoint_every=2", "http://127.0.0.1:5000/#/experiments/1/runs/abc",
    "sqlite:////tmp/x/mlruns/mlflow.db", "mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db",
    "ssh://git@github.com/org/repo", "selection.rule: identity_within_prompt_budget", "promoted by ana: lr=0.0001@300",
    "tokenizer=clip num_tokens=77", "https://h/?page=2&sort=name", "a basic photo, Bearer of news",
    "tracking.uri='${oc.env:MLFLOW_TRACKING_URI}'", "postgresql://me:${oc.env:PGPASSWORD}@db/mlflow",
    "hf_token: ${oc.env:HF_TOKEN}", "[2026-01-01][sweep.job][INFO][lr=0.0001] - step 2: loss 0.12",
])
def test_ordinary_values_stay(text):
    assert redact_text(text) == text


def test_keys_that_name_secrets():
    for key in ("model.hf_token", "+model.hf_token", "token", "password", "db.passwd", "pwd", "authorization",
                "api_key", "aws_secret_access_key", "access_key", "client_secret", "private_key", "credentials"):
        assert is_secret_key(key), key
        assert redact(key, "S3cr3t") == MASK
    for key in ("data.subject_token", "eval.subject_token", "lr", "tokenizer", "max_token_length", "tracking.uri"):
        assert not is_secret_key(key), key
    assert redact("data.subject_token", "sks") == "sks"
    assert redact("hf_token", "${oc.env:HF_TOKEN}") == "${oc.env:HF_TOKEN}"  # a reference, not a secret
    assert redact("tracking.uri", "postgresql://me:S3cr3t@db:5432/m") == "postgresql://me:***@db:5432/m"
    # the parent run's `overrides` tag: the command line as typed
    assert redact("overrides", "lr=1e-4 +model.hf_token=hf_S3cr3t tracking.uri='http://u:S3cr3t@h'") == \
        "lr=1e-4 +model.hf_token=*** tracking.uri='http://u:***@h'"


def test_a_config_tree_keeps_its_shape_and_references():
    tree = {"tracking": {"uri": "http://me:S3cr3t@h:5000", "experiment": "e"},
            "model": {"hf_token": "S3cr3t", "api_key": 1234, "pretrained": "/m"},
            "hydra": {"overrides": {"task": ["lr=1e-4", "+model.hf_token=S3cr3t"]}},
            "env": {"token": "${oc.env:HF_TOKEN}"}, "steps": 2, "flag": True}
    out = redact_tree(tree)
    assert out == {"tracking": {"uri": "http://me:***@h:5000", "experiment": "e"},
                   "model": {"hf_token": MASK, "api_key": MASK, "pretrained": "/m"},
                   "hydra": {"overrides": {"task": ["lr=1e-4", "+model.hf_token=***"]}},
                   "env": {"token": "${oc.env:HF_TOKEN}"}, "steps": 2, "flag": True}


def test_log_lines_are_redacted_whichever_library_logs_them(capsys):
    logger = logging.getLogger("mlflow.test_redaction")
    handler = logging.StreamHandler()
    handler.addFilter(RedactingFilter())
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("View run at: %s/#/runs/1", "http://me:S3cr3t@127.0.0.1:5000")
        try:
            raise ValueError("cannot reach postgresql://:S3cr3t@db")
        except ValueError:
            logger.exception("failed with password=%s", "S3cr3t")
    finally:
        logger.removeHandler(handler)
    err = capsys.readouterr().err
    assert SECRET not in err
    assert "View run at: http://me:***@127.0.0.1:5000/#/runs/1" in err and "postgresql://:***@db" in err


def test_hydra_stored_configs_are_rewritten_without_secrets_but_keep_references(tmp_path):
    from omegaconf import OmegaConf

    from sweep.results import hide_secrets_in, stored_configs

    trial = tmp_path / "0_lr=0.0001" / ".hydra"
    trial.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"tracking": {"uri": "http://me:S3cr3t@h:5000"}, "lr": 1e-4,
                                     "server": {"uri": "${oc.env:MLFLOW_TRACKING_URI,http://127.0.0.1:5000}"}}),
                   trial / "config.yaml")
    OmegaConf.save(OmegaConf.create(["lr=1e-4", "+hydra.job.env_set.HF_TOKEN=S3cr3t"]), trial / "overrides.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": {"job": {"env_set": {"PGCONN": "host=db password=S3cr3t"}}}}),
                   tmp_path / "multirun.yaml")
    untouched = trial / "hydra.yaml"
    untouched.write_text("hydra:\n  run:\n    dir: outputs\n")
    before = untouched.stat().st_mtime_ns
    hide_secrets_in(stored_configs(tmp_path))
    assert all(SECRET not in p.read_text() for p in stored_configs(tmp_path))
    cfg = OmegaConf.load(trial / "config.yaml")
    assert cfg.tracking.uri == "http://me:***@h:5000" and cfg.lr == 1e-4
    assert OmegaConf.to_container(cfg.server)["uri"] == "${oc.env:MLFLOW_TRACKING_URI,http://127.0.0.1:5000}"
    assert list(OmegaConf.load(trial / "overrides.yaml")) == ["lr=1e-4", "+hydra.job.env_set.HF_TOKEN=***"]
    assert untouched.stat().st_mtime_ns == before  # nothing to hide: not rewritten


def test_a_trial_folder_name_holds_no_secret():
    from sweep import _trial_dir

    assert _trial_dir(0, "+hydra.job.env_set.HF_TOKEN=x,lr=0.0001") == "0_lr=0.0001"
    assert _trial_dir(1, "lr=0.0001,steps=2") == "1_lr=0.0001,steps=2"


def test_http_credentials_go_to_mlflows_variables_not_its_url(monkeypatch):
    from sweep.tracking import credentials_to_env, ui_command

    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    assert credentials_to_env("http://alice:S3cr3t%40x@y@127.0.0.1:5000/") == "http://127.0.0.1:5000/"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice" and os.environ["MLFLOW_TRACKING_PASSWORD"] == "S3cr3t@x@y"
    assert credentials_to_env("http://alice:***@127.0.0.1:5000") == "http://127.0.0.1:5000"  # a stored, hidden one
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "S3cr3t@x@y"
    assert credentials_to_env("postgresql://me:pw@db/m") == "postgresql://me:pw@db/m"  # SQLAlchemy's own URL
    assert ui_command("postgresql://me:S3cr3t@db/m") == "mlflow ui --backend-store-uri postgresql://me:***@db/m"


# the secret forms (each holds SECRET), each given to one sweep: the tracking URI's password (holding an @) on the command line,
# the others as values Hydra keeps (hydra.job.env_set, an ordinary way to hand a job a variable)
FORMS = {
    "tracking.uri": "S3cr3t-uri@x",  # user:password@ in a URL, the password holding @
    "+hydra.job.env_set.DATABASE_URL": "postgresql://:S3cr3t-emptyuser@db/mlflow",
    "+hydra.job.env_set.ARTIFACTS": "https://store.example/b?password=S3cr3t-qpw&token=S3cr3t-qtoken",
    "+hydra.job.env_set.PGCONN": "host=db user=me password=S3cr3t-libpq",
    "+hydra.job.env_set.AUTHORIZATION": "Bearer S3cr3t-bearer",
    "+hydra.job.env_set.DB_PWD": "S3cr3t-pwd",
    "+hydra.job.env_set.MY_HF_TOKEN": "hf_S3cr3t-hf",
}


@pytest.mark.slow
def test_no_secret_reaches_a_file_the_console_mlflow_or_the_server(tmp_path):
    """One demo sweep logging to an MLflow server on loopback with a password in its tracking URI, and the other
    secret forms in overrides: none of them is in any file of the sweep, the server's store and artifacts, nor
    the console (MLflow's "View run at" lines included); the sweep itself is recorded as usual."""
    import subprocess
    import sys

    from mlflow import MlflowClient

    from tests.services import mlflow_server

    with mlflow_server(tmp_path / "server") as server:
        uri = f"http://alice:{FORMS['tracking.uri']}@127.0.0.1:{server.port}"
        args = [f"tracking.uri='{uri}'"] + [f"{k}='{v}'" for k, v in FORMS.items() if k != "tracking.uri"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        p = subprocess.run([sys.executable, "-m", "sweep", "-m", "lr=1e-4", "steps=2", "train.checkpoint_every=2",
                            "data.resolution=64", "eval.seeds=[0]", "progress=false", *args],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        console = p.stdout + p.stderr
        assert p.returncode == 0, console[-4000:]
        c = MlflowClient(server.uri)
        [parent] = [r for r in c.search_runs([c.get_experiment_by_name("sdxl-lora-sweep").experiment_id])
                    if r.data.tags.get("kind") == "sweep"]
    assert "View run" in console and f"127.0.0.1:{server.port}/#/experiments/" in console
    assert f"tracking.uri='http://alice:***@127.0.0.1:{server.port}'" in parent.data.tags["overrides"]
    sweep_dir = Path(parent.data.tags["sweep_dir"])
    assert (sweep_dir / "report" / "report.md").is_file() and list(sweep_dir.glob("*/.hydra/config.yaml"))
    assert SECRET not in console, [ln for ln in console.splitlines() if SECRET in ln][:5]
    leaks = [f for f in tmp_path.rglob("*")  # the sweep folder, the server's store (sqlite bytes) and its artifacts
             if SECRET in f.name or (f.is_file() and SECRET.encode() in f.read_bytes())]
    assert not leaks
