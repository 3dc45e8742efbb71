"""The LoRA file contract that training writes and evaluation reads: a checkpoint folder holds
`pytorch_lora_weights.safetensors` (diffusers format) and `checkpoint.json` (its record, with the file's sha256);
an export folder holds files whose sha256 are in `export.json`; every safetensors file this project writes has its
header in one order (`safetensors_bytes`), so the same tensors and metadata give the same bytes. And merging an
adapter into the base's weights, so that generating with a LoRA costs what the base costs."""
from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

from .files import write_atomic

LORA_FILE = "pytorch_lora_weights.safetensors"
RECORD_FILE = "checkpoint.json"
EXPORT_RECORD = "export.json"  # beside files exported from a checkpoint (sweep/export/): {"files": {name: sha256}}


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors file of `tensors` and `metadata`, the same bytes (and sha256) every time: safetensors itself
    writes the header's metadata in a random order (a Rust HashMap), so a LoRA written twice got two hashes."""
    from safetensors.torch import save

    return canonical_safetensors(save({k: v.contiguous() for k, v in tensors.items()}, metadata))


def canonical_safetensors(data: bytes) -> bytes:
    """A safetensors file's bytes with its JSON header's keys sorted (metadata, tensor names), padded with spaces to
    8 bytes as safetensors pads it. The tensors' bytes and offsets are untouched: the file loads the same."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n:]


def canonicalize(path: Path) -> None:
    """Rewrite the safetensors file at `path` (one a library wrote, e.g. diffusers' `save_lora_weights`) with its
    header in sorted order, atomically; a file already in that order is left as it is."""
    path = Path(path)
    data = path.read_bytes()
    fixed = canonical_safetensors(data)
    if fixed != data:
        write_atomic(path, fixed)


@dataclass
class CheckpointRecord:
    step: int
    loss: float
    config_hash: str
    lora_sha256: str
    trial: str
    lr: float
    created: float

    @classmethod
    def read(cls, folder: Path) -> "CheckpointRecord":
        return cls(**json.loads((folder / RECORD_FILE).read_text()))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def recorded_sha256(path: Path) -> str | None:
    """The sha256 recorded for a LoRA file when it was written: the checkpoint's own file in checkpoint.json, an
    exported one (or the diffusers copy in an export folder) in export.json beside it; None if nothing records it."""
    path = Path(path)
    try:
        exported = json.loads((path.parent / EXPORT_RECORD).read_text()).get("files", {})
        if path.name in exported:
            return exported[path.name]
    except (OSError, ValueError, AttributeError):
        pass
    if path.name == LORA_FILE and (path.parent / RECORD_FILE).is_file():
        try:
            return json.loads((path.parent / RECORD_FILE).read_text()).get("lora_sha256")
        except (OSError, ValueError, AttributeError):
            return None
    return None


# (parent module, attribute, adapter wrapper, its base Linear, the wrapper's weight update W' - W as fp32 factors
# (B', A): update = B' @ A, B' scaled)
MergeSite = tuple[nn.Module, str, nn.Module, nn.Linear, Callable[[], tuple[torch.Tensor, torch.Tensor]]]


class BesideBase(nn.Module):
    """A base Linear whose weight is stored in 8 bits (a quantised frozen base, families/quantize.py) with an update
    applied beside it instead of merged: y = base(x) + x A^T B'^T. Rounding W + B'A to 8 bits would drop most of
    the update (fp8 keeps 3 mantissa bits, a LoRA moves a weight by ~0.1%), so the low-rank path stays, computed as
    training computes it; `factor` is the strength (`rescaled`)."""

    def __init__(self, base: nn.Linear, b: torch.Tensor, a: torch.Tensor):
        super().__init__()
        self.base, self.factor = base, 1.0
        self.register_buffer("b", b, persistent=False)
        self.register_buffer("a", a, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        h = nn.functional.linear(x.to(out.dtype), self.a.to(out.dtype))
        return out + nn.functional.linear(h, (self.b * self.factor).to(out.dtype))


def holds_update(weight: torch.Tensor) -> bool:
    """Whether W + update, rounded to W's dtype, keeps the update: not for 8-bit storage (float8)."""
    return weight.element_size() > 1


@contextlib.contextmanager
def merged_into_base(sites: list[MergeSite]):
    """Inside: each adapter wrapper is replaced, in its parent, by its own base Linear carrying W + update (summed
    in fp32, rounded once to W's dtype, as diffusers' fuse_lora does). Generating then costs what the plain base
    costs (peft's adapter layers add ~15% per image, docs/speed.md) and runs the very modules, so the very compiled
    code, that the base runs. On exit the wrappers are back and every base weight is restored bit for bit from a
    copy (subtracting the update again would not give bf16 weights back exactly); the copy waits in CPU memory when
    the GPU has no room for it. A base stored in 8 bits gets the update beside it (`BesideBase`), not merged.
    Merging does not nest."""
    if len({id(base) for *_, base, _ in sites}) < len(sites):
        raise ValueError("merged_into_base: a base Linear is listed twice (its restore would not be exact)")
    if any(getattr(parent, attr) is not wrapper for parent, attr, wrapper, *_ in sites):
        raise RuntimeError("merged_into_base: an adapter is not in its place (already merged?): merging does not nest")
    if not sites:
        yield
        return
    weights = [base.weight for *_, base, _ in sites]
    device = weights[0].device
    need = sum(w.numel() * w.element_size() for w in weights)
    if device.type == "cuda" and torch.cuda.mem_get_info(device)[0] < 2 * need:
        device = torch.device("cpu")
    done: list[tuple[MergeSite, torch.Tensor | BesideBase]] = []
    try:
        with torch.no_grad(), torch.autocast(weights[0].device.type, enabled=False):  # the update in fp32, always
            for site in sites:
                parent, attr, _, base, update = site
                if holds_update(base.weight):
                    done.append((site, base.weight.to(device, copy=True)))
                    b, a = update()
                    base.weight.copy_(base.weight.float() + b @ a)
                    setattr(parent, attr, base)
                else:
                    done.append((site, BesideBase(base, *update())))
                    setattr(parent, attr, done[-1][1])
        _MERGES.append(done)
        yield
    finally:
        if _MERGES and _MERGES[-1] is done:
            _MERGES.pop()
        with torch.no_grad():
            for (parent, attr, wrapper, base, _), orig in reversed(done):
                if not isinstance(orig, BesideBase):
                    base.weight.copy_(orig)
                setattr(parent, attr, wrapper)


_MERGES: list[list] = []  # merges in progress (merged_into_base), innermost last: what `rescaled` changes


@contextlib.contextmanager
def rescaled(scale: float):
    """Inside: the innermost merge in progress at another strength, W + scale x update (computed from the kept copy
    of W, in fp32 as the merge is); after, W + update again, bit for bit as merged. Only weights change in place, so
    the very modules and compiled code serve every strength (evaluation scores a checkpoint at several)."""
    if scale == 1.0:
        yield
        return
    if not _MERGES:
        raise RuntimeError("rescaled: no merged adapter to scale (use it inside merged / merged_into_base)")
    done = _MERGES[-1]

    def put(factor: float) -> None:
        with torch.no_grad():
            for (_, _, _, base, update), orig in done:
                if isinstance(orig, BesideBase):
                    orig.factor = factor
                    continue
                with torch.autocast(base.weight.device.type, enabled=False):
                    b, a = update()
                    base.weight.copy_(orig.to(base.weight.device).float() + factor * (b @ a))

    try:
        put(scale)
        yield
    finally:
        put(1.0)


def peft_sites(module: nn.Module) -> list[MergeSite]:
    """Every peft LoRA Linear in `module` whose active adapters merge into a plain weight update W + scale B A (no
    variant such as DoRA, no LoRA bias, not merged already); any other adapter layer stays as it is and applies
    itself."""
    sites = []
    for name, layer in module.named_modules():
        if type(layer) is not LoraLinear or layer.merged or layer.disable_adapters:
            continue
        active = [a for a in layer.active_adapters if a in layer.lora_A]
        if (not active or not isinstance(layer.base_layer, nn.Linear)
                or any(a in getattr(layer, "lora_variant", {}) or layer.use_dora.get(a) or layer.lora_bias.get(a)
                       for a in active)):
            continue

        def update(layer=layer, active=active) -> tuple[torch.Tensor, torch.Tensor]:
            b = torch.cat([layer.lora_B[a].weight.float() * layer.scaling[a] for a in active], dim=1)
            a = torch.cat([layer.lora_A[a].weight.float() for a in active])
            return (a.T, b.T) if layer.fan_in_fan_out else (b, a)

        parent_name, _, attr = name.rpartition(".")
        sites.append((module.get_submodule(parent_name), attr, layer, layer.base_layer, update))
    return sites


_PLAIN = {"use_dora": False, "use_rslora": False, "lora_bias": False, "fan_in_fan_out": False, "bias": "none",
          "rank_pattern": {}, "alpha_pattern": {}}  # a LoRA file's config that `file_sites` merges itself


def file_sites(module: nn.Module, path: Path, scale: float = 1.0) -> list[MergeSite] | None:
    """The merge sites of a denoiser LoRA file as training writes it (diffusers format: every key under one part,
    `unet.` or `transformer.`, its peft LoraConfig in the file's metadata, plain Linear updates W + scale x alpha/r x
    B A), read straight from its tensors: what peft would merge after `load_lora_weights`, without first building an
    adapter layer per targeted Linear (~560 in SDXL's UNet, seconds per checkpoint; evaluation swaps a checkpoint in
    for every racing round). Each site is the Linear itself (merged in place, nothing to swap out). None for any
    other file (text-encoder layers, kohya names or alphas, no metadata, DoRA, rsLoRA, biases, rank or alpha
    patterns, a module that is not a Linear (an 8-bit one counts) of these sizes, a denoiser carrying adapter
    layers): peft loads those."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:  # what the pipelines' lora_state_dict gives for such a file
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safe_open handle is no dict)
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    meta = json.loads(raw) if raw else None
    parts = {k.split(".", 1)[0] for k in state}
    if len(parts) != 1:
        return None
    prefix = f"{parts.pop()}."
    conf = {k.removeprefix(prefix): v for k, v in (meta or {}).items()}
    if (not meta or "lora_alpha" not in conf
            or any(conf.get(k, plain) != plain for k, plain in _PLAIN.items())):
        return None
    tensors = convert_unet_state_dict_to_peft({k.removeprefix(prefix): v for k, v in state.items()})
    names = sorted({k.rsplit(".lora_", 1)[0] for k in tensors})
    if len(tensors) != 2 * len(names):
        return None
    sites = []
    for name in names:
        a, b = tensors.get(f"{name}.lora_A.weight"), tensors.get(f"{name}.lora_B.weight")
        try:
            layer = module.get_submodule(name)
        except AttributeError:
            return None
        if (a is None or b is None or not isinstance(layer, nn.Linear) or a.shape[0] != b.shape[1]
                or (b.shape[0], a.shape[1]) != tuple(layer.weight.shape)):
            return None
        factor = scale * float(conf["lora_alpha"]) / a.shape[0]  # peft's scaling, alpha / r
        a, b = (t.to(layer.weight.device, torch.float32) for t in (a, b))

        def update(a=a, b=b, factor=factor) -> tuple[torch.Tensor, torch.Tensor]:
            return b * factor, a  # as peft_sites gives it

        parent_name, _, attr = name.rpartition(".")
        sites.append((module.get_submodule(parent_name), attr, layer, layer, update))
    return sites


def merged(module: nn.Module):
    """Inside: the peft LoRA adapters active on `module` (a UNet) merged into its weights (`merged_into_base`)."""
    return merged_into_base(peft_sites(module))
