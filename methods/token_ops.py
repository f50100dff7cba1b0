"""Pure tensor functions for token reduction. Shapes: B batch, H heads, N tokens, C channels.

The patch tokens of a sequence are the ones after the `prefix` (class, distillation, register
tokens), which are never reduced. A reduction writes its output once: one gather takes the prefix
and the kept tokens (and a placeholder row for a token the method makes, filled in afterwards), so
no token is copied twice and no slice of the input is concatenated.
"""

from __future__ import annotations

import math

import torch


def keep_count(keep_rate: float, n: int) -> int:
    """How many of `n` tokens EViT keeps: ceil(keep_rate * n), as the official code computes it."""
    return math.ceil(keep_rate * n)


def class_logits(q_cls: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """The scaled CLS query's dot product with every key, per head. q_cls: [B, H, 1, D], k: [B, H, N, D] -> [B, H, N]

    timm's fused qkv leaves k a view whose heads sit side by side in each token's row, so (B, H) do not
    fold into one batch dimension and a batched matmul would first copy k whole. Each token's row of
    keys is contiguous, though: multiplying it by the block-diagonal matrix of the H queries ([H, H*D],
    head h's query in columns h*D..(h+1)*D) gives all H logits in one batched matmul that reads k in
    place, at H times the multiply-adds of a small product (zeros add exactly). The matrix is zeros with
    the scaled queries added onto its diagonal blocks: two launches, and 0 + scale * q is q * scale.
    """
    batch, heads, _, dim = q_cls.shape
    if k.stride(0) == heads * k.stride(1):  # (B, H) fold (qk-norm's own k): one batched matmul as it is
        return (q_cls * scale @ k.transpose(-2, -1))[:, :, 0]
    keys = k.transpose(1, 2).flatten(2)  # [B, N, H*D], a view of timm's qkv
    queries = q_cls.new_zeros(batch, heads, heads * dim)  # [B, H, H*D]
    diagonal = queries.view(batch, heads, heads, dim).diagonal(dim1=1, dim2=2)  # [B, D, H]: head h's block, row h
    diagonal.add_(q_cls[:, :, 0].transpose(1, 2), alpha=scale)
    return queries @ keys.transpose(1, 2)


def class_attention_per_head(q_cls: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Post-softmax attention from the CLS query to every key (the prefix's too), per head.

    Only the CLS row is computed (H x N dot products), never the N x N matrix; the softmax runs
    over all keys, so the weights are those of the full attention. It runs in fp32 at least, as
    autocast runs a softmax: with half-precision weights, attention below 6e-8 would flush to zero, and a
    score that sums such weights (Evo-ViT's normalised by their sum) would become 0 / 0.
    q_cls: [B, H, 1, D], k: [B, H, N, D] -> [B, H, N], in fp32 (or float64 for float64 keys)
    """
    logits = class_logits(q_cls, k, scale)
    return logits.softmax(dim=-1, dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32)


def class_attention(q_cls: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """`class_attention_per_head` averaged over heads (EViT's score). -> [B, N]"""
    return class_attention_per_head(q_cls, k, scale).mean(dim=1)


def batch_rows(x: torch.Tensor) -> torch.Tensor:
    """Each sequence's batch index, [B, 1], to index x by (batch, token); one per step can serve every
    gather of it (an arange is a launch of its own)."""
    return torch.arange(x.shape[0], device=x.device).unsqueeze(1)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The tokens at `idx` in each sequence. x: [B, M, C], idx: [B, k] -> [B, k, C]; rows: `batch_rows(x)`.

    Indexing (batch, token) copies whole token rows; `torch.gather` with an index expanded over C
    looks up every element and runs two to three times slower on CPU.
    """
    return x[batch_rows(x) if rows is None else rows, idx]


def top_k_positions(scores: torch.Tensor, k: int, prefix: int) -> torch.Tensor:
    """Sequence positions of the prefix tokens, in order, then of the k highest-scoring patch tokens,
    highest first. scores: [B, N], one per token of the sequence -> [B, prefix + k]

    The prefix's scores are overwritten with +inf, so one top-k over the whole sequence puts the prefix
    first and gives positions, not patch indices: no index arithmetic or concatenation to prepend the
    prefix's own positions. Among the patches it ranks as a top-k over them alone, up to the order of
    equal scores (which no top-k specifies). The scores must be free of NaN, which top-k ranks above +inf;
    a NaN score comes only from NaN queries, keys or tokens, which make the whole forward NaN anyway.
    """
    scores[:, :prefix] = math.inf
    positions = torch.topk(scores, prefix + k, dim=1, largest=True, sorted=True).indices
    if prefix > 1:  # +inf ties: the prefix tokens come first, in any order among themselves
        positions[:, :prefix] = torch.arange(prefix, device=positions.device)
    return positions


def weighted_sum_into(x: torch.Tensor, weights: torch.Tensor, out: torch.Tensor) -> None:
    """sum_m weights[:, m] * x[:, m], written into `out`. x: [B, M, C], weights: [B, M], out: [B, 1, C]

    The mat-vec writes straight into `out` (a token's row of an output), so no [B, 1, C] result is copied
    there; an in-place product is not autocast, so it reads x once, in x's dtype (autocast would copy all
    of x to half precision for the one token), and gives what fp32 gives without autocast.
    """
    out.baddbmm_(weights.unsqueeze(1).to(x.dtype), x, beta=0)


def fuse_dropped(x: torch.Tensor, scores: torch.Tensor, kept: torch.Tensor, out: torch.Tensor) -> None:
    """EViT's fused token, written into `out`: the sum of the tokens not in `kept`, weighted by their raw scores.

    The kept tokens' weights are zeroed in `scores` itself (it is overwritten) rather than the dropped
    tokens gathered: one scatter and a batched mat-vec (`weighted_sum_into`) instead of a sort for the
    complement. x: [B, N, C], scores: [B, N], kept: [B, k] (every prefix position among them), out: [B, 1, C]
    """
    weighted_sum_into(x, scores.scatter_(1, kept, 0.0), out)
