"""Top-k pruning by class attention: EViT's selection without the fused token ("without fusion")."""

from __future__ import annotations

from dataclasses import dataclass

from timm.models.vision_transformer import VisionTransformer

from methods.config import ReductionConfig
from methods.evit import patch_selecting_blocks
from methods.registry import register


@dataclass(frozen=True)
class PruneConfig(ReductionConfig):
    """The same defaults as EViT: keep rate 0.7 at blocks 3, 6 and 9."""


@register("prune", config=PruneConfig)
def apply_prune(model: VisionTransformer, config: PruneConfig) -> None:
    """Keep the top-k patch tokens by class attention and drop the rest (EViT without fusion)."""
    patch_selecting_blocks(model, config, "prune", fuse=False)
