"""Bad input, case by case: photos, prompts, config values and LoRA files. Each gets a clear error that names the
value and the fix, or a documented fallback with a warning; none crashes with a traceback a user cannot act on,
and none costs the good photos next to it."""
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from evaluation.generate import LoraFileError, check_lora_file
from trainer import ConfigError, DataError
from trainer.data import open_photo, scan_photos

from .conftest import DEMO_DIR, typed

GOOD = sorted(DEMO_DIR.glob("*.jpg"))[:3]


def _jpeg_bytes() -> bytes:
    return GOOD[0].read_bytes()


def _write(folder: Path, name: str, make) -> Path:
    path = folder / name
    make(path)
    return path


# photo cases: (file name, how to make it, expected: "skipped" | "kept"), beside three good photos
PHOTOS = {
    "corrupt": ("corrupt.jpg", lambda p: p.write_bytes(os.urandom(4096)), "skipped"),
    "truncated": ("truncated.jpg", lambda p: p.write_bytes(_jpeg_bytes()[:2000]), "skipped"),
    "zero_byte": ("empty.png", lambda p: p.write_bytes(b""), "skipped"),
    "text_with_image_suffix": ("notes.png", lambda p: p.write_text("not an image\n" * 50), "skipped"),
    "symlink_loop": ("loop.jpg", lambda p: os.symlink(p, p), "skipped"),
    "not_an_image_suffix": ("readme.txt", lambda p: p.write_text("hello"), "skipped"),
    "cmyk": ("cmyk.jpg", lambda p: Image.new("CMYK", (128, 128), (0, 255, 255, 0)).save(p), "kept"),
    "16_bit": ("deep.png", lambda p: Image.fromarray(
        np.linspace(0, 65535, 128 * 128).reshape(128, 128).astype(np.uint16)).save(p), "kept"),
    "transparent": ("alpha.png", lambda p: Image.new("RGBA", (128, 128), (0, 0, 0, 0)).save(p), "kept"),
    "subfolder": ("more", lambda p: p.mkdir(), "skipped"),
}


@pytest.mark.parametrize("case", sorted(PHOTOS))
def test_a_bad_photo_beside_good_ones(case, tmp_path, caplog):
    name, make, expected = PHOTOS[case]
    for g in GOOD:
        shutil.copy(g, tmp_path / g.name)
    _write(tmp_path, name, make)
    with caplog.at_level(logging.WARNING):
        photos = scan_photos(str(tmp_path), key="data.instance_dir", resolution=64, min_images=3, allow_upscale=False)
    names = {p.path.name for p in photos}
    assert {g.name for g in GOOD} <= names  # the good photos are never lost
    if expected == "skipped":
        assert name not in names
        if case != "subfolder":
            assert name in caplog.text and "skipping" in caplog.text
    else:
        assert name in names


def test_converted_photos_keep_their_content(tmp_path):
    """CMYK red stays red; a 16-bit ramp keeps its mid-grey (Pillow alone would clip it to white); transparency
    becomes white."""
    for case, expect in (("cmyk", (255, 0, 0)), ("16_bit", (127.5, 127.5, 127.5)), ("transparent", (255, 255, 255))):
        name, make, _ = PHOTOS[case]
        path = _write(tmp_path, name, make)
        mean = np.asarray(open_photo(path), dtype=np.float64).mean(axis=(0, 1))
        assert np.allclose(mean, expect, atol=2), (case, mean)


def test_a_decompression_bomb_is_skipped(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 70_000)  # "huge": past the limit the decoder refuses
    for g in GOOD:
        shutil.copy(g, tmp_path / g.name)
    Image.new("RGB", (400, 400), (9, 9, 9)).save(tmp_path / "huge.png")
    with caplog.at_level(logging.WARNING):
        photos = scan_photos(str(tmp_path), key="data.instance_dir", resolution=64, min_images=1, allow_upscale=True)
    assert "huge.png" not in {p.path.name for p in photos} and "huge.png" in caplog.text


def test_a_tiny_photo_is_named_with_the_fix(tmp_path):
    for g in GOOD:
        shutil.copy(g, tmp_path / g.name)
    Image.new("RGB", (16, 16)).save(tmp_path / "tiny.png")
    with pytest.raises(DataError, match=r"tiny.png \(16x16\).*data.allow_upscale=true"):
        scan_photos(str(tmp_path), key="data.instance_dir", resolution=64, min_images=3, allow_upscale=False)


def test_only_bad_photos_say_how_many_are_usable(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(os.urandom(100))
    with pytest.raises(DataError, match="0 usable photo.*data.min_images=3"):
        scan_photos(str(tmp_path), key="data.instance_dir", resolution=64, min_images=3, allow_upscale=False)


@pytest.fixture(scope="module")
def dlib_backend():
    from evaluation import DlibBackend

    return DlibBackend()


def test_a_photo_without_a_face_is_named(dlib_backend):
    from evaluation import Identity

    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="no face found in 1 instance photo.*noise.png.*eval.face_backend=none"):
        Identity(dlib_backend, [Image.open(GOOD[0]), noise], names=[GOOD[0].name, "noise.png"])


def test_a_photo_with_several_faces_is_warned_about(dlib_backend, caplog):
    from evaluation import Identity

    a, b = Image.open(GOOD[0]).convert("RGB"), Image.open(GOOD[1]).convert("RGB")
    pair = Image.new("RGB", (a.width + b.width, max(a.height, b.height)))
    pair.paste(a, (0, 0))
    pair.paste(b, (a.width, 0))
    with caplog.at_level(logging.WARNING):
        ident = Identity(dlib_backend, [a, pair], names=["one.jpg", "pair.jpg"])
    assert ident.crowded == ["pair.jpg (2 faces)"] and "largest face" in caplog.text


@pytest.mark.parametrize("overrides, needle", [
    # prompts
    (["data.instance_prompt='a photo of a man'"], "does not contain the subject token 'sks'"),
    (["data.instance_prompt=''"], "does not contain the subject token"),
    (["eval.prompts=['a picture of a man']"], "eval.prompts without the subject token"),
    (["eval.prompts=[]"], "eval.prompts is empty"),
    (["data.subject_token=''"], "data.subject_token is empty"),
    # values of the wrong type, out of range, unknown keys
    (["lr=fast"], "lr"),
    (["steps=many"], "steps"),
    (["rank=-4"], "lora.rank=-4 must be a positive integer"),
    (["lora.dropout=1.5"], "lora.dropout=1.5 must be in [0, 1)"),
    (["data.resolution=1001"], "multiple of 8"),
    (["+train.lrate=1"], "Key 'lrate' not in 'TrainConfig'"),
    (["train.max_pack=0"], "train.max_pack=0 must be >= 1"),
    # a value that would make a path leave its folder
    (["model.name=../../etc/evil"], "model.name='../../etc/evil' names a folder in the cache"),
    (["model.name=.hidden"], "no '/' or leading '.'"),
    # options that contradict each other
    (["steps=10", "train.checkpoint_every=20"], "larger than train.max_steps=10"),
    (["data.with_prior_preservation=true", "data.class_prompt='a photo of sks woman'"], "class_prompt"),
])
def test_bad_prompts_and_values_are_named(overrides, needle):
    with pytest.raises(ConfigError) as err:
        typed(*overrides)
    assert needle in str(err.value)


def test_an_overlong_prompt_is_warned_about(caplog):
    long = "a photo of sks woman " + "in a very detailed scene " * 20
    with caplog.at_level(logging.WARNING):
        typed(f"data.instance_prompt='{long}'")
    assert "77" in caplog.text and "data.instance_prompt" in caplog.text


LORA_CASES = {
    "truncated": (lambda p: p.write_bytes(_valid_lora_bytes()[:100]), "not a readable safetensors"),
    "wrong_keys": (lambda p: save_file({"model.weight": torch.zeros(2, 2)}, str(p)), "holds no LoRA weights"),
    "pickle": (lambda p: torch.save({"unet.lora_A.weight": torch.zeros(2, 2)}, p), "not a readable safetensors"),
    "empty": (lambda p: p.write_bytes(b""), "not a readable safetensors"),
}


def _valid_lora_bytes() -> bytes:
    from safetensors.torch import save

    return save({"unet.down.lora_A.weight": torch.zeros(4, 8)})


@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_bad_lora_files_are_named_and_never_unpickled(case, tmp_path, monkeypatch):
    make, needle = LORA_CASES[case]
    folder = tmp_path / "step-000100"
    folder.mkdir()
    make(folder / "pytorch_lora_weights.safetensors")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a LoRA file was unpickled"))
    with pytest.raises(LoraFileError, match=needle) as err:
        check_lora_file(folder)
    assert str(folder / "pytorch_lora_weights.safetensors") in str(err.value)


def test_a_lora_file_changed_after_training_is_refused(tmp_path):
    """The checkpoint's record holds the LoRA file's sha256; one changed byte (still valid safetensors) is caught."""
    import json

    folder = tmp_path / "step-000100"
    folder.mkdir()
    path = folder / "pytorch_lora_weights.safetensors"
    save_file({"unet.down.lora_A.weight": torch.ones(4, 8)}, str(path))
    from common.lorafile import sha256_file

    (folder / "checkpoint.json").write_text(json.dumps({"lora_sha256": sha256_file(path)}))
    assert check_lora_file(folder) == path
    save_file({"unet.down.lora_A.weight": torch.full((4, 8), 2.0)}, str(path))
    with pytest.raises(LoraFileError, match="content hash .* does not match the recorded"):
        check_lora_file(folder)


def test_secrets_never_reach_mlflow(tmp_path):
    """Passwords in URLs and values of secret-named keys are masked in params and tags of a real MLflow store."""
    from sweep.config import TrackingConfig
    from sweep.tracking import make_tracker

    tracker = make_tracker(TrackingConfig(), tmp_path)
    sweep = tracker.start_sweep(tmp_path / "sweep", "s", {"overrides": "hydra.sweeper.storage=postgresql://u:pw1@h/db"})
    run_id = tracker.child_run(sweep, "t", {"device": "cpu"})
    tracker.log_params(run_id, {"tracking.uri": "postgresql://bob:pw2@db/mlflow", "model.hf_token": "hf_pw3", "lr": 1e-4})
    tracker.set_tags(run_id, {"note": "mysql://a:pw4@h/x"})
    recorded = tracker.client.get_run(run_id).data
    parent = tracker.client.get_run(sweep["parent_run_id"]).data
    every = " ".join(map(str, [*recorded.params.values(), *recorded.tags.values(), *parent.tags.values()]))
    assert not any(f"pw{i}" in every for i in range(1, 5)), every
    assert recorded.params["tracking.uri"] == "postgresql://bob:***@db/mlflow" and recorded.params["lr"] == "0.0001"


def test_a_full_disk_stops_with_the_fix_and_keeps_the_last_checkpoint(demo, tmp_path, cache_dir, monkeypatch):
    """No space for the step-6 checkpoint (simulated at the LoRA write): a clear error naming the intact step-3
    checkpoint and the fix, no half-written folder left, and the same command resumes from step 3."""
    import errno

    from trainer import DiskFullError, TrialSpec, checkpoint, train
    from trainer.packed import Pack

    real = Pack.save

    def full(self, k, folder):
        if ".step-000006" in str(folder):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, k, folder)

    spec = TrialSpec("t", demo.lora, demo.train, tmp_path / "t")
    monkeypatch.setattr(Pack, "save", full)
    with pytest.raises(DiskFullError, match=r"no space left to write checkpoint step-000006.*step-000003, is intact"
                                            r".*resume=true"):
        train([spec], demo.model, demo.data, cache_dir, progress=False)
    ckpts = sorted(p.name for p in (tmp_path / "t" / "checkpoints").iterdir())
    assert ckpts == ["step-000003"] and checkpoint.verify(tmp_path / "t" / "checkpoints" / "step-000003")
    monkeypatch.setattr(Pack, "save", real)
    [r] = train([spec], demo.model, demo.data, cache_dir, progress=False)
    assert r.resumed_from == 3 and r.status == "finished"


def test_values_with_path_separators_cannot_move_a_trial_folder_out_of_its_sweep(tmp_path):
    """Override values name trial folders (`<n>_<key=value,...>`): a value holding '/' or '..' stays one name."""
    from sweep import _trial_dir

    sweep_dir = tmp_path / "sweeps" / "s"
    for value in ("../../../../tmp/evil", "a/../../b", "..\\..\\x", "/abs/path"):
        name = _trial_dir(3, f"data.instance_prompt={value}")
        target = (sweep_dir / name).resolve()
        assert target.parent == sweep_dir.resolve() and "/" not in name, (value, name)


def test_the_tracking_server_binds_to_loopback_unless_told(tmp_path, caplog, monkeypatch):
    """`python -m sweep.server` listens on 127.0.0.1 only (checked on the live server's sockets); another host
    turns logins on and is warned about (tests/test_shared_server.py: the logins themselves)."""
    import psutil

    from sweep.server import command, main

    from .services import mlflow_server

    with mlflow_server(tmp_path) as srv:
        procs = [psutil.Process(srv.proc.pid), *psutil.Process(srv.proc.pid).children(recursive=True)]
        listening = {c.laddr for p in procs for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
        assert listening and {a.ip for a in listening} == {"127.0.0.1"}, listening
        assert {a.port for a in listening} == {srv.port}
    cmd = command("0.0.0.0", 5000, root=tmp_path)
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0" and "*" not in cmd[cmd.index("--allowed-hosts") + 1]
    assert command(root=tmp_path)[command(root=tmp_path).index("--host") + 1] == "127.0.0.1"
    called = []
    monkeypatch.setattr(os, "execv", lambda path, args: called.append(args))  # what it would run, not run
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "an-admin-password")
    for name in ("MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        monkeypatch.setenv(name, os.environ.get(name, ""))  # main sets them for the server: undone after the test
    with caplog.at_level(logging.WARNING):
        main(["--host", "0.0.0.0", "--root", str(tmp_path), "--backend-store-uri", "postgresql://u:s3cret@db/m"])
    assert "every request needs a login" in caplog.text and "s3cret" not in caplog.text
    assert called and called[0][called[0].index("--host") + 1] == "0.0.0.0"
