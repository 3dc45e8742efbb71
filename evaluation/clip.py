"""CLIP for torchmetrics' CLIPScore, loaded once from a hub id or a local folder.

transformers 5 returns output objects from CLIPModel.get_*_features while torchmetrics expects tensors;
`TensorCLIP` hands torchmetrics the projected embeddings."""
from __future__ import annotations

from pathlib import Path

import torch
from torchmetrics.multimodal import CLIPScore

RANDOM_WEIGHTS_MARKER = "RANDOM_WEIGHTS"  # a folder holding this file was built from config: its scores mean nothing


class TensorCLIP(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(pixel_values=pixel_values.to(self.model.dtype)))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


class ClipScorer:
    """One CLIP model behind three scores: image-text (CLIP-T), image-image (CLIP-I), pairwise within a set."""

    def __init__(self, name_or_path: str, device: torch.device):
        from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

        model = CLIPModel.from_pretrained(name_or_path).eval().to(device)
        # the PIL image processor by name: what transformers falls back to without torchvision (with a warning)
        processor = CLIPProcessor(image_processor=CLIPImageProcessorPil.from_pretrained(name_or_path),
                                  tokenizer=AutoTokenizer.from_pretrained(name_or_path))
        self.device = device
        self.random_weights = (Path(name_or_path) / RANDOM_WEIGHTS_MARKER).is_file()
        adapted = TensorCLIP(model)
        self.metric = CLIPScore(model_name_or_path=lambda: (adapted, processor)).to(device)

    @torch.no_grad()
    def score(self, source, target) -> float:
        """Mean CLIPScore over aligned pairs (images as N x 3 x H x W uint8 tensors, or strings)."""
        self.metric.reset()
        self.metric.update(self._dev(source), self._dev(target))
        return float(self.metric.compute())

    def text(self, images: torch.Tensor, prompts: list[str]) -> float:
        return self.score(images, prompts)

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Unit CLIP embeddings of N x 3 x H x W uint8 images, through the metric's own model and processor (what
        CLIPScore computes for each image of a pair), each image once."""
        processed = self.metric.processor(images=[i.cpu() for i in images], return_tensors="pt", padding=True)
        f = self.metric.model.get_image_features(processed["pixel_values"].to(self.device))
        return f / f.norm(p=2, dim=-1, keepdim=True)

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        """Unit CLIP embeddings of texts, as CLIPScore makes them (its processor, padded, cut to the model's length)."""
        processed = self.metric.processor(text=texts, return_tensors="pt", padding=True)
        limit = self.metric.model.config.text_config.max_position_embeddings
        ids, mask = processed["input_ids"][..., :limit], processed["attention_mask"][..., :limit]
        f = self.metric.model.get_text_features(ids.to(self.device), mask.to(self.device))
        return f / f.norm(p=2, dim=-1, keepdim=True)

    def text_cells(self, images: torch.Tensor, prompts: list[str]) -> list[float]:
        """Each image's CLIP-T against its own prompt: the terms CLIPScore averages (100 x cosine)."""
        cos = (self.image_features(images) * self.text_features(prompts)).sum(-1)
        return [float(v) for v in 100 * cos.double()]

    def ref_cells(self, images: torch.Tensor, refs: torch.Tensor) -> list[float]:
        """Each image's CLIP-I: 100 x its mean cosine to the reference photos (their mean over images is
        `image_to_refs` before CLIPScore's floor at 0)."""
        cos = self.image_features(images) @ self.image_features(refs).T
        return [float(v) for v in 100 * cos.double().mean(dim=1)]

    def image_to_refs(self, images: torch.Tensor, refs: torch.Tensor) -> float:
        """Every generated image against every reference photo: CLIPScore over all n x m pairs, with each image
        embedded once instead of once per pair (m + n embeddings, not 2 n m)."""
        return _clip_mean(self.image_features(images) @ self.image_features(refs).T)

    def pairwise(self, images: torch.Tensor) -> float:
        """Mean CLIP-I over all pairs of a set: high means the images look alike (low diversity)."""
        if len(images) < 2:
            return float("nan")
        f = self.image_features(images)
        i, j = torch.triu_indices(len(images), len(images), offset=1)
        return _clip_mean((f[i] * f[j]).sum(-1))

    def _dev(self, x):
        return x.to(self.device) if isinstance(x, torch.Tensor) else x


def _clip_mean(cosines: torch.Tensor) -> float:
    """CLIPScore's reduction: max(100 x mean cosine, 0)."""
    return max(float(100 * cosines.double().mean()), 0.0)
