from .attention import AttentionRecord, MSDeformAttn, capture_attention
from .backbone import build_backbone
from .detector import MLP, BoxHead, DeformableDETR, build_model, check_model, evaluating, pad_images
from .postprocess import postprocess
from .transformer import DeformableTransformer, inverse_sigmoid

__all__ = [
    "AttentionRecord",
    "BoxHead",
    "MLP",
    "DeformableDETR",
    "DeformableTransformer",
    "MSDeformAttn",
    "build_backbone",
    "build_model",
    "capture_attention",
    "check_model",
    "evaluating",
    "inverse_sigmoid",
    "pad_images",
    "postprocess",
]
