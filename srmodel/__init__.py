"""srmodel: the SeeSR + SAM2.1 super-resolution model and its maths. No Ray in here."""

from .controlnet import SemanticControlNet
from .errors import WeightsError
from .sampler import denoise
from .unet import SemanticUNet

__all__ = ["SemanticControlNet", "SemanticUNet", "WeightsError", "denoise"]
