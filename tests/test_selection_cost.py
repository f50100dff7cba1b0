"""What each method's own selection costs in dispatched ops, and that every method compiles whole.

torch.profiler (CPU) records the aten ops a selection step dispatches; views and allocations do no
work and are not counted. Each bound below is the design's own count, so a step that regresses to
more launches (a second copy of the tokens, a concatenation, a cast) fails. torch._dynamo traces each
method's forward as one graph (fullgraph): no host sync, no data-dependent shape in a selection.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch._dynamo
from torch.profiler import ProfilerActivity, profile

import methods
from harness.measure.launches import dispatched_ops
from harness.measure.modes import capture_graph
from tests.conftest import tiny_vit

pytestmark = pytest.mark.filterwarnings("ignore:dynamicvit. the score predictors are untrained:UserWarning")

LOCATIONS = (1, 2)
VARIANTS = {
    "evit": ("evit", {}),
    "prune": ("prune", {}),
    "dynamicvit": ("dynamicvit", {}),
    "evo-vit-paper": ("evo-vit", {"variant": "paper"}),
    "evo-vit-official": ("evo-vit", {"variant": "official"}),
    "tome": ("tome", {}),
}


def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))


def tokens_entering(model, index: int) -> torch.Tensor:
    """The tokens entering block `index` of `model` on `images()`: [B, N, C]"""
    seen = {}
    hook = model.blocks[index].register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0]))
    model(images())
    hook.remove()
    return seen["x"]


def selection_ops(name: str) -> Counter:
    """EViT's or prune's step at the first location, between the block's attention and its FFN."""
    model = methods.apply(tiny_vit(), name, keep_rate=0.5, locations=LOCATIONS)
    block = model.blocks[LOCATIONS[0]]
    x = tokens_entering(model, LOCATIONS[0])
    attended = x + block.attn(block.norm1(x))  # also leaves the CLS query and the keys for the step
    return dispatched_ops(lambda: block.select_tokens(attended))


def pruning_ops() -> Counter:
    """DynamicViT's step at the first location, less its predictor (a network of its own)."""
    model = methods.apply(tiny_vit(), "dynamicvit", keep_rate=0.5, locations=LOCATIONS)
    block = model.blocks[LOCATIONS[0]]
    x = tokens_entering(model, LOCATIONS[0])
    return dispatched_ops(lambda: block.prune(x)) - dispatched_ops(lambda: block.predictor(x, 1))


def evo_ops(variant: str) -> dict[str, Counter]:
    """Evo-ViT's steps: g started and blended from a CLS row, a stage opened and closed."""
    model = methods.apply(tiny_vit(), "evo-vit", keep_rate=0.5, locations=(2, 3), variant=variant)
    starts, opens = model.blocks[1], model.blocks[2]  # block 2 opens and closes the first stage
    x, entering, opened = tokens_entering(model, 1), tokens_entering(model, 2), []
    starts.attn(starts.norm1(x))  # leaves the CLS query and the keys for g
    ops = {"start g": dispatched_ops(starts.track_attention)}  # and starts this forward's stages
    ops["open"] = dispatched_ops(lambda: opened.append(opens.open_stage(entering)))
    opens.attn(opens.norm1(opened[0]))
    ops["blend g"] = dispatched_ops(opens.track_attention)
    ops["close"] = dispatched_ops(lambda: opens.close_stage(opened[0]))
    return ops


# The design, op by op (H = heads).
# The CLS row: block-diagonal scaled queries (zeros, add_ on the diagonal); one batched matmul reading k in place;
# softmax; the head mean (EViT) or sum (Evo-ViT).
CLS_ROW = 5
COPIES = ("aten::clone", "aten::_to_copy")  # a copy of the keys or the tokens, or a cast of them
TOP_K = 2  # top-k over the sequence, the prefix first (fill_, topk): sequence positions
ASSEMBLY = 2  # one row gather (arange, index)
EXPECTED = {
    "evit": CLS_ROW + TOP_K + ASSEMBLY + 2,  # the fused token (scatter_, baddbmm_)
    "prune": CLS_ROW + TOP_K + ASSEMBLY,
    "dynamicvit": TOP_K + ASSEMBLY,
}
# Evo-ViT's g has an entry per token, the prefix's +inf: a stable sort of it gives sequence positions, the prefix's
# first, so that the gathers need no index arithmetic and the restore no copy of the prefix.
EVO_EXPECTED = {
    "paper": {
        "start g": CLS_ROW + 1,  # the CLS row, its heads summed (the released code's g); the prefix's +inf (fill_)
        "blend g": CLS_ROW + 1,  # g = (1 - t) g + t (head sum), one lerp_ in place on the kept tokens' entries
        # sort; the kept and the held tokens' gathers (one batch index); the representative in its slot (sum, div,
        # an in-place mat-vec)
        "open": 1 + ASSEMBLY + 1 + 3,
        "close": 6,  # fast path (sub, add); tokens and g written to their places (arange, 3 index_put_)
    },
    "official": {  # close: a cat
        "start g": CLS_ROW + 1,
        "blend g": CLS_ROW + 1,
        "open": 1 + ASSEMBLY + 1,
        "close": 1,
    },
}


@pytest.mark.parametrize("name", ["evit", "prune", "dynamicvit"])
def test_selection_dispatches_the_designed_ops(name):
    with torch.inference_mode():
        ops = pruning_ops() if name == "dynamicvit" else selection_ops(name)
    assert sum(ops.values()) <= EXPECTED[name], dict(ops)
    assert ops["aten::index"] == 1 and "aten::gather" not in ops  # the output is assembled by one row gather
    assert not any(copy in ops for copy in COPIES), dict(ops)
    # positions straight from the top-k; EViT's weights zeroed in place and its fused token made in its slot
    assert not {"aten::cat", "aten::scatter", "aten::copy_"} & set(ops), dict(ops)


def test_dynamicvit_predictor_copies_no_tokens():
    """Its norm and first layer run on whole rows (on the patch slice they would copy it first), and the
    global half is written over in place (no concatenation of the two halves)."""
    model = methods.apply(tiny_vit(), "dynamicvit", keep_rate=0.5, locations=LOCATIONS)
    block = model.blocks[LOCATIONS[0]]
    x = tokens_entering(model, LOCATIONS[0])
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        block.predictor(x, 1)
    tokens_copied = (*COPIES, "aten::contiguous")  # of a [B, N, C] input; a cat's list of inputs has no shapes
    copied = [
        (e.name, e.input_shapes[0])
        for e in prof.events()
        if e.name == "aten::cat" or (e.name in tokens_copied and len(e.input_shapes[0]) == 3)
    ]
    assert not copied, copied


# ToMe's matching: the keys' head mean; cosine similarity (norm, div, matmul A B^T); the class token's -inf fill
# (a second for a prefix token in B); each A token's best B (max); the order of the best (argsort); the B each of
# the merged goes into (gather); A indices to sequence positions (mul); the kept ones sorted.
TOME_MATCHING = 10
# Its merge: positions (one arange, whose views are the prefix's and B's; a cat with the kept A tokens'); the
# merged tokens' B rows (add); one batch index (arange) for all its gathers; the tokens at the positions (index);
# the sizes there, plus the merged ones' (first merge: two new_ones, scatter_add_; sized: index twice,
# scatter_add_); each merged token's share of its B row's size (index, then reciprocal_ or div_); the move of each
# B token towards its merged ones (index the merged ones, index their B rows, sub_, mul_, scatter_add_).
TOME_EXPECTED = TOME_MATCHING + 15


@pytest.mark.parametrize("sized", [False, True])
def test_tome_merge_dispatches_the_designed_ops(sized):
    model = methods.apply(tiny_vit(), "tome", r=3, locations=LOCATIONS)
    block = model.blocks[LOCATIONS[0]]
    x = tokens_entering(model, LOCATIONS[0])
    with torch.inference_mode():
        attended = x + block.attn(block.norm1(x))
        block.state.size = torch.full((*x.shape[:2], 1), 2.0) if sized else None
        ops = dispatched_ops(lambda: block.merge(attended))
    assert sum(ops.values()) <= TOME_EXPECTED, dict(ops)
    assert ops["aten::cat"] == 1 and "aten::scatter_reduce" not in ops, dict(ops)  # the cat: positions, not tokens
    assert not any(copy in ops for copy in COPIES), dict(ops)


@pytest.mark.parametrize("sized", [False, True])
def test_tome_merge_computes_on_the_merged_tokens_only(sized):
    """Every token is read and written once, by the gather that puts it in place: the arithmetic of the
    size-weighted average runs on the r merged tokens and their B tokens, not on all N (as x * size would)."""
    r = 3
    model = methods.apply(tiny_vit(), "tome", r=r, locations=LOCATIONS)
    block = model.blocks[LOCATIONS[0]]
    x = tokens_entering(model, LOCATIONS[0])
    with torch.inference_mode():
        attended = x + block.attn(block.norm1(x))
        block.state.size = torch.full((*x.shape[:2], 1), 2.0) if sized else None
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            block.merge(attended)
    arithmetic = {"aten::mul", "aten::mul_", "aten::div", "aten::div_", "aten::sub", "aten::sub_", "aten::add"}

    def more_than_r_rows(shape: list[int]) -> bool:  # of tokens or sizes ([B, n, C] or [B, n, 1]), not of keys
        return len(shape) == 3 and shape[1] > r and shape[2] in (1, x.shape[2])

    tokens_wide = [
        (e.name, e.input_shapes[0])
        for e in prof.events()
        if e.name in arithmetic and more_than_r_rows(e.input_shapes[0])
    ]
    assert not tokens_wide, tokens_wide
    gathers = [e.input_shapes for e in prof.events() if e.name == "aten::index" and e.input_shapes[0][-1] == x.shape[2]]
    assert len(gathers) == 3, gathers  # the tokens that stay, the merged ones, their B rows: nothing else


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_evo_vit_steps_dispatch_the_designed_ops(variant):
    with torch.inference_mode():
        ops = evo_ops(variant)
    for step, expected in EVO_EXPECTED[variant].items():
        assert sum(ops[step].values()) <= expected, (step, dict(ops[step]))
        assert not any(copy in ops[step] for copy in COPIES), (step, dict(ops[step]))
    assert ops["open"]["aten::index"] == 2  # kept (with prefix and slot) and held: each token written once


@pytest.mark.parametrize("key", VARIANTS)
def test_in_place_steps_stay_differentiable(key):
    """The steps write into their own buffers in place; autograd must still find what it saved intact."""
    name, options = VARIANTS[key]
    model = methods.apply(tiny_vit(), name, keep_rate=0.5, locations=LOCATIONS, **options)
    model(images()).sum().backward()
    assert all(p.grad is not None for p in model.blocks[0].parameters())


@pytest.mark.parametrize(
    "key,autocast", [(key, False) for key in VARIANTS] + [("evit", True), ("evo-vit-paper", True)]
)  # under autocast: the weighted sums leave it for the tokens' own dtype
def test_compiles_as_one_graph_with_the_eager_logits(key, autocast):
    name, options = VARIANTS[key]
    model = methods.apply(tiny_vit(), name, keep_rate=0.5, locations=LOCATIONS, **options)
    torch._dynamo.reset()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        expected = model(images())
        explained = torch._dynamo.explain(model)(images())
        got = torch.compile(model, backend="aot_eager", fullgraph=True)(images())
    torch._dynamo.reset()
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("key", VARIANTS)
def test_replays_from_a_cuda_graph_as_it_runs_eagerly_and_on_the_cpu(key, monkeypatch):
    """On a GPU the in-place steps (the fused token's product written into a strided slot, the prefix's
    scores overwritten) compute what the CPU computes, and a CUDA graph of the forward replays them on
    new input under fp16 autocast, as the throughput protocol times them. GPU and CPU compare in float64:
    the untrained DynamicViT predictors' keep scores sit a few float32 ulps apart, which rounding could swap."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the patch embedding as on the CPU
    name, options = VARIANTS[key]
    model = methods.apply(tiny_vit(), name, keep_rate=0.5, locations=LOCATIONS, **options).eval().double()
    with torch.inference_mode():
        on_cpu = model(images().double())
        model.cuda()
        torch.testing.assert_close(model(images().double().cuda()).cpu(), on_cpu, rtol=1e-9, atol=1e-9)
        model.float()
        buffer, outputs = images().cuda(), []
        with torch.autocast("cuda", dtype=torch.float16):
            model(buffer)  # warm-up, as the timing does before capturing
            replay = capture_graph(lambda x: outputs.append(model(x)), buffer)
            buffer.copy_(images().flip(0).cuda())  # the graph reads its input buffer afresh on each replay
            replay()
            torch.cuda.synchronize()
            torch.testing.assert_close(outputs[-1], model(buffer))
