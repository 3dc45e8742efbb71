"""CLIP built from config with random weights, saved once and loaded with from_pretrained like a hub model.

Offline tests and the demo score with it; its numbers carry no meaning (the folder says so)."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from families.tiny import byte_level_tokenizers
from trainer.config import stable_hash
from trainer.models import RANDOM_WEIGHTS_MARKER, publish


def build_clip(architecture: dict[str, Any], cache_dir: Path) -> str:
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    out = Path(cache_dir) / "models" / f"clip-{stable_hash(architecture)}"
    if (out / "config.json").is_file():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent))
    try:
        torch.manual_seed(int(architecture.get("seed", 0)))
        text = {"bos_token_id": 512, "eos_token_id": 513, "pad_token_id": 513, **architecture["text_config"]}
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=architecture["vision_config"],
                                     projection_dim=architecture["projection_dim"]))
        size = architecture["vision_config"]["image_size"]
        tok_dir = Path(tempfile.mkdtemp())
        tok, _ = byte_level_tokenizers(tok_dir)
        shutil.rmtree(tok_dir)
        processor = CLIPProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": size},
                                                                        crop_size={"height": size, "width": size}),
                                  tokenizer=tok)
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / RANDOM_WEIGHTS_MARKER).write_text("built from config with random weights: CLIP scores mean nothing\n")
        publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)
