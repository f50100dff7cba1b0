"""Evo-ViT (Xu et al., AAAI 2022): slow-fast token evolution, ranked by a global class attention.

Global class attention g: the CLS query's post-softmax attention to the patch tokens, summed over
heads as the released DeiT code does. The block before the first location sets g to its own
attention; every later block up to the last selection blends its attention into the kept tokens'
entries, g = (1 - t) * g + t * a (the held tokens' entries stay as they were).

A stage opens at the start of each location's block: of the n patch tokens (all of them, since a
stage hands every token back), the int(keep_rate * n) with the highest g are kept, highest first,
and go through the blocks (the slow path). A stage closes after the block before the next location;
the last one after the last block. The other tokens are held outside the blocks:

paper     summarised into one representative token (their g, normalised, as weights), appended
          after the kept tokens; at the close every held token gets the representative token's
          whole update (the sum of its attention and FFN residuals over the stage: the fast path,
          the same as adding them block by block since held tokens are never keys), and all
          tokens return to their original places. Head: the model's own (the CLS token).
official  the released DeiT code: frozen, written back after the kept tokens at the close, in the
          order of g (the spatial order is never restored). Head: the mean of the patch tokens,
          then the final norm, then the classifier.

Where the paper leaves room, `paper` follows the released DeiT code (g starts at the block before the
first location; int(keep_rate * n) patches are kept, here beside the representative token) and keeps
the model's own class-token head. The released LeViT code, the only one with a representative token,
blends g from the first layer and keeps one patch fewer; both released codes pool the mean (head="mean").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from methods.config import ReductionConfig
from methods.errors import TokenBenchError
from methods.registry import register
from methods.timm_compat import (
    depth,
    model_image_size,
    num_prefix_tokens,
    patch_size,
    require_class_token,
    require_stock_blocks,
    take_tapped_qk,
    tap_query_key,
)
from methods.token_ops import batch_rows, class_attention_per_head, gather_tokens, weighted_sum_into
from methods.tracing import report_restore, report_selection

VARIANTS = ("paper", "official")
HEADS = (None, "cls", "mean")
DEFAULT_HEAD = {"paper": "cls", "official": "mean"}
HELD_AS = {"paper": "fast path", "official": "frozen"}


@dataclass(frozen=True)
class EvoViTConfig(ReductionConfig):
    """Evo-ViT's DeiT defaults: keep rate 0.5, stages opening at blocks 4 and 8, tradeoff 0.5.

    variant: "paper" (representative token, fast path, spatial order restored) or "official" (the
             released DeiT code: held tokens frozen, mean-pool head).
    head: "cls" (the model's own head), "mean" (mean of the patch tokens, final norm, classifier)
          or None (the variant's: "cls" for paper, "mean" for official).
    tradeoff: t in (0, 1], the weight of each block's new class attention in g.
    """

    keep_rate: float = 0.5
    locations: tuple[int, ...] = (4, 8)
    variant: str = "paper"
    head: str | None = None
    tradeoff: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.variant not in VARIANTS:
            raise TokenBenchError(f"variant must be one of 'paper', 'official', got {self.variant!r}")
        if self.head not in HEADS:
            raise TokenBenchError(f"head must be one of None (the variant's), 'cls', 'mean', got {self.head!r}")
        t = self.tradeoff
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 1:
            raise TokenBenchError(f"tradeoff must be a number in (0, 1], got {t!r}")
        if self.locations and self.locations[0] < 1:
            raise TokenBenchError(
                f"evo-vit ranks tokens by the attention of the block before a location, so locations must be 1 "
                f"or more, got {self.locations!r}"
            )

    @property
    def pooling(self) -> str:
        """The head in effect: `head`, or the variant's default."""
        return self.head or DEFAULT_HEAD[self.variant]


@dataclass
class StageState:
    """What one forward pass carries from one patched block to the next; one object, shared by them."""

    # [B, P + M] g, in the order of the tokens (the prefix, then the kept patches, then the held ones); the
    # prefix's entries are +inf, so that every ranking puts the prefix first and gives sequence positions
    attention: torch.Tensor | None = None
    positions: torch.Tensor | None = None  # [B, P + M] original position of each, None while in original order
    held: torch.Tensor | None = None  # [B, M - K, C] the tokens outside the blocks during a stage
    representative: torch.Tensor | None = None  # [B, 1, C] paper: the representative token as the stage began

    def begin(self, attention: torch.Tensor) -> None:
        self.attention, self.positions, self.held, self.representative = attention, None, None, None


def rank_by_attention(attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """g sorted highest first, and the order that sorts it (a full sort, as released). [B, P + M] -> 2 x [B, P + M]

    The sort is stable, so the prefix's +inf entries keep their order: the prefix first, as it was.
    """
    scores, order = attention.sort(dim=1, descending=True, stable=True)
    return scores, order


def summarise(tokens: torch.Tensor, scores: torch.Tensor, out: torch.Tensor) -> None:
    """The representative token, written into `out`: the tokens weighted by their scores normalised to sum
    to one. tokens: [B, M, C], scores: [B, M], out: [B, 1, C]"""
    weighted_sum_into(tokens, scores / scores.sum(dim=1, keepdim=True), out)


class EvoBlock(Block):
    """timm's Block with Evo-ViT's roles: open a stage, track g, close a stage (any of them)."""

    state: StageState
    variant: str
    keep_rate: float
    tradeoff: float
    prefix: int
    opens: bool
    tracks: bool
    starts: bool  # the block before the first location: g starts from its attention
    closes: bool

    def forward(self, x: torch.Tensor, **block_kwargs: Any) -> torch.Tensor:
        if self.opens:
            x = self.open_stage(x)
        x = super().forward(x, **block_kwargs)
        if self.tracks:
            self.track_attention()
        if self.closes:
            x = self.close_stage(x)
        return x

    def track_attention(self) -> None:
        q_cls, k, scale = take_tapped_qk(self)
        attention = class_attention_per_head(q_cls, k, scale).sum(dim=1)  # [B, N]: head sum, the prefix's too
        p = self.prefix
        if self.starts:
            attention[:, :p] = math.inf
            self.state.begin(attention)
            return
        state = self.state
        n = attention.shape[1] - int(state.representative is not None)  # the representative's column is no patch
        # g = (1 - t) g + t * (head sum) on the kept tokens' entries, in place: the held ones' stay as they are.
        # g is this forward's own tensor (from the sort that opened the stage); under autograd the
        # representative token's weights are a saved view of it, so the blend goes to a copy there.
        g = state.attention.clone() if state.attention.requires_grad else state.attention
        g[:, p:n].lerp_(attention[:, p:n], self.tradeoff)
        state.attention = g

    def open_stage(self, x: torch.Tensor) -> torch.Tensor:
        """Keep the patch tokens with the highest g, highest first; hold the others (paper: and summarise them)."""
        p = self.prefix
        keep = int(self.keep_rate * (x.shape[1] - p))
        if keep >= x.shape[1] - p:
            return x  # nothing to hold: the stage is the stock blocks
        state = self.state
        scores, order = rank_by_attention(state.attention)  # [B, P + M] each: sequence positions, the prefix's first
        appended = int(self.variant == "paper")  # the representative token, in the row of the best held one
        rows = batch_rows(x)
        out = gather_tokens(x, order[:, : p + keep + appended], rows)  # [B, P + keep (+ 1), C]
        state.held = gather_tokens(x, order[:, p + keep :], rows)  # [B, M - keep, C]
        state.positions = order if state.positions is None else state.positions.gather(1, order)
        state.attention = scores
        if appended:
            summarise(state.held, scores[:, p + keep :], out=out[:, -1:])
            state.representative = out[:, -1:]  # no block writes into its input: as the stage began
        # The tracer is told of a restore at every close, so it takes original positions here.
        report_selection(self, state.positions[:, p : p + keep], HELD_AS[self.variant], appended, offset=p)
        return out

    def close_stage(self, x: torch.Tensor) -> torch.Tensor:
        """Hand the held tokens back: fast path and original order (paper), or as they were, after the kept ones."""
        state = self.state
        if state.held is None:
            return x
        if self.variant == "paper":
            x = self.restore(x)
        else:
            x = torch.cat([x, state.held], dim=1)  # write-back, in the order of g, as released
        state.held = None
        report_restore(self)
        return x

    def restore(self, x: torch.Tensor) -> torch.Tensor:
        """Fast path for the held tokens, then every token written once, straight to its original place."""
        state = self.state
        slow = x.shape[1] - 1  # x: prefix, kept tokens, representative
        held = state.held + (x[:, -1:] - state.representative)  # [B, M - K, C]
        rows = batch_rows(x)
        out = x.new_empty(x.shape[0], state.positions.shape[1], x.shape[2])  # [B, P + M, C]
        out[rows, state.positions[:, :slow]] = x[:, :-1]
        out[rows, state.positions[:, slow:]] = held
        attention = state.attention.new_empty(state.attention.shape)  # [B, P + M]
        attention[rows, state.positions] = state.attention
        state.attention, state.positions, state.representative = attention, None, None
        return out


class DeferredLayerNorm(nn.LayerNorm):
    """The final norm moved from the tokens to the pooled feature: timm's forward_features passes the
    tokens through it unchanged, and the head normalises the mean. Its weights keep their names."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class MeanPoolHead(VisionTransformer):
    """VisionTransformer with the released Evo-ViT head: mean of the patch tokens, final norm, classifier.

    LayerNorm does not commute with the mean, so the final norm is deferred to the pooled feature.
    `fc_norm(norm(.))` fits both timm layouts: stock DeiT (norm, no fc_norm) and global_pool="avg"
    models (fc_norm, an Identity norm), where Evo-ViT's weights map.
    """

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, self.num_prefix_tokens :].mean(dim=1)  # [B, C]
        if isinstance(self.norm, DeferredLayerNorm):
            x = self.norm.normalise(x)
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)


def use_mean_pool_head(model: VisionTransformer) -> None:
    if isinstance(model.norm, nn.LayerNorm):
        model.norm.__class__ = DeferredLayerNorm
    model.__class__ = MeanPoolHead


def check_patchable(model: VisionTransformer, config: EvoViTConfig, blocks: list[int]) -> None:
    require_class_token(model, "evo-vit")
    require_stock_blocks(model, blocks, "evo-vit")
    (height, width), (ph, pw) = model_image_size(model), patch_size(model)
    patches = (height // ph) * (width // pw)
    if config.locations and int(config.keep_rate * patches) < 1:
        raise TokenBenchError(f"keep_rate {config.keep_rate} keeps none of the model's {patches} patch tokens")
    if config.pooling == "mean" and type(model) is not VisionTransformer:
        raise TokenBenchError(
            f"head 'mean' replaces the head of a plain VisionTransformer, not of {type(model).__name__}; use head='cls'"
        )
    if config.pooling == "mean" and not isinstance(model.norm, (nn.LayerNorm, nn.Identity)):
        raise TokenBenchError(
            f"head 'mean' moves a LayerNorm (or no norm) after the pooling, not {type(model.norm).__name__}; "
            f"use head='cls'"
        )


def stage_roles(locations: tuple[int, ...], depth: int) -> dict[str, set[int]]:
    """The blocks that open a stage, track g (the first of them starts it) and close a stage."""
    if not locations:
        return {"opens": set(), "tracks": set(), "starts": set(), "closes": set()}
    return {
        "opens": set(locations),
        "tracks": set(range(locations[0] - 1, locations[-1])),
        "starts": {locations[0] - 1},
        "closes": {i - 1 for i in locations[1:]} | {depth - 1},
    }


@register("evo-vit", config=EvoViTConfig)
def apply_evovit(model: VisionTransformer, config: EvoViTConfig) -> None:
    """Keep the top patch tokens by global class attention; the rest take a fast path (Evo-ViT)."""
    roles = stage_roles(config.locations, depth(model))
    blocks = sorted(set().union(*roles.values()))
    check_patchable(model, config, blocks)
    state = StageState()
    for i in blocks:
        block = model.blocks[i]
        block.__class__ = EvoBlock
        block.state, block.variant, block.prefix = state, config.variant, num_prefix_tokens(model)
        block.keep_rate, block.tradeoff = config.keep_rate, config.tradeoff
        for role, indices in roles.items():
            setattr(block, role, i in indices)
        if block.tracks:
            tap_query_key(block)
    if config.pooling == "mean":
        use_mean_pool_head(model)
