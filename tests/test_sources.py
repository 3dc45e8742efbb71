"""Model sources and devices are checked before anything heavy loads, with an error that says what to do."""
import pytest
import torch

from trainer import DeviceError, ModelConfig, ModelSourceError
from common.device import resolve_device
from trainer.models import resolve_precision, resolve_source


def test_unknown_hub_id_offline_says_to_pass_a_folder_or_use_the_demo(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    cfg = ModelConfig(pretrained="nobody/no-such-sdxl")
    with pytest.raises(ModelSourceError) as err:
        resolve_source(cfg, tmp_path)
    msg = str(err.value)
    assert "'nobody/no-such-sdxl'" in msg and "local folder" in msg and "model=tiny" in msg


def test_missing_local_folder(tmp_path):
    with pytest.raises(ModelSourceError, match="no such folder"):
        resolve_source(ModelConfig(pretrained=str(tmp_path / "sdxl")), tmp_path)


def test_folder_that_is_not_a_pipeline(tmp_path):
    (tmp_path / "sdxl").mkdir()
    with pytest.raises(ModelSourceError, match="without model_index.json"):
        resolve_source(ModelConfig(pretrained=str(tmp_path / "sdxl")), tmp_path)


def test_local_pipeline_folder_is_used_as_is(tmp_path):
    (tmp_path / "sdxl").mkdir()
    (tmp_path / "sdxl" / "model_index.json").write_text("{}")
    assert resolve_source(ModelConfig(pretrained=str(tmp_path / "sdxl")), tmp_path) == str(tmp_path / "sdxl")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_requested_but_absent():
    with pytest.raises(DeviceError, match="train.device=cuda but no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16", torch.device("cpu"))
    assert resolve_precision("auto", torch.device("cpu")) == "no"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_8bit_adamw_on_cpu_is_refused_before_loading(tmp_path):
    from dataclasses import replace

    from trainer import TrialSpec, train

    from .conftest import typed

    conf = typed("steps=2", "train.checkpoint_every=2", root=tmp_path)
    spec = TrialSpec("t", conf.lora, replace(conf.train, optimizer="adamw8bit"), tmp_path / "t")
    with pytest.raises(DeviceError, match="adamw8bit runs on CUDA only"):
        train([spec], conf.model, conf.data, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # nothing was built or loaded
