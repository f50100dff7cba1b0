"""Evo-ViT against hand computations and against re-implementations of the paper's and the released algorithm.

The references below write the attention out (the N x N matrix, summed over heads), gather and
restore tokens with Python loops and apply the fast path block by block, sub-block by sub-block.
"""

import pytest
import timm
import torch

import methods
import methods.evovit as evovit
from harness.measure.macs import count_macs
from methods import TokenBenchError
from tests.conftest import peaked_attention, tiny_vit


def explicit_attention(block, x):
    """The block's attention sub-block written out: (attention [B, H, N, N], residual branch [B, N, C])."""
    h = block.norm1(x)
    B, N, C = h.shape
    heads = block.attn.num_heads
    q, k, v = block.attn.qkv(h).reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    attn = (q @ k.transpose(-2, -1) * block.attn.scale).softmax(dim=-1)
    return attn, block.attn.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


def permute(tokens, order):
    """tokens[b, order[b]] for each b, by loop. tokens: [B, M, ...], order: [B, M]"""
    return torch.stack([tokens[b, order[b]] for b in range(len(order))])


def unpermute(tokens, order):
    """The inverse of permute: out[b, order[b]] = tokens[b]."""
    out = torch.empty_like(tokens)
    for b in range(len(order)):
        out[b, order[b]] = tokens[b]
    return out


def stage_ends(locations, depth):
    return {i - 1 for i in locations[1:]} | {depth - 1}


def official_evovit_logits(model, images, keep_rate, locations, tradeoff=0.5):
    """The released DeiT code's algorithm: a full sort of g, frozen placeholders, write-back, mean head."""
    tradeoffs = [1.0 if i < locations[0] else tradeoff for i in range(len(model.blocks))]
    ends = stage_ends(locations, len(model.blocks))
    x = model._pos_embed(model.patch_embed(images))
    g = None
    for i, block in enumerate(model.blocks):
        if i in locations:
            keep = int((x.shape[1] - 1) * keep_rate)
            g, order = torch.sort(g, dim=1, descending=True)
            full = torch.cat([x[:, :1], permute(x[:, 1:], order)], dim=1)
            x = full[:, : 1 + keep]
        attn, branch = explicit_attention(block, x)
        a = attn[:, :, 0, 1:].sum(dim=1)
        if g is None:
            g = a
        else:
            n = a.shape[1]
            g = torch.cat([(1 - tradeoffs[i]) * g[:, :n] + tradeoffs[i] * a, g[:, n:]], dim=1)
        x = x + branch
        x = x + block.mlp(block.norm2(x))
        if i in ends:
            x = torch.cat([x, full[:, 1 + keep :]], dim=1)
    return model.head(model.norm(x[:, 1:].mean(dim=1)))


def paper_evovit_logits(model, images, keep_rate, locations, tradeoff=0.5):
    """The paper's algorithm, block by block: representative token, fast path per sub-block, order restored."""
    ends = stage_ends(locations, len(model.blocks))
    x = model._pos_embed(model.patch_embed(images))
    g, held = None, None
    for i, block in enumerate(model.blocks):
        if i in locations:
            keep = int((x.shape[1] - 1) * keep_rate)
            order = torch.argsort(g, dim=1, descending=True)
            g, patches = permute(g, order), permute(x[:, 1:], order)
            held = patches[:, keep:]
            weights = g[:, keep:] / g[:, keep:].sum(dim=1, keepdim=True)
            representative = (weights.unsqueeze(-1) * held).sum(dim=1, keepdim=True)
            x = torch.cat([x[:, :1], patches[:, :keep], representative], dim=1)
        attn, branch = explicit_attention(block, x)
        x = x + branch
        ffn = block.mlp(block.norm2(x))
        x = x + ffn
        a = attn[:, :, 0, 1:].sum(dim=1)
        if held is not None:
            held = held + branch[:, -1:] + ffn[:, -1:]
            a = a[:, :-1]
        t = 1.0 if i < locations[0] else tradeoff
        g = a if g is None else torch.cat([(1 - t) * g[:, : a.shape[1]] + t * a, g[:, a.shape[1] :]], dim=1)
        if i in ends:
            x = torch.cat([x[:, :1], unpermute(torch.cat([x[:, 1:-1], held], dim=1), order)], dim=1)
            g, held = unpermute(g, order), None
    return model.head(model.norm(x)[:, 0])


def mean_pool_logits(model, images):
    """The stock model with the released head: mean of the patch tokens, then the final norm, then the head."""
    x = model.blocks(model._pos_embed(model.patch_embed(images)))
    return model.head(model.norm(x[:, 1:].mean(dim=1)))


def record_rankings(monkeypatch):
    """Every g the model ranks, as it was before the sort, less the class token's entry (+inf: it ranks first)."""
    seen = []
    rank = evovit.rank_by_attention

    def recording(attention):
        assert attention[:, 0].isposinf().all()
        seen.append(attention[:, 1:].clone())
        return rank(attention)

    monkeypatch.setattr(evovit, "rank_by_attention", recording)
    return seen


@pytest.mark.parametrize(
    "variant,head,reference",
    [("paper", None, "vanilla"), ("official", None, "mean"), ("paper", "mean", "mean"), ("official", "cls", "vanilla")],
)
def test_keep_rate_one_is_the_stock_model_with_the_chosen_head(deit_tiny, images, variant, head, reference):
    with torch.no_grad():
        expected = deit_tiny(images) if reference == "vanilla" else mean_pool_logits(deit_tiny, images)
        got = methods.apply(deit_tiny, "evo-vit", keep_rate=1.0, variant=variant, head=head)(images)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_mean_head_pools_the_patch_tokens_only_behind_register_tokens():
    """Class and two register tokens lead the sequence: the mean is over the 16 patches after them."""
    model = tiny_vit(reg_tokens=2)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        x = model.blocks(model._pos_embed(model.patch_embed(images)))  # [B, 3 + 16, C]
        expected = model.head(model.norm(x[:, 3:].mean(dim=1)))
        got = methods.apply(model, "evo-vit", keep_rate=1.0, locations=(2,), head="mean")(images)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("keep_rate,locations,tradeoff", [(0.5, (4, 8), 0.5), (0.7, (3, 6, 9), 0.3), (0.4, (2,), 1.0)])
def test_official_variant_matches_the_released_algorithm(deit_tiny, images, keep_rate, locations, tradeoff):
    with torch.no_grad():
        expected = official_evovit_logits(deit_tiny, images, keep_rate, locations, tradeoff)
        options = dict(keep_rate=keep_rate, locations=locations, tradeoff=tradeoff)
        methods.apply(deit_tiny, "evo-vit", variant="official", **options)
        got = deit_tiny(images)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("keep_rate,locations,tradeoff", [(0.5, (4, 8), 0.5), (0.7, (3, 6, 9), 0.3)])
def test_paper_variant_matches_the_block_by_block_algorithm(deit_tiny, images, keep_rate, locations, tradeoff):
    with torch.no_grad():
        expected = paper_evovit_logits(deit_tiny, images, keep_rate, locations, tradeoff)
        methods.apply(deit_tiny, "evo-vit", keep_rate=keep_rate, locations=locations, tradeoff=tradeoff)
        got = deit_tiny(images)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def class_row(block, x):
    """The CLS query's attention to every other token, summed over heads, from the explicit matrix."""
    attn, _ = explicit_attention(block, x)
    return attn[:, :, 0, 1:].sum(dim=1)


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_global_attention_follows_the_recurrence(deit_tiny, images, monkeypatch, variant):
    """g at each selection, replayed by hand from the tokens that entered blocks 3..7."""
    model = methods.apply(deit_tiny, "evo-vit", variant=variant)
    rankings = record_rankings(monkeypatch)
    entering = {}
    for i in range(3, 8):
        model.blocks[i].norm1.register_forward_pre_hook(lambda _m, args, i=i: entering.setdefault(i, args[0]))
    with torch.no_grad():
        model(images)
        rows = {i: class_row(model.blocks[i], x) for i, x in entering.items()}
    assert [r.shape for r in rankings] == [(2, 196), (2, 196)]
    torch.testing.assert_close(rankings[0], rows[3])  # before the first selection: block 3's own attention
    g, order = rows[3].sort(dim=1, descending=True)
    for i in range(4, 8):
        g = torch.cat([0.5 * g[:, :98] + 0.5 * rows[i][:, :98], g[:, 98:]], dim=1)  # the representative is last
    if variant == "paper":
        g = unpermute(g, order)  # the stage handed every token back in its original place
    torch.testing.assert_close(rankings[1], g)


@pytest.mark.parametrize("kwargs", [{}, dict(init_values=0.1, qk_norm=True)])
def test_fast_path_adds_the_representative_updates_to_every_held_token(monkeypatch, kwargs):
    model = methods.apply(tiny_vit(**kwargs), "evo-vit", locations=(2, 3))
    block = model.blocks[2]  # opens and closes a stage on its own: 16 patches, 8 kept, 8 held
    rankings = record_rankings(monkeypatch)
    seen = {}
    block.register_forward_pre_hook(lambda _m, args: seen.setdefault("in", args[0]))
    block.register_forward_hook(lambda _m, _args, out: seen.setdefault("out", out))
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model(images)
        x, g = seen["in"], rankings[0]
        order = g.argsort(dim=1, descending=True)
        patches, scores = permute(x[:, 1:], order), permute(g, order)
        kept, held = patches[:, :8], patches[:, 8:]
        weights = scores[:, 8:] / scores[:, 8:].sum(dim=1, keepdim=True)
        representative = (weights.unsqueeze(-1) * held).sum(dim=1, keepdim=True)
        tokens = torch.cat([x[:, :1], kept, representative], dim=1)
        d_attn = block.ls1(block.attn(block.norm1(tokens)))
        d_ffn = block.ls2(block.mlp(block.norm2(tokens + d_attn)))
        slow = tokens + d_attn + d_ffn
        update = d_attn[:, -1:] + d_ffn[:, -1:]  # the representative token's two residual updates
        expected = unpermute(torch.cat([slow[:, 1:-1], held + update], dim=1), order)
    out = seen["out"]
    assert out.shape == x.shape
    torch.testing.assert_close(out[:, 0], slow[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 1:], expected, rtol=1e-5, atol=1e-5)
    moved = permute(out[:, 1:], order)[:, 8:] - held
    torch.testing.assert_close(moved, update.expand_as(moved), rtol=1e-5, atol=1e-5)


def test_representative_token_stays_in_the_tokens_dtype_under_autocast():
    """Its mat-vec runs on the fp32 tokens, as without autocast (not on a bfloat16 copy of them), in its slot."""
    generator = torch.Generator().manual_seed(2)
    held, scores = torch.randn(2, 6, 4, generator=generator), torch.rand(2, 6, generator=generator)
    expected, got = torch.zeros(2, 1, 4), torch.zeros(2, 1, 4)
    evovit.summarise(held, scores, out=expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        evovit.summarise(held, scores, out=got)
        assert (scores.unsqueeze(1) @ held).dtype == torch.bfloat16  # what autocast makes of a plain product
    assert torch.equal(got, expected)
    weights = scores / scores.sum(dim=1, keepdim=True)
    torch.testing.assert_close(expected, (weights.unsqueeze(-1) * held).sum(dim=1, keepdim=True))


def test_paper_variant_stays_finite_with_half_precision_weights(images):
    """Sharp class attention in fp16 weights: the held tokens' g would flush to zero in an fp16 softmax,
    and their normalised weights (the representative token's) become 0 / 0, NaN through every later block."""
    model = peaked_attention(timm.create_model("deit_tiny_patch16_224")).half()
    methods.apply(model, "evo-vit", variant="paper")
    with torch.no_grad():
        assert model(images.half()).isfinite().all()


def label_patches_in_channel_zero(model):
    """Channel 0 of patch token j holds j / P through the whole network: no residual branch writes it."""
    patches = model.patch_embed.num_patches
    with torch.no_grad():
        for linear in [model.patch_embed.proj] + [m for b in model.blocks for m in (b.attn.proj, b.mlp.fc2)]:
            linear.weight[0] = 0
            linear.bias[0] = 0
        model.pos_embed[0, model.num_prefix_tokens :, 0] = torch.arange(patches) / patches
    return torch.arange(patches) / patches


def capture_inputs(module, into, key):
    module.register_forward_pre_hook(lambda _m, args: into.setdefault(key, args[0]))


def test_paper_variant_restores_the_spatial_order(deit_tiny, images):
    labels = label_patches_in_channel_zero(deit_tiny)
    methods.apply(deit_tiny, "evo-vit")
    seen = {}
    capture_inputs(deit_tiny.norm, seen, "final")
    for i in (4, 8):
        capture_inputs(deit_tiny.blocks[i].norm1, seen, i)
    stages = methods.kept_patches(deit_tiny, images)
    assert [(s.block, s.kept.shape, s.others) for s in stages] == [(4, (2, 98), "fast path"), (8, (2, 98), "fast path")]
    for stage in stages:
        assert not torch.equal(stage.kept.sort(dim=1).values, stage.kept)  # kept highest g first, not in place
        assert torch.equal((seen[stage.block][:, 1:99, 0] * 196).round().long(), stage.kept)
        assert seen[stage.block].shape[1] == 1 + 98 + 1
    assert torch.equal(seen["final"][:, 1:, 0], labels.expand(2, -1))


def test_official_variant_keeps_the_order_of_g(deit_tiny, images):
    labels = label_patches_in_channel_zero(deit_tiny)
    methods.apply(deit_tiny, "evo-vit", variant="official")
    seen = {}
    capture_inputs(deit_tiny.blocks[8].norm1, seen, 8)
    deit_tiny.blocks[11].register_forward_hook(lambda _m, _args, out: seen.setdefault("final", out))
    stages = methods.kept_patches(deit_tiny, images)
    assert [(s.block, s.others) for s in stages] == [(4, "frozen"), (8, "frozen")]
    assert torch.equal((seen[8][:, 1:, 0] * 196).round().long(), stages[1].kept)  # original indices, as traced
    final = seen["final"][:, 1:, 0]
    assert torch.equal(final.sort(dim=1).values, labels.expand(2, -1))  # every patch is back ...
    assert not torch.equal(final, labels.expand(2, -1))  # ... in the order of g, not in place
    assert torch.equal((final[:, :98] * 196).round().long(), stages[1].kept)


@pytest.mark.parametrize("variant,extra", [("paper", 1), ("official", 0)])
def test_token_counts(deit_tiny, variant, extra):
    methods.apply(deit_tiny, "evo-vit", variant=variant)
    assert methods.token_counts(deit_tiny, 224) == [197] * 4 + [1 + 98 + extra] * 8
    model = timm.create_model("deit_tiny_patch16_224", img_size=288)
    methods.apply(model, "evo-vit", variant=variant, keep_rate=0.6, locations=(3, 9))
    assert methods.token_counts(model, 288) == [1 + 324] * 3 + [1 + 194 + extra] * 9  # int(0.6 * 324) = 194


def test_distillation_token_stays_in_the_slow_path():
    torch.manual_seed(0)
    model = peaked_attention(timm.create_model("deit_tiny_distilled_patch16_224"))
    methods.apply(model, "evo-vit")
    assert methods.token_counts(model, 224)[4:] == [2 + 98 + 1] * 8
    with torch.no_grad():
        assert model(torch.randn(2, 3, 224, 224)).shape == (2, 1000)
    with pytest.raises(TokenBenchError, match="head 'mean' .* not of VisionTransformerDistilled; use head='cls'"):
        methods.apply(timm.create_model("deit_tiny_distilled_patch16_224"), "evo-vit", variant="official")


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_the_prefix_keeps_its_places_through_every_stage(variant):
    """g pins the class and distillation tokens first (+inf), so no ranking moves them among the patches."""
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_distilled_patch16_224")
    label_patches_in_channel_zero(model)  # channel 0: patch j holds j / P ...
    with torch.no_grad():
        model.cls_token[..., 0] = model.dist_token[..., 0] = 0
        model.pos_embed[0, :2, 0] = torch.tensor([-2.0, -1.0])  # ... and the class, distillation tokens -2, -1
    methods.apply(model, "evo-vit", variant=variant, head="cls")
    seen = {}
    for i in (4, 8):
        capture_inputs(model.blocks[i].norm1, seen, i)
    capture_inputs(model.norm, seen, "final")
    with torch.no_grad():
        model(torch.randn(2, 3, 224, 224))
    for key in (4, 8, "final"):
        assert seen[key][:, :2, 0].tolist() == [[-2.0, -1.0]] * 2, key
    assert seen[8][:, 2:, 0].min() >= 0  # the prefix is nowhere among the patches


def test_official_head_keeps_weights_and_keys(deit_tiny):
    before = {key: value.clone() for key, value in deit_tiny.state_dict().items()}
    methods.apply(deit_tiny, "evo-vit", variant="official")
    after = deit_tiny.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[key], value) for key, value in before.items())


def test_mean_head_on_an_average_pool_model_is_its_own_head():
    """timm's global_pool="avg" head is fc_norm(mean of the patch tokens), with no final norm before it."""
    model = tiny_vit(global_pool="avg", fc_norm=True)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(images)
        got = methods.apply(model, "evo-vit", keep_rate=1.0, locations=(2,), variant="official")(images)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_mean_head_needs_a_layer_norm():
    model = tiny_vit(norm_layer=timm.layers.RmsNorm)
    with pytest.raises(TokenBenchError, match="moves a LayerNorm .* not RmsNorm; use head='cls'"):
        methods.apply(model, "evo-vit", locations=(2,), variant="official")


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(variant="fast"), r"variant must be one of 'paper', 'official', got 'fast'"),
        (dict(head="max"), r"head must be one of None \(the variant's\), 'cls', 'mean', got 'max'"),
        (dict(tradeoff=0), r"tradeoff must be a number in \(0, 1\], got 0"),
        (dict(tradeoff=1.5), r"tradeoff must be a number in \(0, 1\], got 1.5"),
        (dict(tradeoff=-0.5), r"tradeoff must be a number in \(0, 1\]"),
        (dict(locations=(0, 4)), r"locations must be 1 or more, got \(0, 4\)"),
        (dict(keep_rate=0.05, locations=(1, 2)), r"keep_rate 0.05 keeps none of the model's 16 patch tokens"),
        (dict(locations=(2, 5)), r"locations \[5\] lie beyond the model's depth"),
    ],
)
def test_bad_options_are_clear_errors(options, message):
    model = tiny_vit()
    with pytest.raises(TokenBenchError, match=message):
        methods.apply(model, "evo-vit", **options)
    assert type(model.blocks[1]) is timm.models.vision_transformer.Block  # refused calls leave the model alone


def analytic_macs(model, counts, config):
    """Exact MACs of an Evo-ViT DeiT from the tokens each block processes (selection opens a block)."""
    C, heads = model.embed_dim, model.blocks[0].attn.num_heads
    hidden = model.blocks[0].mlp.fc1.out_features
    patches = 196
    total = patches * C * 3 * 16 * 16  # patch embedding
    first, last = config.locations[0], config.locations[-1]
    for i, n in enumerate(counts):
        total += 5 * n * C + 3 * n * C * C + 2 * n * n * C + n * C * C  # norm1, qkv, q k^T + a v, proj
        total += 5 * n * C + 2 * n * C * hidden  # norm2, fc1 + fc2
        if first - 1 <= i < last:
            total += heads * n * C  # the CLS row that updates g: block-diagonal queries against n keys
        if i in config.locations and config.variant == "paper":
            total += (patches - int(config.keep_rate * patches)) * C  # the representative token
    final_norm = 5 * (1 + patches) * C if config.pooling == "cls" else 5 * C
    return total + final_norm + C * model.num_classes


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_macs_equal_the_analytic_formula(variant):
    model = methods.apply(timm.create_model("deit_tiny_patch16_224"), "evo-vit", variant=variant)
    counts = methods.token_counts(model, 224)
    assert count_macs(model, 224) == analytic_macs(model, counts, model.tokenbench_method.config)


def test_deit_small_official_macs_match_the_published_figure():
    model = methods.apply(timm.create_model("deit_small_patch16_224"), "evo-vit", variant="official")
    assert count_macs(model, 224) / 1e9 == pytest.approx(3.04, abs=0.03)  # Evo-ViT-S: 3.0 G published
