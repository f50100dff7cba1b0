"""Pure tensor functions for token reduction. Shapes: B batch, H heads, N tokens, C channels.

The patch tokens of a sequence are the ones after the `prefix` (class, distillation, register
tokens), which are never reduced.
"""

from __future__ import annotations

import math

import torch


def keep_count(keep_rate: float, n: int) -> int:
    """How many of `n` tokens EViT keeps: ceil(keep_rate * n), as the official code computes it."""
    return math.ceil(keep_rate * n)


def class_attention(q_cls: torch.Tensor, k: torch.Tensor, scale: float, prefix: int) -> torch.Tensor:
    """Post-softmax attention from the CLS query to each non-prefix key, averaged over heads.

    Only the CLS row is computed (H x N dot products), never the N x N matrix; the softmax runs
    over all keys, so the weights are those of the full attention, not renormalised.
    q_cls: [B, H, 1, D], k: [B, H, N, D] -> [B, N - prefix]
    """
    logits = (q_cls * scale) @ k.transpose(-2, -1)  # [B, H, 1, N]
    attn = logits.softmax(dim=-1)[:, :, 0, prefix:]  # [B, H, N - prefix]
    return attn.mean(dim=1)


def top_k_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, highest first. scores: [B, M] -> [B, k]"""
    return torch.topk(scores, k, dim=1, largest=True, sorted=True).indices


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x: [B, M, C], idx: [B, k] -> [B, k, C]"""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def fuse_dropped(x: torch.Tensor, scores: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """EViT's fused token: sum of the dropped tokens weighted by their (raw) scores.

    The kept tokens' weights are zeroed rather than the dropped ones gathered: one scatter and a
    batched mat-vec instead of a sort for the complement.
    x: [B, M, C], scores: [B, M], kept: [B, k] -> [B, 1, C]
    """
    weights = scores.scatter(1, kept, 0.0)  # [B, M]
    return weights.unsqueeze(1).to(x.dtype) @ x  # [B, 1, C]


def split_prefix(x: torch.Tensor, prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [B, N, C] -> ([B, prefix, C], [B, N - prefix, C])"""
    return x[:, :prefix], x[:, prefix:]
