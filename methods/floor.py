"""The floor twin of a method: the same model at the method's own token counts, selected by a slice.

On a GPU a method's speed is bounded by what its token counts allow, not by its MAC ratio (LayerNorm,
residual adds and casts stay, launches do not shrink). The twin measures that bound: at each block it
keeps the first n tokens where the method keeps n (one contiguous copy), with no scoring, no gather
and no fused or summary token. Its speedup over vanilla is the best any method with those counts can
reach, so `speedup / floor_speedup` is the share of it that the method's own selection code leaves.

It is not a method (it computes nothing meaningful) and is not registered: the harness builds one
next to each method it times. Counts come from `block_token_counts`, measured by running the method.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from methods.api import BlockTokenCounts
from methods.errors import TokenBenchError
from methods.timm_compat import (
    applied_method,
    depth,
    mark_applied,
    require_stock_blocks,
    require_unpatched,
    require_vit,
)


@dataclass(frozen=True)
class FloorTwin:
    """What `apply_floor` did to a model (kept on it, as `apply` keeps an AppliedMethod)."""

    counts: BlockTokenCounts


class SlicingBlock(Block):
    """timm's Block on the first `attention_tokens` tokens, its FFN on the first `ffn_tokens`.

    Tokens that later blocks need again (`carried`: a method that hands tokens back, as Evo-ViT's
    paper variant does after a stage) pass this block unchanged; the others are dropped. Carrying
    writes into the block's input: the twin is for inference only.
    """

    attention_tokens: int
    ffn_tokens: int
    carried: int

    def forward(self, x: torch.Tensor, **block_kwargs: Any) -> torch.Tensor:
        full = x
        x = x[:, : self.attention_tokens]
        if self.carried <= self.attention_tokens:
            x = x.contiguous()  # [B, a, C]: the one copy that the selection costs
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), **block_kwargs)))
        if self.ffn_tokens < x.shape[1]:
            x = x[:, : self.ffn_tokens].contiguous()  # [B, f, C]
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        if self.carried <= x.shape[1]:
            return x
        full[:, : x.shape[1]] = x  # the others pass unchanged, in place: one write of the computed tokens
        return full[:, : self.carried]  # [B, carried, C]


def carried_counts(counts: BlockTokenCounts) -> list[int]:
    """For each block, how many tokens anything after it needs: the most that a later attention or FFN
    takes, or that leave the last block (`exiting`) for the final norm."""
    return [max(counts.attention[b + 1 :] + counts.ffn[b + 1 :] + (counts.exiting,)) for b in range(len(counts.ffn))]


def check_counts(model: VisionTransformer, counts: BlockTokenCounts) -> None:
    full = counts.entering
    if len(counts.attention) != depth(model) or len(counts.ffn) != depth(model):
        raise TokenBenchError(f"the floor needs one attention and one FFN count per block ({depth(model)} blocks)")
    if (
        any(not 0 < n <= full for n in (*counts.attention, *counts.ffn, counts.exiting))
        or any(f > a for a, f in zip(counts.attention, counts.ffn))
        or counts.exiting < counts.ffn[-1]
    ):
        raise TokenBenchError(
            f"token counts must lie in 1..{full}, each FFN count at most its attention count and the exiting "
            f"count at least the last FFN's, got {counts}"
        )


def apply_floor(model: nn.Module, counts: BlockTokenCounts) -> nn.Module:
    """Turn a timm ViT that reduces nothing (unpatched, or with `vanilla` applied) into the floor twin
    for `counts` (a method's `block_token_counts`), in place; weights and state_dict keys stay.
    Blocks that reduce nothing stay timm's own."""
    vit = require_vit(model)
    if getattr(applied_method(vit), "config", None) is None or applied_method(vit).config.locations:
        require_unpatched(vit)  # a model that reduces nothing (none applied, or vanilla) may become the twin
    check_counts(vit, counts)
    full = counts.entering
    carried = carried_counts(counts)
    slicing = [b for b in range(depth(vit)) if (counts.attention[b], counts.ffn[b], carried[b]) != (full,) * 3]
    require_stock_blocks(vit, slicing, "floor")
    for b in slicing:
        block = vit.blocks[b]
        block.__class__ = SlicingBlock
        block.attention_tokens, block.ffn_tokens, block.carried = counts.attention[b], counts.ffn[b], carried[b]
    mark_applied(vit, FloorTwin(counts))
    return model


def floor_counts(
    attention: Sequence[int], ffn: Sequence[int], entering: int | None = None, exiting: int | None = None
) -> BlockTokenCounts:
    """Counts given by hand (tests, benchmarks), as `block_token_counts` would measure them; `entering`
    defaults to the first attention count (no reduction before the first block), `exiting` to the last
    FFN count (nothing handed back after it)."""
    if entering is None:
        entering = attention[0] if attention else 0
    if exiting is None:
        exiting = ffn[-1] if ffn else 0
    return BlockTokenCounts(attention=tuple(attention), ffn=tuple(ffn), entering=entering, exiting=exiting)
