"""What may be recorded of a value: the one place that decides what is a secret. Everything the sweep shows or
keeps goes through it: log lines (a filter on the console's and the log files' handlers, MLflow's own included),
printed lines, the files a sweep writes (results.write_text), Hydra's stored configs (.hydra/*.yaml,
multirun.yaml), MLflow params, tags and descriptions, Optuna storage URLs and server command lines.

A secret is hidden as `***`; what is around it stays, so a reader still sees which server or key was used. A value
that is an interpolation (`${oc.env:MLFLOW_TRACKING_URI}`) is a reference, not a secret: it is kept."""
from __future__ import annotations

import logging
import re
from typing import Any, Callable

MASK = "***"

SECRET_KEY = re.compile(r"token|password|passwd|passphrase|pwd|secret|api_?key|access_?key|private_?key|credential"
                        r"|authori[sz]ation|^auth$|^sig$|signature|session_?key", re.IGNORECASE)
# keys that say "token" but name a word of a prompt or a length, not a credential: data.subject_token ("sks"),
# max_token_length, pad_token_id, tokenizer
NOT_SECRET_KEY = re.compile(r"^(subject|class|instance|placeholder|trigger|rare|special|identifier|unique)_token$"
                            r"|tokens$|tokeni[sz]er|token_(count|length|len|ids?)$", re.IGNORECASE)


def is_secret_key(key: str) -> bool:
    """Whether a (dotted, possibly +/~ prefixed) key names a secret: passwords, API/access keys, auth tokens
    (hf_token, aws_secret_access_key, authorization, pwd, ...), not a prompt's subject token."""
    leaf = key.strip().strip("'\"").lstrip("+~-").rsplit(".", 1)[-1]
    return bool(SECRET_KEY.search(leaf)) and not NOT_SECRET_KEY.search(leaf)


def _is_reference(value: str) -> bool:
    """`${...}`: an interpolation (an environment variable's name, not its value)."""
    return value.startswith("${")


def _userinfo(m: re.Match) -> str:
    """scheme://user:password@host -> scheme://user:***@host; the password is what lies between the user's colon
    and the last `@` before the host (a password may hold `@`); the user may be empty (postgresql://:pw@db)."""
    user, sep, password = m["userinfo"].partition(":")
    if not sep or not password or _is_reference(password) or password == MASK:
        return m[0]
    return f"{m['scheme']}{user}:{MASK}@"


def _keyed(m: re.Match) -> str:
    """key=value / key: value / "key": "value" with a secret's key: the value hidden, the key and quotes kept."""
    value = m["value"]
    if not is_secret_key(m["key"]):  # what it holds may still be one: PGCONN='host=db password=...'
        return m["head"] + redact_text(value) if value != m[0] else value
    if _is_reference(value.strip("'\"")) or value.strip("'\"") in ("", MASK, "null", "None"):
        return m[0]
    quote = value[0] if value[:1] in ("'", '"') and value[-1:] == value[:1] and len(value) > 1 else ""
    return f"{m['head']}{quote}{MASK}{quote}"


def _scheme_token(m: re.Match) -> str:
    return f"{m['scheme'] or m['basic']} {MASK}"


# (what it finds, how it is hidden); applied in order, each on the text the ones before left
PATTERNS: list[tuple[re.Pattern, Callable[[re.Match], str]]] = [
    # user:password@ in any URL, greedy up to the last @ of the authority (no /, ?, # or space before it)
    (re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^\s/?#'\"<>]*)@"), _userinfo),
    # Authorization: Bearer <token> / Basic <base64> (a header, a curl -H, a log line)
    (re.compile(r"(?P<scheme>\b(?:[Bb]earer|BEARER))\s+[A-Za-z0-9._~+/=\-]{6,}|(?P<basic>\bBasic)\s+[A-Za-z0-9+/]{12,}=*"),
     _scheme_token),
    # key=value, key: value, "key": "value" (query parameters ?token=, libpq password=..., overrides
    # +model.hf_token=..., environment assignments, YAML and JSON lines) where the key names a secret
    (re.compile(r"(?P<head>(?P<q>[\"']?)(?P<key>(?<![\w.\-])[+~]?[A-Za-z_][\w.\-]*)(?P=q)\s*(?:=|:(?!//))\s*)"
                r"(?P<value>(?:(?:Bearer|Basic|Token)\s+)?(?:'[^']*'|\"[^\"]*\"|[^\s&;,'\"}\]]+))"), _keyed),
    # well-known token shapes, wherever they stand: Hugging Face, GitHub, AWS access key ids, Slack
    (re.compile(r"\b(?:hf_[A-Za-z0-9]{30,}|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,}"
                r"|AKIA[0-9A-Z]{16}|xox[abprs]-[A-Za-z0-9\-]{10,})\b"), lambda m: MASK),
]


def redact_text(text: str) -> str:
    """`text` with every secret it holds hidden (PATTERNS); ordinary text (lr=1e-4, a photo of sks woman) as it was."""
    for pattern, hide in PATTERNS:
        text = pattern.sub(hide, text)
    return text


def redact(key: str, value: Any) -> str:
    """What may be recorded of `value` under `key` (an MLflow param or tag, a config entry): all of it hidden when
    the key names a secret (hf_token, *password*, api_key; not data.subject_token), else its text with the secrets
    it holds hidden (a password in a URL, a token in an overrides string)."""
    text = str(value)
    if is_secret_key(key) and text not in ("", "None", "null") and not _is_reference(text):
        return MASK
    return redact_text(text)


def redact_tree(obj: Any, key: str = "") -> Any:
    """A config or record (dicts, lists, strings) with secrets hidden: values under a secret's key, secrets inside
    strings; interpolations (`${oc.env:...}`) kept as the references they are."""
    if isinstance(obj, dict):
        return {k: redact_tree(v, str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_tree(v, key) for v in obj]
    if isinstance(obj, str) or (is_secret_key(key) and obj is not None and not isinstance(obj, bool)):
        return redact(key, obj)
    return obj


class RedactingFilter(logging.Filter):
    """A handler's filter: the line it writes with secrets hidden (message, arguments and traceback), whichever
    library logged it (MLflow's "View run at http://user:pw@host/..." included)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        return True


def redact_logs(*names: str) -> None:
    """Every handler of the root logger and of the named loggers (libraries such as mlflow that log through their
    own handler) hides secrets. Idempotent; call again after a library installs its handlers."""
    for name in ("", *names):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(RedactingFilter())
