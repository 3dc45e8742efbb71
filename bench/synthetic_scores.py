"""Synthetic score values for benchmarks on random-weight models: real generation and scoring, made-up numbers.

A random-weight SDXL paints noise: dlib finds no face and a random CLIP's scores mean nothing, so every checkpoint
ties and racing evaluation (sweep/racing.py) has nothing to race. `install()` keeps every image generated and
scored for real (the pipelines, CLIP and dlib run on every image, so generation and scoring seconds are what a
real sweep spends) and then replaces the VALUES of each image's base-arm scores with synthetic ones, shaped as
the original study found them:

- truth: `true_means(lr, step)`, the mean face similarity and CLIP-T of a checkpoint, interpolated (in log lr,
  then linearly in step) between three curves over the study's 500 steps: lr=1e-5 underfits (face 0.25 -> 0.45,
  CLIP-T 0.1-0.5 points below the baseline), lr=1e-4 balances (face 0.45 -> 0.62 peaking at step 400, CLIP-T 0.5
  -> 1.5 below), lr=5e-4 overfits (face 0.60 -> 0.68, CLIP-T 1.6 -> 5 below: from step 200 on outside the default
  rule's 2-point budget). The baseline (no LoRA): face 0.12, CLIP-T 30.0. A trial of other than 500 steps is
  mapped onto the study's 500 (step x 500 / train.max_steps), so a tiny check run has the same shape.
- a LoRA strength shrinks the effect toward the baseline: mean = baseline + scale x (checkpoint - baseline), the
  scale read from an entry name's `_x<scale>` suffix ("step-000100_x0.7", evaluation.config.entry_name),
  else 1 (full strength).
- each cell (prompt p, seed s) = mean + a prompt effect (fixed per prompt index, shared by every checkpoint and
  the baseline; face sd 0.04, CLIP-T sd 2.0) + a seed effect (fixed per seed, shared; face sd 0.02, CLIP-T sd 1.0)
  + per-image noise (Student t with 5 degrees of freedom scaled to sd 0.06 face, 2.5 CLIP-T). About 8% of images
  have no face: face_similarity NaN and face_detection_rate 0.0 (else 1.0).
- clip_i (100 x cosine, as CLIP scores are) = 100 x (0.5 + 0.4 x face mean) + prompt effect (sd 2) + noise (sd 3);
  a prior-drift image's prior_face_similarity = 0.15 + 0.3 x (face mean - 0.12) + noise (sd 0.05), NaN 8% of the
  time. pairwise_clip_i and the refiner arm's scores (suffixed names) keep their real (meaningless) values.
- every random draw is seeded by a hash of (lr, step, prompt, seed, scale) (the effects by the prompt index and
  seed alone), so the same cell always gets the same value: racing and the full protocol see identical cells, and
  a run is reproducible.

Which checkpoint is scored is learnt from the evaluation's own calls, in the thread that scores:
`_score_entry(made, cfg, scorer, writer, out_dir, name, ...)` gives the trial's `<trial>/eval` folder (whose
`../.hydra/config.yaml` holds train.lr and train.max_steps) and the entry's name ("baseline" or "step-000100"),
around `_Scorer.cells` scoring that entry's images.

    python -m bench.synthetic_scores -m <hydra overrides>    # `python -m sweep -m ...` with synthetic scores

The patches are installed in this process and, through the task function, in any job process a launcher
starts (hydra/launcher=processes, Ray)."""
from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import math
import re
import sys
import threading
from pathlib import Path

import numpy as np

STUDY_STEPS = 500
FACE_BASE, CLIP_T_BASE = 0.12, 30.0
ANCHOR_STEPS = (0, 100, 200, 300, 400, 500)
# lr: (face similarity, CLIP-T minus the baseline's) at ANCHOR_STEPS
CURVES = {
    1e-5: ((FACE_BASE, 0.25, 0.30, 0.35, 0.40, 0.45), (0.0, -0.1, -0.2, -0.3, -0.4, -0.5)),
    1e-4: ((FACE_BASE, 0.45, 0.53, 0.59, 0.62, 0.60), (0.0, -0.5, -0.75, -1.0, -1.25, -1.5)),
    5e-4: ((FACE_BASE, 0.60, 0.65, 0.68, 0.67, 0.66), (0.0, -1.6, -2.9, -3.8, -4.4, -5.0)),
}
SD = {"face_prompt": 0.04, "face_seed": 0.02, "face_noise": 0.06, "clip_t_prompt": 2.0, "clip_t_seed": 1.0,
      "clip_t_noise": 2.5, "clip_i_prompt": 2.0, "clip_i_noise": 3.0, "prior_noise": 0.05}
FACELESS = 0.08  # share of images without a detected face
TAIL_DF = 5  # Student t degrees of freedom of the per-image noise (heavier tails than a normal's)

_STATE = threading.local()  # this thread's evaluation call: out_dir and the entry being scored
_CELL = re.compile(r"p(\d+)_s(-?\d+)")
_PRIOR = re.compile(r"prior_s(-?\d+)")


def true_means(lr: float | None, step: float) -> tuple[float, float]:
    """(mean face similarity, mean CLIP-T) of a checkpoint at `step` of the study's 500 (lr None: the baseline),
    interpolated between CURVES in log10(lr), clamped at the lowest and highest lr."""
    if lr is None:
        return FACE_BASE, CLIP_T_BASE
    logs = [math.log10(k) for k in CURVES]
    faces = [float(np.interp(step, ANCHOR_STEPS, f)) for f, _ in CURVES.values()]
    drops = [float(np.interp(step, ANCHOR_STEPS, d)) for _, d in CURVES.values()]
    x = math.log10(lr)
    return float(np.interp(x, logs, faces)), CLIP_T_BASE + float(np.interp(x, logs, drops))


def _rng(*key) -> np.random.Generator:
    """A generator seeded by a hash of `key`: the same key, the same draws, in every process and run."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _tail(rng: np.random.Generator, sd: float) -> float:
    """Heavy-ish tailed noise of standard deviation `sd` (Student t, TAIL_DF degrees of freedom)."""
    return float(rng.standard_t(TAIL_DF)) * sd * math.sqrt((TAIL_DF - 2) / TAIL_DF)


@functools.cache
def _prompt_effect(prompt: int) -> tuple[float, float, float]:
    r = _rng("prompt", prompt)
    return (float(r.normal(0, SD["face_prompt"])), float(r.normal(0, SD["clip_t_prompt"])),
            float(r.normal(0, SD["clip_i_prompt"])))


@functools.cache
def _seed_effect(seed: int) -> tuple[float, float]:
    r = _rng("seed", seed)
    return float(r.normal(0, SD["face_seed"])), float(r.normal(0, SD["clip_t_seed"]))


def means(lr: float | None, step: float, scale: float = 1.0) -> tuple[float, float]:
    """true_means at a LoRA strength: the checkpoint's effect over the baseline times `scale`."""
    face, clip_t = true_means(lr, step)
    return FACE_BASE + scale * (face - FACE_BASE), CLIP_T_BASE + scale * (clip_t - CLIP_T_BASE)


def cell_values(who: tuple | None, prompt: int, seed: int) -> dict[str, float]:
    """One prompt image's synthetic scores; `who` is (lr, study step, scale, step), None for the baseline."""
    from common.metrics import CLIP_I, CLIP_T, FACE_DETECTION_RATE, FACE_SIMILARITY

    lr, study_step, scale, step = who or (None, 0.0, 1.0, 0)
    face_mean, clip_mean = means(lr, study_step, scale)
    pf, pc, pi = _prompt_effect(prompt)
    sf, sc = _seed_effect(seed)
    r = _rng("cell", _tag(lr), step, prompt, seed, f"{scale:.4g}")
    face = face_mean + pf + sf + _tail(r, SD["face_noise"])
    clip_t = clip_mean + pc + sc + _tail(r, SD["clip_t_noise"])
    clip_i = 100 * (0.5 + 0.4 * face_mean) + pi + _tail(r, SD["clip_i_noise"])
    faceless = r.random() < FACELESS
    return {CLIP_T: clip_t, CLIP_I: clip_i, FACE_SIMILARITY: math.nan if faceless else face,
            FACE_DETECTION_RATE: 0.0 if faceless else 1.0}


def prior_value(who: tuple | None, seed: int) -> float:
    """A prior-drift image's prior_face_similarity: how much the class prompt's faces drifted to the subject."""
    lr, study_step, scale, step = who or (None, 0.0, 1.0, 0)
    face_mean, _ = means(lr, study_step, scale)
    r = _rng("prior", _tag(lr), step, seed, f"{scale:.4g}")
    value = 0.15 + 0.3 * (face_mean - FACE_BASE) + _tail(r, SD["prior_noise"])
    return math.nan if r.random() < FACELESS else value


def _tag(lr: float | None) -> str:
    return "baseline" if lr is None else f"{lr:.6g}"


@functools.cache
def trial_settings(eval_dir: str) -> tuple[float, int]:
    """(train.lr, train.max_steps) of the trial whose evaluation folder this is (`<trial>/eval`), read once."""
    from omegaconf import OmegaConf

    path = Path(eval_dir).parent / ".hydra" / "config.yaml"
    if not path.is_file():
        raise RuntimeError(f"synthetic scores: no {path} to read the trial's learning rate from")
    cfg = OmegaConf.load(path)
    return float(OmegaConf.select(cfg, "train.lr")), int(OmegaConf.select(cfg, "train.max_steps"))


def current_entry(lora_scale: float = 1.0) -> tuple | None:
    """(lr, study step, scale, step) of the entry this thread's evaluation is scoring; None for the baseline."""
    name, out_dir = getattr(_STATE, "name", None), getattr(_STATE, "out_dir", None)
    if name is None or out_dir is None:
        raise RuntimeError("synthetic scores: _Scorer.cells was called outside evaluate()'s _score_entry")
    if name == "baseline":
        return None
    step = re.search(r"step-(\d+)", name)
    if step is None:
        raise RuntimeError(f"synthetic scores: entry {name!r} names no step (step-NNNNNN)")
    strength = re.search(r"_x((?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?)$", name)  # evaluation.config.entry_name's
    scale = float(strength.group(1)) if strength else float(lora_scale)
    lr, max_steps = trial_settings(str(Path(out_dir).resolve()))
    n = int(step.group(1))
    return lr, n * STUDY_STEPS / max(max_steps, 1), scale, n


def _synthesise(out: dict[str, dict[str, float]], who: tuple | None, base_arm: bool) -> None:
    """`out` (what _Scorer.cells returned) with each base-arm value replaced by its synthetic one, in place; only
    metrics the real scoring produced are replaced (no face metrics with eval.face_backend=none)."""
    from common.metrics import PRIOR_FACE_SIMILARITY

    for key, cell in out.items():
        prompt, prior = _CELL.fullmatch(key), _PRIOR.fullmatch(key)
        if prompt and base_arm:
            fake = cell_values(who, int(prompt.group(1)), int(prompt.group(2)))
            cell.update({k: v for k, v in fake.items() if k in cell})
        elif prior and PRIOR_FACE_SIMILARITY in cell:
            cell[PRIOR_FACE_SIMILARITY] = prior_value(who, int(prior.group(1)))


def _remember_entry(original):
    """evaluate()'s `_score_entry(made, cfg, scorer, writer, out_dir, name, ...)`, remembering (for the thread that
    scores, during the call) the folder and the entry it scores: `<trial>/eval`, whose trial's config says its
    learning rate, and "baseline" or "step-000100". Scoring may run on evaluation's worker thread
    (evaluation/overlap.py), so the thread that generated does not know. Every argument is passed on as given: a
    parameter evaluate() adds later cannot break the wrapper (one that did once: `weights`)."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        given = signature.bind(*args, **kwargs).arguments
        _STATE.out_dir, _STATE.name = given["out_dir"], given["name"]
        try:
            return original(*args, **kwargs)
        finally:
            _STATE.out_dir = _STATE.name = None

    return wrapper


def _synthetic_cells(original):
    """`_Scorer.cells`, scoring for real (its time is spent) and then handing back synthetic values."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        out = original(*args, **kwargs)
        given = signature.bind(*args, **kwargs).arguments
        _synthesise(out, current_entry(getattr(given["cfg"], "lora_scale", 1.0)), bool(given["images"].get("base")))
        return out

    wrapper.synthetic_scores = True  # the mark install() checks: patched once, however often it is called
    return wrapper


def install() -> None:
    """Patch evaluation.evaluate (idempotent): `_score_entry` remembers which trial and entry are scored, `_Scorer.cells` replaces the values it scored with synthetic ones (module docstring)."""
    ev = importlib.import_module("evaluation.evaluate")  # the module (the package exports its function `evaluate`)
    if getattr(ev._Scorer.cells, "synthetic_scores", False):
        return
    ev._score_entry = _remember_entry(ev._score_entry)
    ev._Scorer.cells = _synthetic_cells(ev._Scorer.cells)


def task(cfg):
    """The sweep's task (sweep.job.run_job) with the patches installed first: a launcher that runs jobs in other
    processes pickles this function by name, so each job process installs them too."""
    install()
    from sweep.job import run_job

    return run_job(cfg)


def main() -> None:
    """What `python -m sweep` does (sweep/__main__.py: the command line checked, third-party noise quietened,
    Hydra's main), with the patches installed here and `task` as Hydra's task so that job processes install them."""
    import hydra

    from sweep import CONF_DIR
    from sweep.cli import preflight
    from sweep.logs import quiet_third_party

    preflight(sys.argv[1:])
    quiet_third_party()  # before evaluation imports diffusers
    install()
    hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")(task)()


if __name__ == "__main__":
    from bench.synthetic_scores import main as _main  # this module under its own name: `task` pickles as such

    _main()
