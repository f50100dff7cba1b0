"""The public entry points: apply a method to a model, and count the tokens each block processes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from methods.config import ReductionConfig
from methods.registry import lookup
from methods.timm_compat import check_image_size, depth, mark_applied, require_unpatched, require_vit


@dataclass(frozen=True)
class AppliedMethod:
    """What `apply` did to a model: kept on it so a record can say how it was measured."""

    name: str
    config: ReductionConfig


def apply(model: nn.Module, name: str, **options: Any) -> nn.Module:
    """Patch a timm VisionTransformer in place with method `name` and return it.

    Every check runs before the model is touched, so a refused call leaves it as it was.
    """
    spec = lookup(name)
    config = spec.make_config(**options)
    vit = require_vit(model)
    require_unpatched(vit)
    config.check_depth(depth(vit))
    spec.patch(vit, config)
    mark_applied(vit, AppliedMethod(name=name, config=config))
    return model


@dataclass(frozen=True)
class BlockTokenCounts:
    """Tokens (prefix tokens included) that each block's attention and FFN process, how many tokens
    enter the first block (a method may reduce before the first attention), and how many leave the
    last one for the final norm and head (a method may hand tokens back after its last FFN, as
    Evo-ViT's close of a stage does)."""

    attention: tuple[int, ...]
    ffn: tuple[int, ...]
    entering: int
    exiting: int


def token_counts(model: nn.Module, img_size: int | Sequence[int]) -> list[int]:
    """Tokens (prefix tokens included) that each block's FFN processes for one image of that size.

    Measured by running the model on one random image, so it shows what the code does.
    """
    return list(block_token_counts(model, img_size).ffn)


def block_token_counts(model: nn.Module, img_size: int | Sequence[int]) -> BlockTokenCounts:
    """Tokens that each block's attention and FFN process for one image of that size, measured by
    running the model: what the floor twin (methods.floor) reproduces by slicing."""
    vit = require_vit(model)
    height, width = check_image_size(vit, img_size)
    attention, ffn = [0] * depth(vit), [0] * depth(vit)

    def recorder(counts: list[int], index: int):
        def record(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            counts[index] = inputs[0].shape[1]

        return record

    entering, exiting = [0], [0]
    hooks = [vit.blocks.register_forward_pre_hook(recorder(entering, 0))]
    hooks += [vit.blocks.register_forward_hook(lambda _module, _inputs, out: exiting.__setitem__(0, out.shape[1]))]
    hooks += [block.mlp.register_forward_pre_hook(recorder(ffn, i)) for i, block in enumerate(vit.blocks)]
    hooks += [block.attn.register_forward_pre_hook(recorder(attention, i)) for i, block in enumerate(vit.blocks)]
    param = next(vit.parameters())
    image = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0)).to(param)
    was_training = vit.training
    try:
        vit.eval()
        with torch.inference_mode():
            vit(image)
    finally:
        vit.train(was_training)
        for hook in hooks:
            hook.remove()
    return BlockTokenCounts(attention=tuple(attention), ffn=tuple(ffn), entering=entering[0], exiting=exiting[0])
