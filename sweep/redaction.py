"""What may be recorded of a value: the one place that decides what is a secret (MLflow params and tags, Optuna
storage URLs, server command lines, log lines)."""
from __future__ import annotations

import re
from typing import Any

SECRET_KEY = re.compile(r"token|password|passwd|passphrase|secret|api_?key|access_?key|private_?key|credential",
                        re.IGNORECASE)
# keys that say "token" but name a word of a prompt or a length, not a credential: data.subject_token ("sks")
NOT_SECRET_KEY = re.compile(r"^(subject|class|instance|placeholder|trigger|rare|special|identifier|unique)_token$"
                            r"|tokens$|tokeni[sz]er|^(max_)?token_(count|length|len|ids?)$", re.IGNORECASE)


def is_secret_key(key: str) -> bool:
    """Whether a (dotted) key names a secret: passwords, API/access keys, auth tokens (hf_token, token, ...)."""
    leaf = key.rsplit(".", 1)[-1]
    return bool(SECRET_KEY.search(leaf)) and not NOT_SECRET_KEY.search(leaf)


def redact(key: str, value: Any) -> str:
    """What may be recorded of a value: secrets in keys such as *password*/*api_key*/hf_token hidden (not the
    subject's prompt token, data.subject_token), passwords in URLs (user:password@host) masked wherever they
    appear, e.g. in a command line kept as a tag."""
    text = str(value)
    if is_secret_key(key) and text not in ("", "None", "null"):
        return "***"
    return re.sub(r"(\w+://[^:/@\s]+):[^@\s]*@", r"\1:***@", text)
