"""ToMe (Bolya et al., ICLR 2023): merge the r most similar tokens in every block, keep their sizes.

As the official inference code runs: in each location block, between the attention residual and the
FFN, the keys of that block's attention (mean over heads) are the metric; the tokens are split
alternately into sets A and B, each A token finds its most cosine-similar B token, and the r A tokens
with the best matches are averaged into them, weighted by size (how many patches a token stands
for). Prefix tokens (class, distillation, register) are never merged. With proportional attention
every later attention adds log(size) to each key's logits: passed to timm's own attention as an
additive mask, so the fused kernel runs and no N x N matrix is built here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from timm.models.vision_transformer import Block, VisionTransformer

from methods.config import ReductionConfig, check_keep_rate, check_locations
from methods.errors import TokenBenchError
from methods.registry import register
from methods.timm_compat import (
    num_prefix_tokens,
    require_attention_mask,
    require_stock_blocks,
    take_tapped_qk,
    tap_query_key,
)
from methods.token_ops import batch_rows, gather_tokens
from methods.tracing import is_traced, report_merge

DEFAULT_R = 13  # ToMe's DeiT setting: 196 patches down to 40 after 12 blocks


def check_r(r: int | tuple[int, ...] | None) -> None:
    values = r if isinstance(r, tuple) else (r,)
    if r is not None and not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise TokenBenchError(f"r must be a non-negative int or a tuple of them (one per location), got {r!r}")


@dataclass(frozen=True)
class ToMeConfig(ReductionConfig):
    """ToMe's DeiT setting: r = 13 tokens merged in every block, proportional attention.

    keep_rate: instead of r, the share of patch tokens left after the last location:
       r = round((1 - keep_rate) * n0 / len(locations)), n0 the input's patch count.
    locations: the blocks that merge; None: every block.
    r: tokens merged at each location, an int or one int per location (capped, as ToMe caps it, at
       half the mergeable tokens); neither r nor keep_rate given: 13.
    prop_attn: add log(size) to the keys' attention logits (proportional attention).
    """

    keep_rate: float | None = None
    locations: tuple[int, ...] | None = None
    r: int | tuple[int, ...] | None = None
    prop_attn: bool = True

    replaces_keep_rate: ClassVar[tuple[str, ...]] = ("r",)

    def __post_init__(self) -> None:
        for name in ("locations", "r"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.keep_rate is not None and self.r is not None:
            raise TokenBenchError(f"give r or keep_rate, not both (got r={self.r!r}, keep_rate={self.keep_rate!r})")
        if self.keep_rate is not None:
            check_keep_rate(self.keep_rate)
        if self.locations is not None:
            check_locations(self.locations)
        check_r(self.r)
        if not isinstance(self.prop_attn, bool):
            raise TokenBenchError(f"prop_attn must be True or False, got {self.prop_attn!r}")

    def check_depth(self, depth: int) -> None:
        if self.locations is not None:
            super().check_depth(depth)
        if isinstance(self.r, tuple) and len(self.r) != len(self.where(depth)):
            raise TokenBenchError(f"r must give one int per location ({len(self.where(depth))}), got {self.r!r}")

    def where(self, depth: int) -> tuple[int, ...]:
        """The merging blocks of a model `depth` blocks deep."""
        return tuple(range(depth)) if self.locations is None else self.locations


def bipartite_soft_matching(
    metric: torch.Tensor, r: int, prefix: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ToMe's matching: tokens alternate between A (even) and B (odd); the r A tokens most similar to
    a B token are merged into it. Prefix tokens in A are never merged, none is merged into one in B.

    metric: [B, N, D] -> the sequence positions of the A tokens kept [B, Na - r] (sorted when there is a
    prefix, as ToMe sorts them) and merged [B, r], and the B index each goes into [B, r]; Na = ceil(N / 2).
    """
    metric = metric / metric.norm(dim=-1, keepdim=True)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)  # [B, Na, Nb]: cosine similarity, A to B
    scores[:, : (prefix + 1) // 2] = -math.inf
    if prefix > 1:  # a prefix token in B too (the distillation token)
        scores[:, :, : prefix // 2] = -math.inf
    best, match = scores.max(dim=-1)  # [B, Na]
    order = best.argsort(dim=-1, descending=True)  # [B, Na]
    into = match.gather(1, order[:, :r])
    positions = 2 * order  # A token i sits at 2i
    kept, merged = positions[:, r:], positions[:, :r]
    if prefix:
        kept = kept.sort(dim=-1).values
    return kept, merged, into


def merge_weighted(
    x: torch.Tensor,
    size: torch.Tensor | None,
    kept: torch.Tensor,
    merged: torch.Tensor,
    into: torch.Tensor,
    prefix: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Average each merged A token into its B token, weighted by size; ToMe's order after: the prefix,
    the kept A tokens, the B tokens. x: [B, N, C], size: [B, N, 1] (None: every token one patch), kept and
    merged: A tokens' sequence positions, into: B indices (as `bipartite_soft_matching` gives them)
    -> [B, N - r, C], [B, N - r, 1]

    One gather writes every token that stays to its place; then each B token that takes merged ones
    moves towards each of them by its share of their total size: b + sum_a s_a (a - b) / S, which is
    ToMe's (s_b b + sum_a s_a a) / S, S = s_b + sum_a s_a. Only the r merged tokens and their B tokens
    are computed on: ToMe's x * size and the division by the sizes are two passes over all the tokens
    (and x * size is what overflows fp16 in ToMe's own code once sizes grow).
    """
    batch, n, channels = x.shape
    in_a, in_b = (prefix + 1) // 2, prefix // 2  # prefix tokens in A (even positions) and in B (odd ones)
    steps = torch.arange(n, device=x.device)  # [N]: the prefix's positions and B's, as views
    prefix_positions, b_positions = steps[:prefix].expand(batch, -1), steps[2 * in_b + 1 :: 2].expand(batch, -1)
    positions = torch.cat([prefix_positions, kept[:, in_a:], b_positions], dim=1)  # [B, N - r]
    targets = into + (prefix + kept.shape[1] - in_a - in_b)  # [B, r] the merged tokens' B rows after
    rows = batch_rows(x)  # one for every gather
    out = gather_tokens(x, positions, rows)  # [B, N - r, C]
    if size is None:  # each token one patch, each merged one more
        out_size = x.new_ones(batch, positions.shape[1], 1)  # [B, N - r, 1]
        out_size.scatter_add_(1, targets.unsqueeze(-1), x.new_ones(batch, merged.shape[1], 1))
        share = gather_tokens(out_size, targets, rows).reciprocal_()  # [B, r, 1]
    else:
        merged_size = gather_tokens(size, merged, rows)  # [B, r, 1]
        out_size = gather_tokens(size, positions, rows).scatter_add_(1, targets.unsqueeze(-1), merged_size)
        share = merged_size.div_(gather_tokens(out_size, targets, rows))  # [B, r, 1]
    moves = gather_tokens(x, merged, rows).sub_(gather_tokens(out, targets, rows)).mul_(share)  # [B, r, C]
    return out.scatter_add_(1, targets.unsqueeze(-1).expand(-1, -1, channels), moves), out_size


def merge_destinations(
    kept: torch.Tensor, merged: torch.Tensor, into: torch.Tensor, n: int, prefix: int
) -> torch.Tensor:
    """For pictures: the index after `merge_weighted` of each of the n tokens before it. -> [B, N]"""
    in_a, in_b = (prefix + 1) // 2, prefix // 2
    batch, n_kept = kept.shape
    slot = torch.arange(n_kept, device=kept.device)  # [Na - r]
    b_slot = torch.arange(n // 2, device=kept.device)  # [Nb]
    kept_to = torch.where(slot < in_a, 2 * slot, prefix + slot - in_a).expand(batch, -1)  # [B, Na - r]
    b_to = torch.where(b_slot < in_b, 2 * b_slot + 1, prefix + n_kept - in_a + b_slot - in_b).expand(batch, -1)
    destination = kept.new_empty(batch, n)  # [B, N]
    destination[:, 1::2] = b_to
    return destination.scatter_(1, kept, kept_to).scatter_(1, merged, b_to.gather(1, into))  # A: kept or merged


@dataclass
class MergeState:
    """What one forward pass carries from block to block; one object, shared by the merging blocks."""

    size: torch.Tensor | None = None  # [B, N, 1] patches per token; None before the first merge
    n0: int = 0  # the input's patch count


class MergingBlock(Block):
    """timm's Block, merging tokens between its attention and its FFN, attending in proportion to size."""

    r: int | None  # tokens to merge here; None: from keep_rate and the input's patch count
    keep_rate: float
    stages: int
    first: bool
    prefix: int
    prop_attn: bool
    state: MergeState

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, **block_kwargs: Any) -> torch.Tensor:
        """`block_kwargs`: what this timm version's Block passes to its attention (is_causal, ...)."""
        if attn_mask is not None:
            raise TokenBenchError("tome merges tokens, so it cannot take an attention mask over the input's tokens")
        if self.first:
            self.state.size, self.state.n0 = None, int(x.shape[1]) - self.prefix
        size = self.state.size
        if self.prop_attn and size is not None:
            block_kwargs["attn_mask"] = size.log().transpose(1, 2).unsqueeze(1)  # [B, 1, 1, N]: added to key logits
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), **block_kwargs)))
        if self.r != 0:
            x = self.merge(x)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, N, C] -> [B, N - r, C], the sizes kept in the shared state."""
        _, k, _ = take_tapped_qk(self)  # [B, H, N, D]
        r = self.r if self.r is not None else round((1 - self.keep_rate) * self.state.n0 / self.stages)
        r = min(r, (x.shape[1] - self.prefix) // 2)  # ToMe's cap: at most half the mergeable tokens
        if r <= 0:
            return x
        kept, merged, into = bipartite_soft_matching(k.mean(dim=1), r, self.prefix)
        if is_traced(self):
            destination = merge_destinations(kept, merged, into, x.shape[1], self.prefix)[:, self.prefix :]
            report_merge(self, destination - self.prefix, x.shape[1] - r - self.prefix)
        x, self.state.size = merge_weighted(x, self.state.size, kept, merged, into, self.prefix)
        return x


@register("tome", config=ToMeConfig)
def apply_tome(model: VisionTransformer, config: ToMeConfig) -> None:
    """Merge the r most similar tokens in every block, size-weighted, with proportional attention (ToMe)."""
    locations = config.where(len(model.blocks))
    if not locations:
        return
    patched = range(locations[0], len(model.blocks))  # every block after a merge attends in proportion to size
    require_stock_blocks(model, patched, "tome")
    if config.prop_attn:
        require_attention_mask("tome")
    rates = config.r if isinstance(config.r, tuple) else (config.r,) * len(locations)
    if config.r is None and config.keep_rate is None:
        rates = (DEFAULT_R,) * len(locations)
    state = MergeState()
    for i in patched:
        block = model.blocks[i]
        block.__class__ = MergingBlock
        block.r = rates[locations.index(i)] if i in locations else 0
        block.keep_rate, block.stages, block.first = config.keep_rate, len(locations), i == locations[0]
        block.prefix, block.prop_attn, block.state = num_prefix_tokens(model), config.prop_attn, state
        if block.r != 0:
            tap_query_key(block)
