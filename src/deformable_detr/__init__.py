"""Deformable DETR: complete, checkpoint-compatible, on CPU and CUDA."""

import importlib.metadata

from .checkpoints import CheckpointError, convert_checkpoint, load_pretrained, save_checkpoint
from .config import PRESETS, ModelConfig, get_config
from .explain import explain
from .explore import explore
from .model import DeformableDETR, MSDeformAttn, build_model, capture_attention, postprocess
from .ops import ms_deform_attn, ms_deform_attn_reference
from .predict import Detections, Detector

__all__ = [
    "PRESETS",
    "CheckpointError",
    "DeformableDETR",
    "Detections",
    "Detector",
    "MSDeformAttn",
    "ModelConfig",
    "build_model",
    "capture_attention",
    "convert_checkpoint",
    "explain",
    "explore",
    "get_config",
    "load_pretrained",
    "ms_deform_attn",
    "ms_deform_attn_reference",
    "postprocess",
    "save_checkpoint",
]

__version__ = importlib.metadata.version("deformable-detr")
