"""Image generation from LoRA checkpoints and their metrics (CLIP, face identity). Knows nothing of training."""
