"""Which original patches a method keeps at each reduction stage, for pictures and tests.

A block that reduces tokens calls `report_selection` with the indices it keeps among the current
patch tokens; the tracer maps them back to original patch positions through every earlier
reordering. A block that merges tokens (ToMe) calls `report_merge` with where each token went; the
tracer follows every original patch into the token it is part of. Outside `trace_selections` the
reports cost one attribute lookup.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from methods.timm_compat import patch_size, require_vit

TRACER_ATTR = "selection_tracer"


@dataclass(frozen=True)
class Stage:
    """One reduction: at `block`, the original patch indices `kept` ([B, k], in sequence order; -1 for a
    token an earlier stage made) go on as themselves; the other patches are `others` ("dropped",
    "fused", "fast path", "frozen" or "merged"); the method appends `appended` tokens of its own after
    them (EViT's fused token, Evo-ViT's representative token). A merging stage also gives `groups`
    ([B, n0]): for each original patch, the index among the patch tokens after the stage of the token
    it is part of; there `kept` has one entry per token, -1 for a token of two or more patches."""

    block: int
    kept: torch.Tensor
    others: str
    appended: int = 0
    groups: torch.Tensor | None = None


class SelectionTracer:
    def __init__(self, model: nn.Module, batch: int, patches: int, device: torch.device) -> None:
        self.block_index = {id(block): i for i, block in enumerate(model.blocks)}
        self.patches = patches
        self.stages: list[Stage] = []
        self.positions = self.original_order(batch, device)  # [B, M]; -1 marks tokens made by the method
        self.groups = self.original_order(batch, device)  # [B, n0]: the token each patch is part of (merges)

    def original_order(self, batch: int, device: torch.device) -> torch.Tensor:
        return torch.arange(self.patches, device=device).expand(batch, -1)

    def select(self, block: nn.Module, kept: torch.Tensor, others: str, appended: int) -> None:
        kept_positions = self.positions.gather(1, kept)  # [B, k]
        index = self.block_index[id(block)]
        self.stages.append(Stage(block=index, kept=kept_positions.cpu(), others=others, appended=appended))
        made = kept_positions.new_full((kept.shape[0], appended), -1)
        self.positions = torch.cat([kept_positions, made], dim=1)

    def merge(self, block: nn.Module, destination: torch.Tensor, tokens: int) -> None:
        """destination: [B, M], the index among the `tokens` patch tokens after the merge of each one before."""
        self.groups = destination.gather(1, self.groups)  # [B, n0]
        batch, patches = self.groups.shape
        sizes = torch.zeros(batch, tokens, dtype=torch.long, device=self.groups.device)
        sizes.scatter_add_(1, self.groups, torch.ones_like(self.groups))  # [B, tokens]: patches in each token
        patch = self.original_order(batch, self.groups.device)  # [B, n0]
        first = torch.full_like(sizes, patches).scatter_reduce(1, self.groups, patch, reduce="amin")  # [B, tokens]
        self.positions = torch.where(sizes == 1, first, -1)  # [B, tokens]: a patch if it is alone, else -1
        index = self.block_index[id(block)]
        self.stages.append(Stage(index, self.positions.cpu(), others="merged", groups=self.groups.cpu()))

    def restore(self) -> None:
        self.positions = self.original_order(*self.positions.shape[:1], self.positions.device)


def report_selection(block: nn.Module, kept: torch.Tensor, others: str, appended: int = 0, offset: int = 0) -> None:
    """`block` keeps patch tokens `kept` ([B, k] indices among the current patch tokens, prefix
    excluded, or sequence positions with `offset` the prefix's length), in that order, then appends
    `appended` tokens of its own (EViT's fused token)."""
    tracer = getattr(block, TRACER_ATTR, None)
    if tracer is not None:
        tracer.select(block, kept - offset, others, appended)


def is_traced(block: nn.Module) -> bool:
    """Whether `block` runs under `trace_selections`: a method computes what it reports only then."""
    return getattr(block, TRACER_ATTR, None) is not None


def report_merge(block: nn.Module, destination: torch.Tensor, tokens: int) -> None:
    """`block` merged the current patch tokens into `tokens` ones; destination: [B, M], the index among
    them of the token each current patch token went into (prefix excluded)."""
    tracer = getattr(block, TRACER_ATTR, None)
    if tracer is not None:
        tracer.merge(block, destination, tokens)


def report_restore(block: nn.Module) -> None:
    """`block` has handed every patch token back (end of an Evo-ViT stage): the tracer's view returns
    to the original patch order, and later reports index the patches in that order. A method that
    hands them back permuted (Evo-ViT's released code) tracks its permutation and reports original
    indices."""
    tracer = getattr(block, TRACER_ATTR, None)
    if tracer is not None:
        tracer.restore()


@contextmanager
def trace_selections(model: nn.Module, images: torch.Tensor) -> Iterator[list[Stage]]:
    """Within the block, forward passes of `model` on `images` record their stages in the yielded list."""
    vit = require_vit(model)
    rows, cols = (size // patch for size, patch in zip(images.shape[-2:], patch_size(vit)))
    tracer = SelectionTracer(vit, images.shape[0], rows * cols, images.device)
    for block in vit.blocks:
        setattr(block, TRACER_ATTR, tracer)
    try:
        yield tracer.stages
    finally:
        for block in vit.blocks:
            delattr(block, TRACER_ATTR)


def kept_patches(model: nn.Module, images: torch.Tensor) -> list[Stage]:
    """Run `model` on `images` and return each reduction stage's kept original patch indices."""
    vit = require_vit(model)
    was_training = vit.training
    vit.eval()
    try:
        with trace_selections(vit, images) as stages, torch.inference_mode():
            vit(images)
    finally:
        vit.train(was_training)
    return stages
