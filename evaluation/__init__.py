"""Image generation from LoRA checkpoints and their metrics (CLIP, face identity). Knows nothing of training."""
from .config import STUDY_PROMPTS, EvalConfig, validate_eval
from .evaluate import BASELINE, EvalInputError, evaluate, preflight
from .face import DlibBackend, FaceBackendMissing, FaceSimilarity, Identity

__all__ = ["BASELINE", "STUDY_PROMPTS", "DlibBackend", "EvalConfig", "EvalInputError", "FaceBackendMissing",
           "FaceSimilarity", "Identity", "evaluate", "preflight", "validate_eval"]
