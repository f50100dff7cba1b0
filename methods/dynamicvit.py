"""DynamicViT (Rao et al., NeurIPS 2021): a learned predictor scores the patch tokens, the lowest are dropped.

As the official inference code runs: before each location block, that stage's score predictor
(the official `PredictorLG`) gives every current patch token log-probabilities [keep, drop] from its
own features and the mean features of all current patch tokens; the int(n0 * keep_rate ** (s + 1))
tokens with the highest keep score go on, highest first, and the others are dropped. n0 is the
number of patch tokens of the input (196 at 224x224), so the keep ratios r, r^2, r^3 are relative
to the input, not to the previous stage. The predictors live in `model.score_predictor`, under the
official checkpoints' keys; until a DynamicViT checkpoint is loaded they are random.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from methods.config import ReductionConfig
from methods.errors import UntrainedWeightsWarning
from methods.registry import register
from methods.timm_compat import num_prefix_tokens, require_stock_blocks
from methods.token_ops import gather_tokens, top_k_positions
from methods.tracing import report_selection

PREDICTORS_ATTR = "score_predictor"
TRAINING_WARNING = (
    "dynamicvit in training mode still keeps the top-k tokens, as at inference: DynamicViT's training "
    "(Gumbel-softmax keep masks over all tokens, through which the loss trains the predictors) is not "
    "implemented, so the predictors get gradients only from a loss on their own scores"
)
INIT_SEED = 0


@dataclass(frozen=True)
class DynamicViTConfig(ReductionConfig):
    """DynamicViT's DeiT defaults: keep rate 0.7, pruning before blocks 3, 6 and 9."""


def keep_count(keep_rate: float, stage: int, n0: int) -> int:
    """Patch tokens kept at `stage` (0-based) of an input with `n0` patches: int(n0 * keep_rate ** (stage + 1)).

    The official floor of a cumulative ratio; at least one token, where the official code would go on
    with none and produce NaNs.
    """
    return max(1, int(n0 * keep_rate ** (stage + 1)))


class ScorePredictor(nn.Module):
    """The official PredictorLG: per-token log-probabilities [keep, drop] of the current patch tokens
    (and of the prefix tokens, which rank nothing: see `forward`).

    The first half of the hidden channels is the token's own (local), the second half is averaged over
    all current patch tokens (global); at inference the official mask over the mean is all ones.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())  # eps 1e-5, as official
        self.out_conv = nn.Sequential(
            nn.Linear(dim, dim // 2),
            nn.GELU(),
            nn.Linear(dim // 2, dim // 4),
            nn.GELU(),
            nn.Linear(dim // 4, 2),
            nn.LogSoftmax(dim=-1),
        )

    def forward(self, x: torch.Tensor, prefix: int = 0) -> torch.Tensor:
        """Scores of every row of x: x: [B, N, C] -> [B, N, 2]; channel 0 is log P(keep). The global half is
        the mean over the tokens after the first `prefix`, the current patch tokens; the prefix's own rows
        get scores too, which rank nothing (the pruning block puts the prefix first whatever they are).

        Every layer runs on every row, the prefix's too: on the patch tokens alone the norm and the first
        linear layer would first copy them (a norm needs contiguous rows, a linear layer rows it can fold
        over the batch), a pass over all tokens that costs more than the prefix rows' work, and the
        scores' rows are the sequence's positions, which the top-k then returns as they are.
        """
        norm, linear, gelu = self.in_conv
        h = gelu(linear(norm(x)))  # [B, N, C]
        half = h.shape[-1] // 2
        # [local, global]: the global half becomes the mean over the patch tokens, written over in place
        # rather than concatenated, so only the global half is written again.
        h[..., half:] = h[:, prefix:, half:].mean(dim=1, keepdim=True)
        return self.out_conv(h)


class ScorePredictors(nn.ModuleList):
    """One ScorePredictor per stage; `trained` stays False until a DynamicViT checkpoint is loaded."""

    trained: bool = False


def init_predictor(predictor: ScorePredictor, generator: torch.Generator) -> None:
    """The official init: Linear weights trunc-normal (std .02), biases 0; LayerNorm 1/0 (its default)."""
    for module in predictor.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02, generator=generator)
            nn.init.zeros_(module.bias)


class PatchCount:
    """The patch count n0 of the input now running, set by the first pruning block of each forward."""

    n0: int = 0


class PruningBlock(Block):
    """timm's Block, first dropping the patch tokens its stage's predictor ranks lowest."""

    stage: int
    keep_rate: float
    prefix: int
    predictor: ScorePredictor  # a plain reference: the module is registered in model.score_predictor
    patch_count: PatchCount

    def forward(self, x: torch.Tensor, **block_kwargs: Any) -> torch.Tensor:
        return super().forward(self.prune(x), **block_kwargs)

    def prune(self, x: torch.Tensor) -> torch.Tensor:
        if self.stage == 0:
            self.patch_count.n0 = x.shape[1] - self.prefix
            if self.training and torch.is_grad_enabled() and not torch.compiler.is_compiling():
                warnings.warn(TRAINING_WARNING, stacklevel=1)  # shown once, as Python shows a warning
        n_keep = keep_count(self.keep_rate, self.stage, self.patch_count.n0)
        keep_score = self.predictor(x, self.prefix)[..., 0]  # [B, N], a view of the log-softmax's output
        # The top-k overwrites the prefix's scores with +inf: in the predictor's own output (what a hook on it
        # sees) under no_grad and inference; on a copy under autograd, whose log-softmax backward reads them.
        if keep_score.requires_grad:
            keep_score = keep_score.clone()
        kept = top_k_positions(keep_score, n_keep, self.prefix)  # [B, P + n_keep], the prefix first
        report_selection(self, kept[:, self.prefix :], others="dropped", offset=self.prefix)
        return gather_tokens(x, kept)  # [B, P + n_keep, C]


def predictors_trained(model: nn.Module) -> bool:
    """False while a `dynamicvit` model still has its random predictors (True for any other model)."""
    predictors = getattr(model, PREDICTORS_ATTR, None)
    return not isinstance(predictors, ScorePredictors) or predictors.trained


def mark_predictors_trained(model: nn.Module) -> None:
    """Record that the model's predictors hold trained weights (called by `load_checkpoint`)."""
    getattr(model, PREDICTORS_ATTR).trained = True


def make_predictors(model: VisionTransformer, stages: int) -> ScorePredictors:
    """Officially initialised predictors, the same for every call (seeded), on the model's device and dtype."""
    param = next(model.parameters())
    generator = torch.Generator().manual_seed(INIT_SEED)
    predictors = ScorePredictors(ScorePredictor(model.embed_dim) for _ in range(stages))
    for predictor in predictors:
        init_predictor(predictor, generator)
    return predictors.to(device=param.device, dtype=param.dtype).train(model.training)


@register("dynamicvit", config=DynamicViTConfig)
def apply_dynamicvit(model: VisionTransformer, config: DynamicViTConfig) -> None:
    """Drop the patch tokens a learned predictor scores lowest, int(n0 * r^(s+1)) kept (DynamicViT)."""
    require_stock_blocks(model, config.locations, "dynamicvit")
    predictors = make_predictors(model, len(config.locations))
    setattr(model, PREDICTORS_ATTR, predictors)
    patch_count = PatchCount()
    for stage, (i, predictor) in enumerate(zip(config.locations, predictors)):
        block = model.blocks[i]
        block.__class__ = PruningBlock
        block.stage = stage
        block.keep_rate = config.keep_rate
        block.prefix = num_prefix_tokens(model)
        object.__setattr__(block, "predictor", predictor)  # not a submodule: its keys stay score_predictor.*
        block.patch_count = patch_count
    warnings.warn(
        "dynamicvit: the score predictors are untrained (random init), so the tokens kept are arbitrary and "
        "accuracy is meaningless until a DynamicViT checkpoint is loaded with methods.load_checkpoint",
        UntrainedWeightsWarning,
        stacklevel=3,
    )
