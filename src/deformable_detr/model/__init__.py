from .attention import MSDeformAttn
from .backbone import build_backbone
from .detector import MLP, DeformableDETR, build_model, pad_images
from .postprocess import postprocess
from .transformer import DeformableTransformer, inverse_sigmoid

__all__ = [
    "MLP",
    "DeformableDETR",
    "DeformableTransformer",
    "MSDeformAttn",
    "build_backbone",
    "build_model",
    "inverse_sigmoid",
    "pad_images",
    "postprocess",
]
