"""ToMe against an independent re-derivation of the official inference code, and its counts.

The reference below follows facebookresearch/ToMe (`tome/merge.py`, `tome/patch/timm.py`) written
plainly: explicit attention with log(size) added to the keys' logits, the keys' head mean as the
metric, tokens alternately in A and B, each A token's most cosine-similar B token, the r best A
tokens averaged into theirs by size, one sample and one token at a time. Prefix tokens in A are
never merged and none is merged into one in B (ToMe's -inf scores for its class and distillation
tokens). The patched timm model, running timm's fused attention with an additive mask, must agree.
"""

import math

import numpy as np
import pytest
import timm
import torch

import methods
from harness.measure.macs import count_macs
from harness.run import viz
from methods import TokenBenchError
from methods.tome import bipartite_soft_matching, merge_destinations, merge_weighted
from tests.conftest import peaked_attention, tiny_vit


def reference_merge(x, size, metric, r, prefix):
    """One block's merge, sample by sample. x: [B, N, C], size: [B, N], metric: [B, N, D]."""
    tokens, sizes = [], []
    for b in range(x.shape[0]):
        n = x.shape[1]
        unit = metric[b] / metric[b].norm(dim=-1, keepdim=True)
        in_a, in_b = list(range(0, n, 2)), list(range(1, n, 2))
        sources, targets = [i for i in in_a if i >= prefix], [j for j in in_b if j >= prefix]
        score, column = (unit[sources] @ unit[targets].T).max(dim=1)  # each source's best target
        best = {i: (float(s), targets[c]) for i, s, c in zip(sources, score, column)}
        merged = sorted(best, key=lambda i: best[i][0], reverse=True)[:r]
        members = {t: [t] for t in range(n)}
        for i in merged:
            members[best[i][1]].append(i)
        order = list(range(prefix)) + [i for i in in_a[math.ceil(prefix / 2) :] if i not in merged]
        order += in_b[prefix // 2 :]
        weights = [size[b, members[t]] for t in order]
        tokens.append(torch.stack([(x[b, members[t]] * w[:, None]).sum(0) / w.sum() for t, w in zip(order, weights)]))
        sizes.append(torch.stack([w.sum() for w in weights]))
    return torch.stack(tokens), torch.stack(sizes)


def reference_tome_logits(model, images, rates, prop_attn=True):
    """Logits and the tokens each FFN processes; rates: r for each block (0 where none merge)."""
    prefix = model.num_prefix_tokens
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    size = torch.ones(x.shape[:2], dtype=x.dtype)
    counts = []
    for block, r in zip(model.blocks, rates):
        attn = block.attn
        B, N, C = x.shape
        q, k, v = attn.qkv(block.norm1(x)).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(q), attn.k_norm(k)
        logits = q @ k.transpose(-2, -1) * attn.scale  # [B, H, N, N]
        if prop_attn:
            logits = logits + size.log()[:, None, None, :]
        out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, C)
        x = x + block.ls1(attn.proj(attn.norm(out)))
        r = min(r, (N - prefix) // 2)
        if r > 0:
            x, size = reference_merge(x, size, k.mean(dim=1), r, prefix)
        counts.append(x.shape[1])
        x = x + block.ls2(block.mlp(block.norm2(x)))
    return model.forward_head(model.norm(x)), counts


def assert_matches_reference(model, images, rates, **options):
    model, images = model.double(), images.double()
    with torch.no_grad():
        expected, counts = reference_tome_logits(model, images, rates, options.get("prop_attn", True))
        methods.apply(model, "tome", **options)
        got = model(images)
    assert methods.token_counts(model, images.shape[-1]) == counts
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("r", [8, 13])
def test_matches_the_official_algorithm(deit_tiny, images, r):
    assert_matches_reference(deit_tiny, images, [r] * 12, r=r)


def test_without_proportional_attention(deit_tiny, images):
    assert_matches_reference(deit_tiny, images, [13] * 12, r=13, prop_attn=False)


def test_some_locations_with_one_r_each_and_size_bias_between_them(deit_tiny, images):
    rates = [0, 0, 20, 0, 0, 30, 0, 0, 0, 25, 0, 0]
    assert_matches_reference(deit_tiny, images, rates, r=[20, 30, 25], locations=[2, 5, 9])


@pytest.mark.parametrize("kwargs", [dict(reg_tokens=2), dict(init_values=0.5, qk_norm=True)])
def test_register_tokens_layerscale_and_qk_norm(kwargs):
    """Prefix tokens stay first and unmerged; LayerScale and qk-norm are timm's own, as in the reference."""
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    assert_matches_reference(tiny_vit(**kwargs), images, [3] * 4, r=3)


def test_distillation_token_is_never_merged(images):
    torch.manual_seed(0)
    model = peaked_attention(timm.create_model("deit_tiny_distilled_patch16_224"))
    assert_matches_reference(model, images, [13] * 12, r=13)


def test_r_zero_is_vanilla(deit_tiny, images):
    with torch.no_grad():
        expected = deit_tiny(images)
        got = methods.apply(deit_tiny, "tome", r=0)(images)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_r_is_capped_at_half_the_mergeable_tokens():
    model = methods.apply(tiny_vit(), "tome", r=100)
    assert methods.token_counts(model, 64) == [1 + 8, 1 + 4, 1 + 2, 1 + 1]


def test_an_odd_number_of_mergeable_tokens_caps_r_below_half():
    """9 patches (48 px): at most 4 merge, as ToMe caps r at (N - prefix) // 2; a fifth would be the class
    token's A slot, whose matches are -inf."""
    images = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(6))
    assert_matches_reference(tiny_vit(img_size=48), images, [100] * 4, r=100)


@pytest.mark.parametrize("options", [dict(), dict(r=13), dict(keep_rate=0.2), dict(r=[13] * 12)])
def test_deit_small_token_counts(options):
    model = methods.apply(timm.create_model("deit_small_patch16_224"), "tome", **options)
    assert methods.token_counts(model, 224) == list(range(184, 40, -13))


def test_keep_rate_takes_r_from_the_input_patch_count():
    """At 288 there are 324 patches: keep rate 0.2 gives r = round(0.8 * 324 / 12) = 22."""
    model = peaked_attention(timm.create_model("deit_tiny_patch16_224", img_size=288))
    methods.apply(model, "tome", keep_rate=0.2)
    assert methods.token_counts(model, 288) == [325 - 22 * (i + 1) for i in range(12)]


def analytic_macs(model, counts, img_size):
    """Exact MACs of a DeiT with ToMe: the blocks at their token counts plus the matching product."""
    C, head_dim = model.embed_dim, model.blocks[0].attn.head_dim
    hidden = model.blocks[0].mlp.fc1.out_features
    patches = (img_size // 16) ** 2
    total = patches * C * 3 * 16 * 16  # patch embedding convolution
    for n, m in zip([1 + patches] + counts[:-1], counts):
        total += 5 * n * C + 3 * n * C * C + 2 * n * n * C + n * C * C  # norm1, qkv, q k^T + a v, proj
        total += (n + 1) // 2 * (n // 2) * head_dim if m < n else 0  # cosine similarity of A to B
        total += 5 * m * C + 2 * m * C * hidden  # norm2, fc1 + fc2
    return total + 5 * counts[-1] * C + C * model.num_classes  # final norm, head


@pytest.mark.parametrize(
    "model_name,r,official",
    [
        ("deit_small_patch16_224", 13, 2.712),
        ("deit_small_patch16_224", 8, 3.428),
        ("deit_small_patch16_224", 16, 2.298),
        ("deit_base_patch16_224", 13, 10.382),
    ],
)
def test_macs_match_fvcore_on_the_official_code_and_the_formula(model_name, r, official):
    model = methods.apply(timm.create_model(model_name), "tome", r=r)
    macs = count_macs(model, 224)
    assert macs / 1e9 == pytest.approx(official, abs=0.001)
    assert macs == analytic_macs(model, methods.token_counts(model, 224), 224)


def test_matching_by_hand():
    """Tokens 0..5: A = 0, 2, 4; B = 1, 3, 5. Token 0 is the class token (never merged)."""
    metric = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [1.0, 0.0], [0.3, 1.0], [-1.0, 0.0]]])
    kept, merged, into = bipartite_soft_matching(metric, r=1, prefix=1)
    assert merged.tolist() == [[2]] and into.tolist() == [[1]]  # token 2 (A 1) goes into token 3 (B 1)
    assert kept.tolist() == [[0, 4]]  # the class token first, then token 4 (A 2)
    x = torch.arange(12.0).reshape(1, 6, 2)
    size = torch.tensor([[[1.0], [1.0], [3.0], [1.0], [1.0], [1.0]]])
    merged_x, merged_size = merge_weighted(x, size, kept, merged, into, prefix=1)
    # Order after: class token, token 4, then B: tokens 1, 3 (+ 2), 5. Token 3 = (3 * x2 + 1 * x3) / 4.
    expected = torch.stack([x[0, 0], x[0, 4], x[0, 1], (3 * x[0, 2] + x[0, 3]) / 4, x[0, 5]])
    torch.testing.assert_close(merged_x[0], expected)
    assert merged_size.flatten().tolist() == [1, 1, 1, 4, 1]
    assert merge_destinations(kept, merged, into, 6, 1).tolist() == [[0, 2, 3, 3, 1, 4]]


def test_merge_pictures_follow_the_token_sizes(deit_tiny):
    """Each stage's groups hold as many patches as the size the model carries for each token."""
    methods.apply(deit_tiny, "tome", r=13)
    sizes = []
    deit_tiny.blocks[5].mlp.register_forward_pre_hook(lambda m, a: sizes.append(deit_tiny.blocks[5].state.size))
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    stages = methods.kept_patches(deit_tiny, image)
    assert [stage.block for stage in stages] == list(range(12)) and stages[0].others == "merged"
    groups = stages[5].groups[0]
    patches_per_token = torch.bincount(groups, minlength=sizes[0].shape[1] - 1)
    assert patches_per_token.tolist() == sizes[0][0, 1:, 0].round().long().tolist()  # the class token excluded
    counts = methods.token_counts(deit_tiny, 224)
    for stage in stages:
        patches, made = viz.stage_tokens(stage)
        assert patches + made == counts[stage.block] - 1 == int(stage.groups.max()) + 1


def test_picture_shows_a_few_stages_with_merged_patches_painted(deit_tiny):
    methods.apply(deit_tiny, "tome")
    picture = np.random.default_rng(0).random((224, 224, 3))
    tensor = torch.from_numpy(picture).permute(2, 0, 1)[None].float()
    stages = methods.kept_patches(deit_tiny, tensor)
    figure = viz.stage_figure(picture, stages, patch=(16, 16), title="t")
    titles = [ax.get_title().split(":")[0] for ax in figure.axes]
    assert titles == ["input", "block 2", "block 5", "block 8", "block 11"]
    shown = figure.axes[-1].get_images()[0].get_array()
    groups = stages[-1].groups[0].numpy()
    alone = np.bincount(groups)[groups] == 1  # [196]
    rows, cols = np.divmod(np.arange(196), 14)
    for patch in range(196):
        cell = (slice(16 * rows[patch], 16 * rows[patch] + 16), slice(16 * cols[patch], 16 * cols[patch] + 16))
        assert np.allclose(shown[cell], picture[cell]) == alone[patch]
        if not alone[patch]:  # a merged patch is painted one colour
            assert np.allclose(shown[cell], shown[cell][0, 0])


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(r=-1), "r must be a non-negative int"),
        (dict(r=2.5), "r must be a non-negative int"),
        (dict(r=True), "r must be a non-negative int"),
        (dict(r=[1, 2]), r"r must give one int per location \(12\)"),
        (dict(r=[1, 2], locations=[3]), r"r must give one int per location \(1\)"),
        (dict(r=8, keep_rate=0.5), "give r or keep_rate, not both"),
        (dict(keep_rate=0.0), "keep_rate must be"),
        (dict(prop_attn="yes"), "prop_attn must be True or False"),
        (dict(locations=[12]), "beyond the model's depth"),
    ],
)
def test_bad_input_is_one_clear_error(deit_tiny, options, message):
    with pytest.raises(TokenBenchError, match=message):
        methods.apply(deit_tiny, "tome", **options)
    assert not hasattr(deit_tiny, "tokenbench_method")


def test_merge_stays_finite_in_fp16_where_x_times_size_would_overflow():
    """Tokens of magnitude 2,000 carrying 40 patches each: ToMe's x * size (80,000) is beyond fp16's
    65,504. The merge here never forms that product, so it gives the float64 average to fp16 precision."""
    generator = torch.Generator().manual_seed(5)
    x = 2000 * (1 + torch.rand(2, 9, 4, generator=generator, dtype=torch.float64))
    size = torch.full((2, 9, 1), 40.0, dtype=torch.float64)
    metric = torch.randn(2, 9, 3, generator=generator, dtype=torch.float64)
    expected, expected_size = reference_merge(x, size[..., 0], metric, r=3, prefix=1)
    assert ((x * size).half().isinf()).all()  # what ToMe's own code would compute on
    kept, merged, into = bipartite_soft_matching(metric, r=3, prefix=1)
    got, got_size = merge_weighted(x.half(), size.half(), kept, merged, into, prefix=1)
    torch.testing.assert_close(got.double(), expected, rtol=2e-3, atol=0)
    assert torch.equal(got_size[..., 0].double(), expected_size)


GPU_MODES = [("cuda", dtype, autocast) for dtype in (torch.float16, torch.bfloat16) for autocast in (True, False)]


@pytest.mark.parametrize(
    "device,dtype,autocast",
    [("cpu", torch.bfloat16, True)]
    + [
        pytest.param(*mode, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))
        for mode in GPU_MODES
    ],
)
def test_size_bias_reaches_the_fused_kernel_as_the_reference_math_computes_it(device, dtype, autocast):
    """Whichever kernel SDPA picks for the log(size) mask (by device, dtype and versions: cuDNN's comes first
    on Hopper in recent torch, and one cuDNN path misread a mask whose dtype differs from the queries') must
    compute what its reference math backend computes. Only block 0 merges, on keys that precede any
    attention, so the two runs merge the same tokens and differ by the kernels' rounding alone."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = methods.apply(tiny_vit(), "tome", r=6, locations=(0,)).to(device).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)).to(device)
    if not autocast:
        model, x = model.to(dtype), x.to(dtype)
    with torch.inference_mode(), torch.autocast(device, dtype=dtype, enabled=autocast):
        got = model(x).float()
        with sdpa_kernel(SDPBackend.MATH):
            expected = model(x).float()
    assert model.blocks[0].state.size.max() > 1  # later blocks attended with a bias that is not all zero
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())
