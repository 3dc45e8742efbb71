"""The web-UI (kohya) export: what ComfyUI / A1111 / Forge load is what was trained and scored, at its real alpha."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.utils import convert_unet_state_dict_to_peft
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file

from common.lorafile import LORA_FILE
from evaluation.generate import LoraFileError, check_lora_file
from families.kohya import WebUIExportError
from families.sdxl import convert, sgm_path
from sweep import PROJECT_DIR
from sweep.export import Source, export, licence
from sweep.export.__main__ import main
from trainer import lora
from trainer.models import load_base_model, resolve_source

from .test_train import _unet_inputs

TOKENS = torch.tensor([[512, 70, 513]])


def _trained(demo, cache_dir, folder: Path, rank: int, alpha: float | None, text_encoder: bool):
    """A LoRA with every weight random and distinct (standing in for training), saved in the diffusers format; the
    outputs of the model that carried it."""
    demo.lora.rank, demo.lora.alpha, demo.lora.train_text_encoder = rank, alpha, text_encoder
    base = load_base_model(demo.model, torch.device("cpu"), torch.float32, cache_dir)
    torch.manual_seed(rank * 100 + int(alpha or 0))
    params = lora.add_lora(base, demo.lora)
    try:
        with torch.no_grad():
            for ps in params.values():
                for p in ps:
                    p.copy_(torch.randn_like(p) * 0.1)
        inputs = _unet_inputs(base)
        x, t, emb, added = inputs
        expected = {"unet": base.unet(x, t, emb, added_cond_kwargs=added).sample,
                    "text_encoder": base.text_encoder(TOKENS).last_hidden_state,
                    "text_encoder_2": base.text_encoder_2(TOKENS).last_hidden_state}
        lora.save_lora(base, folder, text_encoder)
    finally:
        lora.remove_lora(base)
    plain = base.unet(x, t, emb, added_cond_kwargs=added).sample
    assert not torch.allclose(plain, expected["unet"], atol=1e-4)  # the LoRA changes the output
    return inputs, expected


def _outputs(pipe, inputs) -> dict:
    x, t, emb, added = inputs
    with torch.no_grad():
        return {"unet": pipe.unet(x, t, emb, added_cond_kwargs=added).sample,
                "text_encoder": pipe.text_encoder(TOKENS).last_hidden_state,
                "text_encoder_2": pipe.text_encoder_2(TOKENS).last_hidden_state}


@pytest.mark.parametrize("rank, alpha, text_encoder", [(4, 4.0, False), (8, 4.0, False), (4, 16.0, False),
                                                       (4, 8.0, True)])
def test_webui_file_loaded_by_diffusers_kohya_loader_equals_the_diffusers_file(demo, cache_dir, tmp_path, rank,
                                                                              alpha, text_encoder):
    """The exported file through diffusers' non-diffusers (kohya / A1111) loader gives the UNet and text-encoder
    outputs of the model that was trained (fp32 export: to 1e-5), and so of the diffusers file; its alphas are the
    adapter's, not the rank."""
    inputs, expected = _trained(demo, cache_dir, tmp_path / "ckpt", rank, alpha, text_encoder)
    tensors, configs = convert(tmp_path / "ckpt" / LORA_FILE, layers_per_block=2, dtype="fp32")
    save_file(tensors, tmp_path / "webui.safetensors")
    assert all(k.startswith(("lora_unet_", "lora_te1_", "lora_te2_")) for k in tensors)
    assert any(k.startswith("lora_te1_") for k in tensors) == text_encoder
    assert not any(b in k for k in tensors for b in ("down_blocks", "mid_block", "up_blocks"))  # SGM names only
    alphas = {float(v) for k, v in tensors.items() if k.endswith(".alpha")}
    assert alphas == {alpha}, alphas  # diffusers' convert_state_dict_to_kohya would have written the rank
    assert configs["unet"]["r"] == rank and configs["unet"]["lora_alpha"] == alpha

    pipe = StableDiffusionXLPipeline.from_pretrained(resolve_source(demo.model, cache_dir))
    pipe.load_lora_weights(str(tmp_path), weight_name="webui.safetensors")
    got = _outputs(pipe, inputs)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(str(tmp_path / "ckpt"))
    diffusers_file = _outputs(pipe, inputs)
    parts = ["unet"] + (["text_encoder", "text_encoder_2"] if text_encoder else [])
    for part in parts:
        torch.testing.assert_close(got[part], expected[part], atol=1e-5, rtol=1e-4, msg=part)
        torch.testing.assert_close(got[part], diffusers_file[part], atol=1e-5, rtol=1e-4, msg=part)
    if rank == 8:  # what the UIs load by default: fp16 weights, the trained model to fp16 rounding
        tensors, _ = convert(tmp_path / "ckpt" / LORA_FILE, layers_per_block=2, dtype="fp16")
        assert {v.dtype for v in tensors.values()} == {torch.float16}
        save_file(tensors, tmp_path / "webui16.safetensors")
        pipe.unload_lora_weights()
        pipe.load_lora_weights(str(tmp_path), weight_name="webui16.safetensors")
        torch.testing.assert_close(_outputs(pipe, inputs)["unet"], expected["unet"], atol=2e-3, rtol=2e-3)


def _sdxl_unet() -> UNet2DConditionModel:
    """SDXL's UNet (conf/model/sdxl_base_random.yaml's architecture, which is SDXL base 1.0's), on the meta device."""
    from accelerate import init_empty_weights

    arch = OmegaConf.to_container(OmegaConf.load(PROJECT_DIR / "conf" / "model" / "sdxl_base_random.yaml"))
    with init_empty_weights():
        return UNet2DConditionModel.from_config(arch["architecture"]["unet"])


def test_every_key_maps_to_a_module_of_the_sdxl_unet_by_the_kohya_rule(tmp_path):
    """On SDXL's own UNet layout: every attention projection a LoRA targets gets a kohya key (lora_unet_ + the SGM
    module path, dots as underscores), and diffusers' kohya loader maps every key back to exactly the module it came
    from: no key would be skipped, none is extra. 70 transformer blocks x 2 attentions x 4 projections."""
    unet = _sdxl_unet()
    targets = {n for n, m in unet.named_modules()
               if isinstance(m, torch.nn.Linear) and n.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))}
    assert len(targets) == 70 * 2 * 4
    sd = {}
    for n in targets:
        sd[f"unet.{n}.lora.down.weight"] = torch.zeros(2, 1)
        sd[f"unet.{n}.lora.up.weight"] = torch.zeros(1, 2)
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 2, "unet.lora_alpha": 1.0})}
    save_file(sd, tmp_path / LORA_FILE, metadata=meta)
    tensors, _ = convert(tmp_path / LORA_FILE, layers_per_block=unet.config.layers_per_block, dtype="fp32")
    modules = {k.partition(".")[0] for k in tensors}
    assert len(tensors) == 3 * len(modules) == 3 * len(targets)
    # names kohya's SDXL trainer writes (as found in SDXL LoRA files made with it)
    for name in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k",
                 "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_out_0",
                 "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_v",
                 "lora_unet_output_blocks_0_1_transformer_blocks_9_attn1_to_q",
                 "lora_unet_output_blocks_5_1_transformer_blocks_1_attn2_to_k"):
        assert name in modules
    blocks = {tuple(k.split("_")[2:5]) for k in modules}
    assert blocks == {("input", "blocks", b) for b in "4578"} | {("middle", "block", "1")} | {
        ("output", "blocks", str(b)) for b in range(6)}
    save_file(tensors, tmp_path / "webui.safetensors")
    back, alphas = StableDiffusionXLPipeline.lora_state_dict(str(tmp_path), weight_name="webui.safetensors",
                                                             unet_config=unet.config)
    back = convert_unet_state_dict_to_peft({k[len("unet."):]: v for k, v in back.items()})  # as load_lora_weights
    mapped = {k.rpartition(".lora_")[0] for k in back}
    assert mapped == targets and len(back) == 2 * len(targets)
    assert set(alphas.values()) == {1.0}


def test_modules_outside_attention_and_dora_are_refused_with_the_way_out(tmp_path):
    with pytest.raises(WebUIExportError, match="format=diffusers"):
        sgm_path("down_blocks.1.resnets.0.conv1", 2)
    save_file({"unet.down_blocks.1.attentions.0.proj_in.lora_magnitude_vector": torch.ones(3)}, tmp_path / LORA_FILE)
    with pytest.raises(WebUIExportError, match="format=diffusers"):
        convert(tmp_path / LORA_FILE, 2)
    with pytest.raises(WebUIExportError, match="fp16"):
        convert(tmp_path / LORA_FILE, 2, dtype="int8")


def test_licence_comes_from_the_base_models_card(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: openrail++\nlicense_link: https://example.org/l\n---\n# SDXL\n")
    lic, line = licence(str(tmp_path))
    assert lic == "openrail++" and "openrail++" in line and "https://example.org/l" in line
    assert licence(str(tmp_path / "nothing"))[0] is None


def test_exported_files_are_guarded_by_their_sha256(tmp_path):
    """export.json records each file's sha256; a changed web-UI file is refused like a changed checkpoint file."""
    (tmp_path / "ckpt").mkdir()
    module = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"
    save_file({f"{module}.lora.down.weight": torch.randn(4, 64), f"{module}.lora.up.weight": torch.randn(64, 4)},
              tmp_path / "ckpt" / LORA_FILE,
              metadata={"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8.0})})
    src = Source(lora=tmp_path / "ckpt" / LORA_FILE, trial="lr=1e-4", step=6, origin="test")
    rec = export(src, tmp_path / "out", "both", "fp16")
    webui = tmp_path / "out" / rec["webui_file"]
    assert check_lora_file(webui) == webui and check_lora_file(tmp_path / "out") == tmp_path / "out" / LORA_FILE
    with safe_open(str(webui), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8"
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    data = bytearray(webui.read_bytes())
    data[-1] ^= 0xFF
    webui.write_bytes(bytes(data))
    with pytest.raises(LoraFileError, match="content hash"):
        check_lora_file(webui)
    # a registered version's LoRA is checked against its records the same way: tests/test_security.py


def test_export_command_refuses_bad_arguments_before_reading_anything(tmp_path, capsys):
    for argv, msg in ((["format=kohya"], "format='kohya' is not one of"), (["dtype=int8"], "dtype='int8'"),
                      ([str(tmp_path / "missing")], "no such folder"), (["colour=red"], "unknown argument"),
                      ([str(tmp_path)], "neither a checkpoint folder")):
        with pytest.raises(SystemExit, match=msg):
            main(argv)


# ---- where an export goes: beside what is there, never over what it did not write ---------------------------------
MODULE = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"


def _checkpoint(root: Path, seed: int = 0, step: int = 6) -> Path:
    """A checkpoint folder holding a small diffusers-format LoRA (its adapter config in the file's metadata)."""
    folder = root / "trial" / "checkpoints" / f"step-{step:06d}"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    save_file({f"{MODULE}.lora.down.weight": torch.randn(4, 64, generator=g),
               f"{MODULE}.lora.up.weight": torch.randn(64, 4, generator=g)}, folder / LORA_FILE,
              metadata={"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8.0}),
                        **{f"key{i}": str(i) for i in range(8)}})  # diffusers' own header order: random
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _export(capsys, *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out + err


def test_export_adds_its_files_beside_a_users_and_leaves_links_and_their_targets_alone(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "run")
    loras, elsewhere = tmp_path / "loras", tmp_path / "elsewhere"
    loras.mkdir(), elsewhere.mkdir()
    (loras / "someone_else.safetensors").write_bytes(b"another LoRA")
    (elsewhere / "kept.safetensors").write_bytes(b"behind a link")
    (loras / "linked").symlink_to(elsewhere, target_is_directory=True)
    before, behind = _files(loras), _files(elsewhere)
    rc, text = _export(capsys, str(ckpt), f"out={loras}")
    assert rc == 0 and "Traceback" not in text, text
    rec = json.loads((loras / "export.json").read_text())
    written = set(rec["files"]) | {"export.json"}
    assert {f.name for f in loras.iterdir()} == written | {"someone_else.safetensors", "linked"}
    assert {k: v for k, v in _files(loras).items() if k in before} == before  # every file there before, intact
    assert (loras / "linked").is_symlink() and _files(elsewhere) == behind
    for name, sha in rec["files"].items():
        assert hashlib.sha256((loras / name).read_bytes()).hexdigest() == sha, name
    assert rec["lora_sha256"] == hashlib.sha256((ckpt / LORA_FILE).read_bytes()).hexdigest()
    # out= a link to a folder: the files go into its target, the link stays a link
    (tmp_path / "via").symlink_to(elsewhere, target_is_directory=True)
    rc, text = _export(capsys, str(ckpt), f"out={tmp_path / 'via'}")
    assert rc == 0 and (tmp_path / "via").is_symlink(), text
    assert _files(elsewhere).items() >= behind.items() and (elsewhere / "export.json").is_file()
    assert not [p for p in tmp_path.rglob(".*.tmp")]  # no temporary file left


def test_a_same_named_file_it_did_not_write_is_refused_until_overwrite_true(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "run")
    out = tmp_path / "project"
    out.mkdir()
    (out / "README.md").write_text("the user's own README\n")
    rc, text = _export(capsys, str(ckpt), f"out={out}")
    assert rc == 2 and "Traceback" not in text
    assert f"{out} already holds" in text and "README.md" in text and "overwrite=true" in text, text
    assert [f.name for f in out.iterdir()] == ["README.md"]  # refused before anything was written
    assert (out / "README.md").read_text() == "the user's own README\n"
    rc, text = _export(capsys, str(ckpt), f"out={out}", "overwrite=true")
    assert rc == 0, text
    assert (out / "README.md").read_text().startswith("---") and (out / "export.json").is_file()
    # a link of the same name is never replaced nor written through, overwrite or not
    target = tmp_path / "notes.md"
    target.write_text("linked notes\n")
    (out / "README.md").unlink()
    (out / "README.md").symlink_to(target)
    rc, text = _export(capsys, str(ckpt), f"out={out}", "overwrite=true")
    assert rc == 2 and "README.md (a symbolic link" in text, text
    assert (out / "README.md").is_symlink() and target.read_text() == "linked notes\n"


def test_exporting_one_checkpoint_twice_gives_the_same_bytes_and_replaces_only_its_own_export(tmp_path, capsys):
    """Re-exporting into the same folder replaces the export's own files, byte for byte the same; the export of
    another checkpoint under the same name is refused (the default folder outputs/exports/<name> of another sweep)."""
    ckpt = _checkpoint(tmp_path / "run")
    first, second = tmp_path / "first", tmp_path / "second"
    assert _export(capsys, str(ckpt), f"out={first}")[0] == 0
    exported = _files(first)
    assert _export(capsys, str(ckpt), f"out={first}")[0] == 0  # its own files: replaced, no refusal
    assert _export(capsys, str(ckpt), f"out={second}")[0] == 0
    assert _files(first) == exported == _files(second)
    other = _checkpoint(tmp_path / "other sweep", seed=1)  # same trial and step: same name, another LoRA
    rc, text = _export(capsys, str(other), f"out={first}")
    assert rc == 2 and "the export of another checkpoint" in text and "overwrite=true" in text, text
    assert _files(first) == exported


def test_a_sweeps_champion_folder_holds_its_latest_export_only(tmp_path):
    """champion/ (own=True): a new champion replaces the previous export's files and removes those it does not write
    again, file by file; a file a person put there stays."""
    from sweep.export import from_checkpoint

    champion = tmp_path / "sweep" / "champion"
    rec = export(from_checkpoint(_checkpoint(tmp_path / "a", step=4)), champion, own=True)
    (champion / "notes.txt").write_text("mine\n")
    new = export(from_checkpoint(_checkpoint(tmp_path / "b", seed=1, step=6)), champion, own=True)
    assert {f.name for f in champion.iterdir()} == set(new["files"]) | {"export.json", "notes.txt"}
    assert rec["webui_file"] != new["webui_file"] and not (champion / rec["webui_file"]).exists()


@contextlib.contextmanager
def _as_nobody():
    """As an unprivileged user (effective uid, this process) when run as root, who writes into read-only folders."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534), os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0), os.setegid(0)


def test_a_read_only_or_unwritable_target_exits_2_with_the_path_and_the_fix(capsys):
    root = Path(tempfile.mkdtemp(prefix="export-ro-"))  # readable by the unprivileged user the check runs as
    try:
        root.chmod(0o755)
        ckpt = _checkpoint(root / "run")
        for p in [root / "run", *(root / "run").rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        locked = root / "locked"
        locked.mkdir(mode=0o555)
        locked.chmod(0o555)
        for out in (locked, locked / "new" / "sub"):
            with _as_nobody():
                rc, text = _export(capsys, str(ckpt), f"out={out}")
            assert rc == 2 and "Traceback" not in text, text
            assert f"cannot write the export in {locked}" in text and "chmod u+w" in text, text
            assert not list(locked.iterdir())
    finally:
        os.chmod(root / "locked", 0o755)
        shutil.rmtree(root)


def test_defaults_go_under_outputs(tmp_path, capsys, monkeypatch):
    """Run from a folder (the repository, for a README walk): the export and a generated image go under outputs/,
    which git ignores; nothing else is written there."""
    from sweep.generate import default_out

    ckpt = _checkpoint(tmp_path / "elsewhere")
    cwd = tmp_path / "repo"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    rc, text = _export(capsys, str(ckpt))
    assert rc == 0, text
    [folder] = (cwd / "outputs" / "exports").iterdir()
    assert folder.name == "step-000006_step6" and (folder / "export.json").is_file()
    assert [p.name for p in cwd.iterdir()] == ["outputs"]
    assert default_out().parent == Path("outputs") / "generated" and default_out().suffix == ".png"


def test_safetensors_files_are_the_same_bytes_for_the_same_tensors_and_metadata(tmp_path):
    """safetensors writes its header's metadata in a random order; the project's writer sorts it, and a checkpoint's
    diffusers file (written by diffusers' save_lora_weights) is sorted before its sha256 is recorded."""
    from peft import LoraConfig
    from safetensors.torch import load, save

    from common.lorafile import canonical_safetensors, safetensors_bytes
    from trainer.checkpoint import write_checkpoint

    tensors = {"b": torch.ones(3, dtype=torch.float16), "a": torch.arange(4.0)}
    meta = {f"k{i}": str(i) for i in range(12)}
    assert len({save(tensors, meta) for _ in range(4)}) > 1  # the library alone: not stable
    data = safetensors_bytes(tensors, meta)
    assert {safetensors_bytes(tensors, meta) for _ in range(4)} == {data}
    header = int.from_bytes(data[:8], "little")
    assert canonical_safetensors(save(tensors, meta)) == data and header % 8 == 0 and data[8:9] == b"{"
    got = load(data)
    assert got.keys() == tensors.keys() and all(torch.equal(got[k], tensors[k]) for k in tensors)
    peft = {f"{MODULE.removeprefix('unet.')}.lora_A.weight": torch.randn(4, 64),
            f"{MODULE.removeprefix('unet.')}.lora_B.weight": torch.randn(64, 4)}
    config = LoraConfig(r=4, lora_alpha=8.0, target_modules=["to_k"])
    shas = set()
    for i in range(3):
        folder = write_checkpoint(tmp_path / f"t{i}", 6, save_lora=lambda d: lora.save_unet_lora(d, peft, config),
                                  record={"loss": 0.1, "config_hash": "x", "trial": "t", "lr": 1e-4},
                                  state_tensors={}, state_json={})
        shas.add(json.loads((folder / "checkpoint.json").read_text())["lora_sha256"])
        assert hashlib.sha256((folder / LORA_FILE).read_bytes()).hexdigest() in shas
    assert len(shas) == 1
