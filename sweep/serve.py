"""Serve the champion (or any registered version) over HTTP, with the contract of MLflow's scoring server.

    python -m sweep.serve port=5001
    python -m sweep.serve subject="sks woman" port=5001          (several subjects registered: say which)
    python -m sweep.serve model=models:/sdxl-lora-sks-man/3 host=0.0.0.0 port=8080

    curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
         -d '{"dataframe_split": {"columns": ["prompt"], "data": [["a picture of sks man on the moon"]]}}'

POST /invocations takes `dataframe_split`, `dataframe_records`, `instances` or `inputs` (a list of prompts, or of
{"prompt": ...}), and optional `params` (num_inference_steps, guidance_scale, height, width, negative_prompt, seed);
it answers {"predictions": [<base64 PNG>, ...]}, one image per prompt, as `mlflow models serve` answers for this
project's versions. GET /ping and /health answer 200 once the model is loaded. A request without params generates
as the champion was evaluated (the `generation` tag of its version), at the LoRA strength it was chosen at.

Unlike `mlflow models serve`, which loads the version through its flavour (so runs whatever code a version in the
store brings), this reads the version's LoRA file as data (sweep/tracking/weights.py: this project's flavour only,
its bytes checked against the recorded sha256; anything else is refused with exit 2 before it is loaded). It binds
to 127.0.0.1 unless host= says otherwise (warned: anyone who can reach the port can use the GPU), and on loopback it
answers only requests addressed to a loopback name (a web page cannot reach it through DNS rebinding)."""
from __future__ import annotations

import base64
import contextlib
import json
import logging
import signal
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from common.device import resolve_device
from common.errors import UserError
from evaluation.generate import EvalInputError

from .cli import key_values
from .generate import generator, plan_line, render, settings, with_defaults
from .logs import quiet_for_generation
from .server import LOOPBACK, is_loopback
from .tracking.registry import champion_uri, default_store
from .tracking.weights import fetch_lora

log = logging.getLogger("sweep.serve")
USAGE = ("usage: python -m sweep.serve [subject=\"sks man\" | model=models:/<name>@champion] [port=5001] "
         "[host=127.0.0.1] [base=<hub id or folder>] [tracking_uri=URI]")
KEYS = {"subject", "model", "port", "host", "base", "tracking_uri"}
MAX_BODY, MAX_PROMPTS = 1 << 20, 16  # a request is a few prompts; a batch larger than this is a mistake or an abuse
PARAMS = {"num_inference_steps": int, "guidance_scale": float, "height": int, "width": int, "negative_prompt": str,
          "seed": int}
INPUTS = ("dataframe_split", "dataframe_records", "instances", "inputs")
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


class BadRequest(Exception):
    """A request this server cannot answer; the message says what to send instead."""

    def __init__(self, message: str, status: int = 400, code: str = "BAD_REQUEST"):
        super().__init__(message)
        self.status, self.code = status, code


def parse(argv: list[str]) -> dict[str, str]:
    args = key_values(argv, KEYS, USAGE)
    port = args.get("port", "5001")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise SystemExit(f"port={port!r} is not a port number, e.g. port=5001")
    return args


def read_request(body: bytes) -> tuple[list[str], dict]:
    """(prompts, params) from an /invocations body in one of MLflow's input forms; BadRequest naming the problem."""
    try:
        req = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the body is not JSON; send {\"dataframe_split\": {\"columns\": [\"prompt\"], \"data\": "
                         "[[\"a picture of ...\"]]}}") from None
    given = [k for k in INPUTS if isinstance(req, dict) and k in req]
    if len(given) != 1:
        got = sorted(req)[:10] if isinstance(req, dict) else type(req).__name__
        raise BadRequest(f"the body needs exactly one of {', '.join(INPUTS)} (got {got})")
    prompts = _prompts(given[0], req[given[0]])
    if not prompts or len(prompts) > MAX_PROMPTS or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise BadRequest(f"send 1 to {MAX_PROMPTS} prompts, each a non-empty string")
    return prompts, _params(req.get("params") or {})


def _prompts(form: str, value) -> list:
    if form == "dataframe_split":
        cols = value.get("columns") if isinstance(value, dict) else None
        rows = value.get("data") if isinstance(value, dict) else None
        if not isinstance(cols, list) or not isinstance(rows, list) or ("prompt" not in cols and len(cols) != 1):
            raise BadRequest("dataframe_split needs \"columns\": [\"prompt\"] and \"data\": [[\"...\"], ...]")
        i = cols.index("prompt") if "prompt" in cols else 0
        return [r[i] if isinstance(r, list) and len(r) > i else None for r in rows]
    if isinstance(value, dict) and "prompt" in value:  # {"inputs": {"prompt": [...]}}
        value = value["prompt"]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise BadRequest(f"{form} must be a list of prompts (or of {{\"prompt\": ...}} records)")
    return [v.get("prompt") if isinstance(v, dict) else v for v in value]


def _params(params) -> dict:
    if not isinstance(params, dict):
        raise BadRequest("params must be an object, e.g. {\"num_inference_steps\": 30}")
    out = {}
    for k, v in params.items():
        kind = PARAMS.get(k)
        if kind is None:
            raise BadRequest(f"unknown param {k!r}; known: {', '.join(PARAMS)}")
        good = isinstance(v, kind) or (kind is float and isinstance(v, int))
        if not good or isinstance(v, bool):
            what = {int: "n integer", float: " number", str: " string"}[kind]
            raise BadRequest(f"param {k}={v!r} must be a{what}")
        if k in ("height", "width") and not (0 < v <= 4096 and v % 8 == 0):
            raise BadRequest(f"param {k}={v} must be a positive multiple of 8 up to 4096")
        if k == "num_inference_steps" and not 0 < v <= 1000:
            raise BadRequest(f"param num_inference_steps={v} must be from 1 to 1000")
        out[k] = v
    return out


class Champion:
    """The loaded pipeline with its LoRA merged, generating one request at a time at the recorded settings unless a
    request's params say otherwise."""

    def __init__(self, pipe, defaults: dict):
        self.pipe, self.defaults = pipe, defaults
        self.lock = threading.Lock()

    def predict(self, prompts: list[str], params: dict) -> list[str]:
        s = {**self.defaults, **{k: v for k, v in params.items() if k != "negative_prompt"}}
        with self.lock:
            pngs = render(self.pipe, prompts, s, params.get("negative_prompt"))
        return [base64.b64encode(png).decode() for png in pngs]


class Handler(BaseHTTPRequestHandler):
    server_version = "sweep.serve"

    def do_GET(self) -> None:
        if self._refused_host():
            return
        if self.path.split("?")[0] in ("/ping", "/health"):
            self._send(200, b"\n", "text/plain")
        else:
            self._error(BadRequest(f"no such endpoint {self.path[:100]!r}: POST /invocations, GET /ping", 404,
                                   "ENDPOINT_NOT_FOUND"))

    def do_POST(self) -> None:
        if self._refused_host():
            return
        try:
            if self.path.split("?")[0] != "/invocations":
                raise BadRequest(f"no such endpoint {self.path[:100]!r}: POST /invocations", 404, "ENDPOINT_NOT_FOUND")
            if self.headers.get_content_type() != "application/json":
                raise BadRequest("send Content-Type: application/json", 415, "UNSUPPORTED_MEDIA_TYPE")
            size = int(self.headers.get("Content-Length") or -1)
            if not 0 <= size <= MAX_BODY:
                raise BadRequest(f"the body must have a Content-Length of at most {MAX_BODY} bytes", 413)
            prompts, params = read_request(self.rfile.read(size))
            images = self.server.champion.predict(prompts, params)
        except BadRequest as exc:
            self._error(exc)
            return
        except Exception as exc:  # the server stays up; the client and the log get the reason
            log.exception("generation failed")
            self._error(BadRequest(f"generation failed: {type(exc).__name__}: {exc}", 500, "INTERNAL_ERROR"))
            return
        self._send(200, json.dumps({"predictions": images}).encode(), "application/json")

    def _refused_host(self) -> bool:
        """On loopback, a request must name a loopback host: a page on another site that resolves its name to
        127.0.0.1 (DNS rebinding) is refused."""
        if not self.server.loopback_only:
            return False
        host = (self.headers.get("Host") or "").strip().lower()
        name = host[1:].partition("]")[0] if host.startswith("[") else host.rpartition(":")[0] or host
        if name in LOOPBACK_NAMES:
            return False
        self._error(BadRequest(f"Host {host[:100]!r} is not this machine's loopback name; use 127.0.0.1 or localhost",
                               403, "PERMISSION_DENIED"))
        return True

    def _error(self, exc: BadRequest) -> None:
        self._send(exc.status, json.dumps({"error_code": exc.code, "message": str(exc)}).encode(), "application/json")

    def _send(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    host, port = args.get("host", LOOPBACK), int(args.get("port", "5001"))
    quiet_for_generation()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not is_loopback(host):
        log.warning("binding %s: anyone who can reach this machine on port %d can generate with the model (this "
                    "server has no login); keep the default 127.0.0.1, or put it behind a proxy with authentication",
                    host, port)
    with tempfile.TemporaryDirectory(prefix="sweep-serve-") as tmp, contextlib.ExitStack() as stack:
        try:
            httpd = start(args, host, port, Path(tmp), stack)
        except (UserError, EvalInputError) as exc:  # which subject; not this project's LoRA; a port or base it lacks
            print(f"error: {exc}", file=sys.stderr)
            return 2
        signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops it as Ctrl-C does: the fetched files are removed
        try:
            httpd.serve_forever()
        except KeyboardInterrupt:
            pass
    return 0


def start(args: dict[str, str], host: str, port: int, folder: Path, stack: contextlib.ExitStack) -> ThreadingHTTPServer:
    """A server ready to answer: the version fetched into `folder` and checked, the port bound, the pipeline loaded
    with the LoRA merged (all held open by `stack`). Whatever fails here fails before a request is answered."""
    store = args.get("tracking_uri") or default_store()
    reg = fetch_lora(champion_uri(store, args.get("subject"), args.get("model")), store, folder)
    try:
        httpd = stack.enter_context(ThreadingHTTPServer((host, port), Handler))
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port} ({exc}); choose another port=") from None
    defaults = with_defaults(settings({}, reg.generation))
    print("a request without params: " + plan_line(defaults, reg.described, resolve_device("auto", "device").type,
                                                  reg.generation), flush=True)
    pipe = stack.enter_context(generator(args.get("base") or reg.base, reg.lora, defaults["lora_scale"]))
    httpd.champion, httpd.loopback_only = Champion(pipe, defaults), is_loopback(host)
    print(f"serving {reg.described} on http://{host}:{port}: POST /invocations, GET /ping; Ctrl-C stops it",
          flush=True)
    return httpd


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    raise SystemExit(main())
