"""A person's pick over the rule's, and LoRA strengths as candidates, end to end on CPU through the commands."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .test_tracking import client, runs, sweep

pytestmark = pytest.mark.slow


def promote(*args: str, cwd: Path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "sweep.promote", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_lora_strengths_are_candidates_and_a_person_can_overrule_the_pick_on_record(tmp_path):
    """eval.lora_scales=[0.7,1.0]: each checkpoint scored at both, each (checkpoint, strength) a candidate with its
    own MLflow series; python -m sweep.promote moves the alias to a pick the rule did not make, with who and why on
    the version and the parent run, the strength in the registry and the model card; promoting the rule's pick
    afterwards counts as agreeing."""
    p = sweep("-m", "lr=5e-4", "steps=2", "train.checkpoint_every=2", "data.resolution=64", "progress=false",
              "eval.lora_scales=[0.7,1.0]", cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    [folder] = (tmp_path / "outputs" / "sweeps").iterdir()
    [trial] = [d for d in folder.iterdir() if (d / "result.json").is_file()]
    scores = json.loads((trial / "eval" / "metrics.json").read_text())
    assert {"step-000002", "step-000002_x0.7"} <= set(scores["metrics"])
    assert all(scores["cells"][e] for e in ("step-000002", "step-000002_x0.7"))
    c = client(tmp_path)
    [parent], [child] = runs(c)
    for name in ("clip_t", "clip_t_x0.7", "weighted_score_x0.7"):  # its job's scores (racing's first round)
        assert [m.step for m in c.get_metric_history(child.info.run_id, name)] == [2], name
    rule = json.loads((folder / "report" / "selection.json").read_text())["champion"]
    other = 1.0 if rule["scale"] == 0.7 else 0.7
    key = f"{rule['trial']}@2" + ("x0.7" if other == 0.7 else "")
    bad = promote(f"{rule['trial']}@3", "reason=x", cwd=tmp_path)
    assert bad.returncode == 2 and f"'{rule['trial']}@3' is not a scored checkpoint" in bad.stderr
    assert f"did you mean {rule['trial']}@2" in bad.stderr
    bad = promote(key, cwd=tmp_path)
    assert bad.returncode == 2 and 'reason="' in bad.stderr
    p = promote(key, "reason=the face is sharper at this strength", "by=ana", cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert f"promoted {key}" in p.stdout and "over the rule's pick" in p.stdout
    champ = c.get_model_version_by_alias("sdxl-lora-sks-woman", "champion")
    assert float(champ.tags["lora_scale"]) == other and json.loads(champ.tags["generation"])["lora_scale"] == other
    assert (champ.tags["review.by"], champ.tags["review.agreed"]) == ("ana", "False")
    assert champ.tags["review.reason"] == "the face is sharper at this strength"
    tags = c.get_run(parent.info.run_id).data.tags
    assert tags["review.promoted"] == key and tags["review.agreed"] == "false"
    assert tags["review.rule_agreement"] == "0 of 1 reviewed sweep(s) kept the rule's pick"
    report = (folder / "report" / "report.md").read_text()
    assert "### Human review" in report and "**overrode the rule**" in report and "in 0 (0%)" in report
    assert f"recommended LoRA strength: **{other:g}**" in (folder / "champion" / "README.md").read_text()
    p = promote(rule["trial"] + f"@{rule['step']}" + ("x0.7" if rule["scale"] == 0.7 else ""), "reason=on reflection",
                cwd=tmp_path)
    assert p.returncode == 0 and "the rule's pick, confirmed" in p.stdout, p.stderr[-3000:]
    assert c.get_run(parent.info.run_id).data.tags["review.rule_agreement"].startswith("1 of 1 ")
    assert float(c.get_model_version_by_alias("sdxl-lora-sks-woman", "champion").tags["lora_scale"]) == rule["scale"]
    assert len(json.loads((folder / "promotion.json").read_text())) == 2
