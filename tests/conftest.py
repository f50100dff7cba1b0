"""Small models built locally: no weights are downloaded anywhere in the test suite."""

from __future__ import annotations

import logging
import os

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

logging.getLogger("fvcore").setLevel(logging.ERROR)


def peaked_attention(model: VisionTransformer, std: float = 0.25, seed: int = 0) -> VisionTransformer:
    """Re-draw q/k weights larger than timm's init so class attention has no near-ties.

    With timm's 0.02-std init every attention row is almost uniform, and top-k would pick among
    scores equal to the last bit, which makes comparisons between two correct implementations flaky.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.blocks:
            weight = block.attn.qkv.weight
            qk_rows = 2 * weight.shape[0] // 3
            weight[:qk_rows] = torch.randn(weight[:qk_rows].shape, generator=generator) * std
    return model.eval()


def tiny_vit(**kwargs) -> VisionTransformer:
    """A 4-block ViT on 64x64 images: 16 patches, fast enough to run many times."""
    torch.manual_seed(0)
    args = dict(img_size=64, patch_size=16, embed_dim=64, depth=4, num_heads=4, num_classes=10)
    args.update(kwargs)
    return peaked_attention(VisionTransformer(**args))


@pytest.fixture(autouse=True, scope="session")
def private_decode_cache(tmp_path_factory):
    """Sweeps with --data keep decoded images in $XDG_CACHE_HOME/tokenbench: the tests' go to a temporary folder."""
    saved = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if saved is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = saved


@pytest.fixture
def deit_tiny() -> VisionTransformer:
    torch.manual_seed(0)
    return peaked_attention(timm.create_model("deit_tiny_patch16_224"))


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
