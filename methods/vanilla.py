"""The unreduced model: the reference every method is compared with."""

from __future__ import annotations

from dataclasses import dataclass

from timm.models.vision_transformer import VisionTransformer

from methods.config import ReductionConfig
from methods.registry import register


@dataclass(frozen=True)
class VanillaConfig(ReductionConfig):
    """Takes the common options so every method is called alike; it reduces nothing whatever they say."""

    keep_rate: float = 1.0
    locations: tuple[int, ...] = ()


@register("vanilla", config=VanillaConfig)
def apply_vanilla(model: VisionTransformer, config: VanillaConfig) -> None:
    """The model as it is: no token is reduced."""
