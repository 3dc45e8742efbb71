"""Offline stand-ins the random-weight builds share (a family's tiny model for tests and the demo, the tiny CLIP
scorer): tokenizers that need no download."""
from __future__ import annotations

import json
from pathlib import Path


def byte_level_tokenizers(folder: Path):
    """CLIP tokenizers over a byte-level vocabulary (no merges): offline stand-ins for the real BPE files.

    Each character is a token, so every prompt tokenizes; only the vocabulary differs from SDXL's."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + len(chars) for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer.from_pretrained(folder, model_max_length=77)
    tok2 = CLIPTokenizer.from_pretrained(folder, model_max_length=77, pad_token="!")
    return tok, tok2


def clip_kwargs(spec: dict) -> dict:
    """A CLIP text config from conf/model's architecture, with the ids of `byte_level_tokenizers`' special tokens."""
    kw = {k: v for k, v in spec.items() if k != "class"}
    # ids of the byte-level tokenizer above: <|startoftext|>=512, <|endoftext|>=513
    kw.setdefault("bos_token_id", 512)
    kw.setdefault("eos_token_id", 513)
    kw.setdefault("pad_token_id", 513)
    return kw
