"""One redaction for every line and file the sweep writes: each secret form hidden, ordinary values left as they are."""
import logging

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
