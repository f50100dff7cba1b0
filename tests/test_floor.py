"""The floor twin: a vanilla model sliced to a method's token counts, against hand computations."""

import pytest
import timm
import torch

import methods
from methods import TokenBenchError
from methods.floor import carried_counts, floor_counts
from tests.conftest import peaked_attention, tiny_vit


def fresh_deit_tiny():
    torch.manual_seed(0)
    return peaked_attention(timm.create_model("deit_tiny_patch16_224"))


@pytest.mark.parametrize(
    "name,options", [(name, {}) for name in methods.list_methods()] + [("dynamicvit", {"locations": (0, 6)})]
)
def test_the_twin_processes_the_methods_own_token_counts(name, options):
    """Reductions before the first block too (DynamicViT at block 0): the twin slices there as well."""
    method = methods.apply(fresh_deit_tiny(), name, **options)
    counts = methods.block_token_counts(method, 224)
    twin = methods.apply_floor(fresh_deit_tiny(), counts)
    assert methods.block_token_counts(twin, 224) == counts


@pytest.mark.parametrize("name", methods.list_methods())
def test_at_keep_rate_one_the_twin_is_vanilla(name, images):
    vanilla = fresh_deit_tiny()
    counts = methods.block_token_counts(methods.apply(fresh_deit_tiny(), name, keep_rate=1.0), 224)
    with torch.no_grad():
        expected = vanilla(images)
        got = methods.apply_floor(vanilla, counts)(images)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def by_hand(model, images, attention, ffn, carried, features=False):
    """Each block written out with timm's modules: attention on the first a tokens, FFN on the first
    f, the tokens up to `carried` passed on unchanged (DeiT: no LayerScale, no drop path in eval).
    -> the logits, or with `features` the final norm's output for every token leaving the blocks."""
    x = model._pos_embed(model.patch_embed(images))
    for block, a, f, c in zip(model.blocks, attention, ffn, carried):
        y = x[:, :a]
        y = y + block.attn(block.norm1(y))
        y = y[:, :f]
        y = y + block.mlp(block.norm2(y))
        x = torch.cat([y, x[:, f:c]], dim=1) if c > f else y
    return model.norm(x) if features else model.head(model.norm(x)[:, 0])


def test_slices_drop_tokens_as_evits_counts_say(images):
    model = fresh_deit_tiny()
    counts = methods.block_token_counts(methods.apply(fresh_deit_tiny(), "evit", keep_rate=0.5), 224)
    assert carried_counts(counts) == list(counts.attention[1:]) + [counts.ffn[-1]]  # nothing carried
    with torch.no_grad():
        expected = by_hand(model, images, counts.attention, counts.ffn, carried_counts(counts))
        got = methods.apply_floor(model, counts)(images)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_tokens_needed_again_later_are_carried_past_the_blocks_that_skip_them():
    """A count that rises again (Evo-ViT's paper variant hands its tokens back): blocks 1 and 2 work on
    9 of the 17 tokens, the other 8 pass them unchanged, and block 3 sees all 17."""
    model = tiny_vit()
    counts = floor_counts(attention=(17, 9, 9, 17), ffn=(17, 9, 5, 17))
    assert carried_counts(counts) == [17, 17, 17, 17]
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = by_hand(model, images, counts.attention, counts.ffn, [17, 17, 17, 17])
        got = methods.apply_floor(model, counts)(images)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert methods.block_token_counts(model, 64) == counts


def test_tokens_handed_back_after_the_last_ffn_leave_the_twin_too():
    """17 tokens leave the last block although its FFN ran on 5 (as Evo-ViT's close of a stage hands its
    held tokens back): the twin carries the other 12 past the blocks, so the final norm sees 17."""
    model = tiny_vit()
    counts = floor_counts(attention=(17, 9, 9, 9), ffn=(17, 9, 9, 5), exiting=17)
    assert carried_counts(counts) == [17, 17, 17, 17]
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = by_hand(model, images, counts.attention, counts.ffn, [17, 17, 17, 17], features=True)
        got = methods.apply_floor(model, counts).forward_features(images)
    assert got.shape == (2, 17, 64)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert methods.block_token_counts(model, 64) == counts


def test_evo_vit_hands_every_token_to_the_final_norm_and_its_twin_does_too(images):
    evo_vit = methods.block_token_counts(methods.apply(fresh_deit_tiny(), "evo-vit"), 224)
    evit = methods.block_token_counts(methods.apply(fresh_deit_tiny(), "evit"), 224)
    assert evo_vit.exiting == 197 > evo_vit.ffn[-1] and evit.exiting == evit.ffn[-1] < 197
    twin = methods.apply_floor(fresh_deit_tiny(), evo_vit)
    seen = []
    twin.norm.register_forward_pre_hook(lambda _module, args: seen.append(args[0].shape[1]))
    with torch.no_grad():
        twin(images)
    assert seen == [197]


def test_weights_and_keys_stay():
    model = fresh_deit_tiny()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    methods.apply_floor(model, methods.block_token_counts(methods.apply(fresh_deit_tiny(), "prune"), 224))
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[key], before[key]) for key in before)


@pytest.mark.parametrize(
    "counts,message",
    [
        (floor_counts((17,) * 3, (17,) * 3), "one attention and one FFN count per block"),
        (floor_counts((17, 17, 9, 9), (17, 17, 10, 9)), "each FFN count at most its attention count"),
        (floor_counts((17, 17, 0, 0), (17, 17, 0, 0)), "must lie in 1..17"),
        (floor_counts((17, 17, 9, 9), (17, 17, 9, 9), exiting=8), "the exiting count at least the last FFN's"),
        (floor_counts((17, 17, 9, 9), (17, 17, 9, 9), exiting=18), "must lie in 1..17"),
    ],
)
def test_impossible_counts_are_a_clear_error(counts, message):
    with pytest.raises(TokenBenchError, match=message):
        methods.apply_floor(tiny_vit(), counts)


def test_a_model_that_reduces_tokens_cannot_become_a_twin():
    counts = floor_counts((17,) * 4, (17,) * 4)
    with pytest.raises(TokenBenchError, match="already has method 'evit' applied"):
        methods.apply_floor(methods.apply(tiny_vit(), "evit", locations=(1,)), counts)
    methods.apply_floor(methods.apply(tiny_vit(), "vanilla"), counts)  # reduces nothing: allowed


def test_the_twin_compiles_as_one_graph_carrying_or_not():
    """The floor is timed compiled and in CUDA graphs too: its slices and in-place carry must trace."""
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    for counts in (floor_counts((17, 9, 9, 17), (17, 9, 5, 17)), floor_counts((17, 17, 9, 5), (17, 9, 5, 5))):
        model = methods.apply_floor(tiny_vit(), counts)
        torch._dynamo.reset()
        with torch.no_grad():
            expected = model(images)
            explained = torch._dynamo.explain(model)(images)
            got = torch.compile(model, backend="aot_eager", fullgraph=True)(images)
        torch._dynamo.reset()
        assert explained.graph_break_count == 0
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
