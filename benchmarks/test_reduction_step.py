"""Each method's token-reduction step, and its parts, against the transformer block it sits in.

Everything runs on the same tokens: those of a DeiT-S at 224 at block 3, EViT's first location
(1 class token and 196 patches, of which 138 are kept at keep rate 0.7). The reference is a stock
timm Block's forward on those tokens: a step that costs a few percent of it is cheap, one that
rivals it eats the saving of the tokens it removes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from timm.models.vision_transformer import Block

import methods
from benchmarks.conftest import IMG_SIZE, MODEL
from harness.measure.launches import launches
from harness.measure.models import create_model
from methods.timm_compat import take_tapped_qk, tap_query_key
from methods.token_ops import class_attention, fuse_dropped, gather_tokens, keep_count, top_k_positions

LOCATION = 3
KEEP_RATE = 0.7
PREFIX = 1  # DeiT's class token


@dataclass(frozen=True)
class BlockInputs:
    block: Block  # the stock block at LOCATION
    x: torch.Tensor  # [B, N, C] tokens entering it
    attended: torch.Tensor  # [B, N, C] after its attention residual: what a selection step receives
    q_cls: torch.Tensor  # [B, H, 1, D] the class token's query
    k: torch.Tensor  # [B, H, N, D] the keys
    scale: float
    scores: torch.Tensor  # [B, N] class attention to each token (the prefix's set to +inf by the top-k)
    kept: torch.Tensor  # [B, 1 + k] sequence positions of the class token and the patches kept


@pytest.fixture(scope="module")
def inputs(images: torch.Tensor, device: str) -> BlockInputs:
    model = create_model(MODEL, IMG_SIZE).to(device).eval()
    block = model.blocks[LOCATION]
    captured = {}
    hook = block.register_forward_pre_hook(lambda _module, args: captured.setdefault("x", args[0]))
    tapped = copy.deepcopy(block)
    tap_query_key(tapped)  # keeps the q/k that timm's own attention computes
    with torch.inference_mode():
        model(images)
        x = captured["x"]
        attended = x + tapped.attn(tapped.norm1(x))  # DeiT: no LayerScale, no drop-path in eval
        q_cls, k, scale = take_tapped_qk(tapped)
        scores = class_attention(q_cls, k, scale)
        kept = top_k_positions(scores, keep_count(KEEP_RATE, scores.shape[1] - PREFIX), PREFIX)
    hook.remove()
    return BlockInputs(block, x, attended, q_cls, k, scale, scores, kept)


def fusion(inputs: BlockInputs) -> torch.Tensor:
    """The fused token, on a copy of the scores (the fusion overwrites them), into a token of its own."""
    fused = inputs.attended.new_empty(inputs.attended.shape[0], 1, inputs.attended.shape[2])
    fuse_dropped(inputs.attended, inputs.scores.clone(), inputs.kept, out=fused)
    return fused


PARTS: dict[str, Callable[[BlockInputs], torch.Tensor]] = {
    "block: stock timm Block forward": lambda i: i.block(i.x),
    "part: scoring (class_attention)": lambda i: class_attention(i.q_cls, i.k, i.scale),
    "part: top-k": lambda i: top_k_positions(i.scores, i.kept.shape[1] - PREFIX, PREFIX),
    "part: gather": lambda i: gather_tokens(i.attended, i.kept),
    "part: fusion": fusion,
}


@dataclass(frozen=True)
class Step:
    run: Callable[[], torch.Tensor]  # the method's step, returning the tokens it hands on
    source: torch.Tensor  # [B, N, C] the tokens it reduces


def selecting_step(name: str, inputs: BlockInputs, device: str) -> Step:
    """EViT's and prune's step as their patched block runs it: `select_tokens`, between attention
    and FFN, given the q/k that the block's attention would have left for it."""
    model = methods.apply(create_model(MODEL, IMG_SIZE), name, keep_rate=KEEP_RATE, locations=(LOCATION,))
    block = model.to(device).eval().blocks[LOCATION]

    def step() -> torch.Tensor:
        block.tapped_qk.update(q_cls=inputs.q_cls, k=inputs.k)
        return block.select_tokens(inputs.attended)

    return Step(step, inputs.attended)


def pruning_step(name: str, inputs: BlockInputs, device: str) -> Step:
    """DynamicViT's step as its patched block runs it: the predictor, top-k and gather, before the block."""
    model = methods.apply(create_model(MODEL, IMG_SIZE), name, keep_rate=KEEP_RATE, locations=(LOCATION,))
    block = model.to(device).eval().blocks[LOCATION]
    return Step(lambda: block.prune(inputs.x), inputs.x)


def evolving_step(name: str, inputs: BlockInputs, device: str) -> Step:
    """Evo-ViT's step as its blocks run it: open a stage before the block (full sort of g, gather,
    the representative token) and close it after the last one (fast path, original order restored).
    It returns the tokens the stage's blocks see."""
    model = methods.apply(create_model(MODEL, IMG_SIZE), name, keep_rate=KEEP_RATE, locations=(LOCATION,))
    blocks = model.to(device).eval().blocks
    opening, closing = blocks[LOCATION], blocks[-1]

    def step() -> torch.Tensor:
        opening.state.begin(inputs.scores)  # g as the block before leaves it (the head sum ranks alike; prefix +inf)
        opened = opening.open_stage(inputs.x)
        closing.close_stage(opened)
        return opened

    return Step(step, inputs.x)


def merging_step(name: str, inputs: BlockInputs, device: str) -> Step:
    """ToMe's step as its block runs it, at ToMe's DeiT setting r = 13: bipartite matching on the keys'
    head mean, then the size-weighted merge, between attention and FFN. The tokens carry sizes, as in
    every merge but a forward's first (all one here: the values do not change the work)."""
    model = methods.apply(create_model(MODEL, IMG_SIZE), name, r=13, locations=(LOCATION,))
    block = model.to(device).eval().blocks[LOCATION]
    size = inputs.attended.new_ones(*inputs.attended.shape[:2], 1)  # [B, N, 1]

    def step() -> torch.Tensor:
        block.state.size = size
        block.tapped_qk.update(q_cls=inputs.q_cls, k=inputs.k)
        return block.merge(inputs.attended)

    return Step(step, inputs.attended)


# How to run each method's reduction step in isolation; a method missing here is skipped, by name.
STEPS: dict[str, Callable[[str, BlockInputs, str], Step]] = {
    "evit": selecting_step,
    "prune": selecting_step,
    "dynamicvit": pruning_step,
    "evo-vit": evolving_step,
    "tome": merging_step,
}


def group(batch_size: int, device: str) -> str:
    return f"reduction step at block {LOCATION}: {MODEL} at {IMG_SIZE}, batch {batch_size}, {device}"


@pytest.mark.parametrize("part", PARTS)
def test_block_and_parts(benchmark, part, inputs, batch_size, device, measured):
    run = measured(lambda: PARTS[part](inputs))
    benchmark.group = group(batch_size, device)
    benchmark.extra_info.update(launches=launches(run, device))
    benchmark(run)


def method_step(name: str, inputs: BlockInputs, device: str) -> Step:
    if methods.lookup(name).make_config().locations == ():  # None: every block (ToMe)
        pytest.skip(f"{name} reduces no tokens")
    if name not in STEPS:
        pytest.skip(f"no reduction-step benchmark for {name} yet: add it to STEPS in {__name__}")
    return STEPS[name](name, inputs, device)


@pytest.mark.parametrize("name", methods.list_methods())
def test_method_step(benchmark, name, inputs, batch_size, device, measured):
    step = method_step(name, inputs, device)
    tokens_out = measured(step.run)().shape[1]
    benchmark.group = group(batch_size, device)
    run = measured(step.run)
    benchmark.extra_info.update(
        method=name, tokens_in=step.source.shape[1], tokens_out=tokens_out, launches=launches(run, device)
    )
    benchmark(run)


@pytest.mark.parametrize("name", methods.list_methods())
def test_floor_step(benchmark, name, inputs, batch_size, device, measured):
    """The floor of `name`'s step: the same tokens in, as many out, by one slice (`x[:, :n].contiguous()`,
    what the floor model does between its blocks). The method's step over this is what its selection costs."""
    step = method_step(name, inputs, device)
    tokens_out = measured(step.run)().shape[1]
    benchmark.group = group(batch_size, device)
    run = measured(lambda: step.source[:, :tokens_out].contiguous())
    benchmark.extra_info.update(
        method=f"floor of {name}", tokens_in=step.source.shape[1], tokens_out=tokens_out, launches=launches(run, device)
    )
    benchmark(run)
