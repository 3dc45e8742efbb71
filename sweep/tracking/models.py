"""Every scored checkpoint as an MLflow 3 LoggedModel of its trial's run: the unit a person chooses between
(trial x step x strength), listed with its final metrics in the experiment's Models tab.

Each model is named by its candidate key (`lr=0.0001@400`, `lr=0.0001@400x0.7`), holds its final metrics (after
racing) with the 95% interval of the rule's objective, its settings as params, and tags saying what the rule made
of it (champion, runner-up, eligible, dropped by racing, not eligible) and why. Its metrics are linked to the
evaluation dataset (the photos' fingerprint and the prompt set, `mlflow.log_input` on the trial's run). Its LoRA is
referenced by path and sha256 (tags `weights.path`, `weights.sha256`), not copied, unless tracking.copy_weights.

The Models tab lists models newest first and keeps no sort order in its URL, so they are created in the reverse of
the rule's order: the champion is at the top with no clicks. Done once per sweep; a rebuilt report (or a promotion)
updates the tags of the models it finds and logs nothing twice."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

from evaluation.config import strength_suffix

from .. import confidence
from ..selection import Candidate, Selection, checkpoint_score

log = logging.getLogger(__name__)
KEY_TAG, PARENT_TAG = "checkpoint.key", "parent_run_id"
ROLE, WHY = "role", "role.why"
FINAL = "final_"  # a model's metrics: the checkpoint's scores after racing


@dataclass(frozen=True)
class EvalDataset:
    """What every checkpoint of a sweep was scored on: the subject's photos (their bytes' fingerprint) and the
    prompts. One digest for both, so two sweeps on the same photos and prompts share it."""

    subject: str
    photos: str  # registry.photos_fingerprint
    prompts: tuple[str, ...]
    source: str  # the photos' folder

    @property
    def name(self) -> str:
        return f"{self.subject or 'subject'} photos x {len(self.prompts)} prompts"

    @property
    def digest(self) -> str:
        return hashlib.sha256("\n".join([self.photos, *self.prompts]).encode()).hexdigest()[:12]

    def entity(self):
        """MLflow's record of it: the photos' folder as its source (nothing is read from it), the prompts' schema."""
        from mlflow.entities import Dataset

        return Dataset(self.name, self.digest, "local", json.dumps({"uri": self.source}),
                       schema=json.dumps({"prompts": list(self.prompts)}))


def roles(sel: Selection, race: dict | None) -> dict[str, tuple[str, str]]:
    """{candidate key: (role, why)}: what the rule made of each scored checkpoint."""
    out = {}
    for i, (c, obj) in enumerate(sel.ranked):
        out[c.key] = ("eligible", (f"ranked {i + 1} of {len(sel.ranked)} under {sel.rule} ({sel.objective} "
                                  f"{obj:.4f})"))
    if sel.champion:
        out[sel.champion.key] = ("champion", sel.explain())
    if sel.runner_up:
        c, obj = sel.ranked[1]
        out[c.key] = ("runner-up", (f"second under {sel.rule} ({sel.objective} {obj:.4f}), {sel.margin:.4f} behind "
                                   f"the champion"))
    for key, why in sel.rejected.items():
        out[key] = ("not eligible", why)
    for d in (race or {}).get("dropped", []):
        out[d["key"]] = ("dropped by racing", f"after {d['rounds']} seed(s): {d['why']}")
    if sel.promoted is not None:
        out[sel.promoted.key] = ("champion", f"promoted by {sel.review['by']}: {sel.review['reason']}")
    return out


def order(candidates: list[Candidate], sel: Selection) -> list[Candidate]:
    """The rule's order: eligible by score, then the rest by trial and step (a person's pick first)."""
    rank = {c.key: i for i, (c, _) in enumerate(sel.ranked)}
    first = sel.promoted.key if sel.promoted is not None else None
    return sorted(candidates, key=lambda c: (c.key != first, rank.get(c.key, len(rank)), c.trial, c.step, c.scale))


def model_metrics(c: Candidate, sel: Selection, cfg, intervals: dict) -> dict[str, float]:
    """Its final metrics (after racing), the rule's objective and that objective's 95% interval, each named
    `final_<name>` (`final_<objective>_low`, `_high`; at a strength other than full ending in it: `final_clip_t_x0.7`).
    They are logged on its trial's run at its step, beside the run's own per-step series (racing's first round for a
    raced checkpoint), which they must not add points to."""
    out = {k: v for k, v in c.metrics.items() if isinstance(v, (int, float))}
    out.setdefault(sel.objective, checkpoint_score(c, sel.baseline, cfg))
    ival = intervals.get(c.key, {}).get(sel.objective)
    if ival is not None:
        out[f"{sel.objective}_low"], out[f"{sel.objective}_high"] = ival.low, ival.high
    return {f"{FINAL}{k}{strength_suffix(c.scale)}": v for k, v in out.items()}


def log_checkpoint_models(tracker, sweep: dict, candidates: list[Candidate], sel: Selection, cfg,
                          dataset: EvalDataset, copy_weights: bool = False) -> dict[str, str]:
    """A LoggedModel for every scored checkpoint (see the module's docstring); returns {candidate key: model id}.
    Models already logged for this sweep get their role tags updated, nothing else."""
    client = tracker.client
    have = existing(client, sweep)
    intervals = confidence.assess(candidates, sel.champion, sel.runner_up, sel.baseline, cfg).intervals \
        if any(c.key not in have for c in candidates) else {}
    said = roles(sel, sel.race)
    ids, runs, logged_inputs = {}, {}, set()
    for c in reversed(order(candidates, sel)):  # newest first in the Models tab: the champion last
        if c.trial not in runs:
            runs[c.trial] = tracker.find_child(sweep, c.trial)
        run_id = runs[c.trial]
        if not run_id:
            continue
        role, why = said.get(c.key, ("eligible", ""))
        tags = {ROLE: role, WHY: why[:4000]}
        if c.key in have:
            client.set_logged_model_tags(have[c.key], tags)
            ids[c.key] = have[c.key]
            continue
        if run_id not in logged_inputs:
            _log_dataset(client, run_id, dataset)
            logged_inputs.add(run_id)
        ids[c.key] = _create(client, sweep, run_id, c, {**tags, **_weights(c)}, model_metrics(c, sel, cfg, intervals),
                             dataset, copy_weights)
        time.sleep(0.002)  # distinct creation times: the Models tab orders by them
    return ids


def existing(client, sweep: dict) -> dict[str, str]:
    """{candidate key: model id} of the models this sweep logged already."""
    found, token = {}, None
    while True:
        page = client.search_logged_models([sweep["experiment_id"]], max_results=100, page_token=token)
        for m in page:
            if m.tags.get(PARENT_TAG) == sweep["parent_run_id"]:
                found[m.tags.get(KEY_TAG, m.name)] = m.model_id
        token = page.token
        if not token:
            return found


_DECIMAL = re.compile(r"(?<![\w.])\d*\.\d+(?:e-?\d+)?")


def model_name(key: str) -> str:
    """A candidate key as a LoggedModel's name, which may not hold . : / % or quotes: decimals in scientific form
    with a whole mantissa (lr=0.0001@400 -> lr=1e-4@400, 0.00015 -> 15e-5), a strength with a decimal comma
    (x0.7 -> x0,7). The exact key is the tag checkpoint.key."""
    head, at, tail = key.rpartition("@")
    head = _DECIMAL.sub(lambda m: _scientific(float(m.group())), head if at else key)
    tail = tail.replace(".", ",") if at else ""
    return re.sub(r"[:/%\"'.]", "_", head + at + tail)


def _scientific(v: float) -> str:
    for exp in range(16):
        mant = v * 10 ** exp
        if abs(mant - round(mant)) < 1e-9 * max(1.0, abs(mant)):
            return f"{round(mant)}e-{exp}" if exp else str(round(mant))
    return f"{v:.3e}".replace(".", "_")


def _weights(c: Candidate) -> dict[str, str]:
    lora = Path(c.checkpoint) / "pytorch_lora_weights.safetensors"
    return {"weights.path": str(lora), "weights.sha256": c.weights}


def _log_dataset(client, run_id: str, dataset: EvalDataset) -> None:
    from mlflow.entities import DatasetInput, InputTag

    client.log_inputs(run_id, [DatasetInput(dataset.entity(), tags=[InputTag("mlflow.data.context", "evaluation")])])


def _create(client, sweep: dict, run_id: str, c: Candidate, tags: dict, metrics: dict, dataset: EvalDataset,
            copy_weights: bool) -> str:
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric

    params = {"trial": c.trial, "step": str(c.step), "strength": f"{c.scale:g}",
              **{k: str(v) for k, v in c.params.items()}}
    model = client.create_logged_model(
        sweep["experiment_id"], name=model_name(c.key), source_run_id=run_id, model_type="lora", params=params,
        tags={**tags, KEY_TAG: c.key, PARENT_TAG: sweep["parent_run_id"], "checkpoint": c.checkpoint})
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, c.step, model_id=model.model_id,
                                             dataset_name=dataset.name, dataset_digest=dataset.digest)
                                      for k, v in metrics.items() if not math.isnan(v)])  # NaN: not scored (no face)
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=c.step)])  # the run page lists its models
    if copy_weights:
        client.log_model_artifact(model.model_id, str(Path(c.checkpoint) / "pytorch_lora_weights.safetensors"))
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    return model.model_id


# the links a sweep prints ----------------------------------------------------------------------------------
SHARED_VIEW = "mlflow.sharedViewState."  # the MLflow UI's "Share" button: an experiment tag holding the view's state


def deciding_columns(objective: str) -> list[str]:
    """The runs table's columns that decide a sweep: each trial's best checkpoint's objective, its prompt fidelity
    (the rule's budget) and its step."""
    return [f"best_{objective}", "best_clip_t", "best_step"]


def share_runs_view(client, experiment_id: str, objective: str) -> str:
    """The runs list sorted by the rule's objective with the deciding columns shown, stored the way the UI's own
    Share button stores a view (the experiment tag mlflow.sharedViewState.<key>, opened by ?viewStateShareKey=<key>);
    returns the key. The same view is the same key (written once)."""
    columns = [f"metrics.`{c}`" for c in deciding_columns(objective)]
    state = {"searchFilter": "", "orderByKey": columns[0], "orderByAsc": False, "lifecycleFilter": "Active",
             "selectedColumns": ["attributes.`Models`", *columns], "runListHidden": False, "viewMaximized": False}
    value = json.dumps(state, sort_keys=True)
    key = "sweep-" + hashlib.sha256(value.encode()).hexdigest()[:16]
    if client.get_experiment(experiment_id).tags.get(SHARED_VIEW + key) != value:
        client.set_experiment_tag(experiment_id, SHARED_VIEW + key, value)
    return key
