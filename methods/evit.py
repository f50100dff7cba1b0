"""EViT (Liang et al., ICLR 2022): keep the top-k tokens by class attention, fuse the rest into one.

As the official inference code runs: at each location, after the attention residual and before
the FFN, the patch tokens are ranked by the CLS query's post-softmax attention (mean over heads);
ceil(keep_rate * n) are kept, highest first, and the others are summed, weighted by their raw
attention, into one token appended last, which competes in the next selection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from timm.models.vision_transformer import Block, VisionTransformer

from methods.config import ReductionConfig
from methods.registry import register
from methods.timm_compat import (
    num_prefix_tokens,
    require_class_token,
    require_stock_blocks,
    take_tapped_qk,
    tap_query_key,
)
from methods.token_ops import class_attention, fuse_dropped, gather_tokens, keep_count, top_k_positions
from methods.tracing import report_selection


@dataclass(frozen=True)
class EViTConfig(ReductionConfig):
    """EViT's DeiT defaults: keep rate 0.7 at blocks 3, 6 and 9."""


class SelectingBlock(Block):
    """timm's Block, keeping the most attended patch tokens between its attention and its FFN."""

    keep_rate: float
    fuse: bool
    prefix: int

    def forward(self, x: torch.Tensor, **block_kwargs: Any) -> torch.Tensor:
        """`block_kwargs`: what this timm version's Block passes to its attention (attn_mask, ...)."""
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), **block_kwargs)))
        x = self.select_tokens(x)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def select_tokens(self, x: torch.Tensor) -> torch.Tensor:
        q_cls, k, scale = take_tapped_qk(self)
        n_patches = x.shape[1] - self.prefix
        n_keep = keep_count(self.keep_rate, n_patches)
        if n_keep >= n_patches:
            return x  # nothing to drop: the official code skips fusion too
        scores = class_attention(q_cls, k, scale)  # [B, N]
        # With fusion, one more: the best dropped token, a placeholder row for the fused token.
        ranked = top_k_positions(scores, n_keep + int(self.fuse), self.prefix)  # [B, P + n_keep (+ 1)]
        kept = ranked[:, : self.prefix + n_keep]  # sequence positions, the prefix's first
        out = gather_tokens(x, ranked)  # [B, P + n_keep (+ 1), C]
        if self.fuse:
            fuse_dropped(x, scores, kept, out=out[:, -1:])
        others = "fused" if self.fuse else "dropped"
        report_selection(self, kept[:, self.prefix :], others=others, appended=int(self.fuse), offset=self.prefix)
        return out


def patch_selecting_blocks(model: VisionTransformer, config: ReductionConfig, method: str, fuse: bool) -> None:
    """Swap the blocks at `config.locations` for SelectingBlock; weights and keys stay as they are."""
    require_class_token(model, method)
    require_stock_blocks(model, config.locations, method)
    for i in config.locations:
        block = model.blocks[i]
        block.__class__ = SelectingBlock
        block.keep_rate = config.keep_rate
        block.fuse = fuse
        block.prefix = num_prefix_tokens(model)
        tap_query_key(block)


@register("evit", config=EViTConfig)
def apply_evit(model: VisionTransformer, config: EViTConfig) -> None:
    """Keep the top-k patch tokens by class attention, fuse the rest into one token (EViT)."""
    patch_selecting_blocks(model, config, "evit", fuse=True)
