"""Build the timm ViT that a measurement runs on, for the resolution it runs at, with random weights.

Weights are loaded separately (methods.load_checkpoint), which resamples the position embedding.
"""

from __future__ import annotations

import difflib

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from methods.errors import TokenBenchError
from methods.timm_compat import patch_size


def create_model(name: str, img_size: int = 224, num_classes: int | None = None) -> VisionTransformer:
    """timm model `name` built for `img_size` x `img_size` images, randomly initialised."""
    if not timm.is_model(name):
        raise TokenBenchError(f"timm has no model {name!r}; close matches: {', '.join(close_matches(name)) or 'none'}")
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size <= 0:
        raise TokenBenchError(f"img_size must be a positive int, got {img_size!r}")
    extra = {} if num_classes is None else {"num_classes": num_classes}
    try:
        model = timm.create_model(name, pretrained=False, img_size=img_size, **extra)
    except TypeError:  # architectures without an img_size argument: not ViTs
        model = None
    if not isinstance(model, VisionTransformer):
        kind = type(model).__name__ if model is not None else architecture_class(name)
        raise TokenBenchError(
            f"{name} is a {kind}, tokenbench needs a timm VisionTransformer (e.g. deit_small_patch16_224)"
        )
    height, width = patch_size(model)
    if img_size % height or img_size % width:
        raise TokenBenchError(f"{name}: image size {img_size} is not divisible by its patch size {height}x{width}")
    return model


def close_matches(name: str, count: int = 8) -> list[str]:
    """timm names starting with `name`'s architecture, else containing it, else the nearest spellings."""
    architecture = name.split(".")[0]
    known = timm.list_models(f"{architecture}*") or timm.list_models(f"*{architecture}*")
    return known[:count] or difflib.get_close_matches(architecture, timm.list_models(), n=count)


def architecture_class(name: str) -> str:
    """The class timm builds for `name`, found without allocating weights."""
    with torch.device("meta"):
        return type(timm.create_model(name, pretrained=False)).__name__
