"""DynamicViT against an independent re-implementation of the official inference code.

The reference below follows raoyongming/DynamicViT (VisionTransformerDiffPruning in eval mode):
explicit N x N attention; before each pruning block, PredictorLG on the patch tokens with an
all-ones policy mask, argsort of the keep log-probability (channel 0), descending, the first
int(n0 * ratio) kept through a flat-index batch select, CLS in front. The patched timm model must
give the same logits and keep the same patches.
"""

import math

import pytest
import timm
import torch
import torch.nn.functional as F

import methods
import methods.dynamicvit  # noqa: F401  (registers the method)
from harness.measure.macs import count_macs
from methods.dynamicvit import ScorePredictor, keep_count, predictors_trained
from tests.conftest import peaked_attention, tiny_vit

pytestmark = pytest.mark.filterwarnings("ignore:dynamicvit. the score predictors are untrained:UserWarning")


def peaked_predictors(model, seed=3):
    """Re-draw the predictors' Linear weights with unit gain (std 1/sqrt(fan_in)), far above the official
    0.02, so keep scores spread over a range instead of all sitting near log(1/2); larger ones would
    saturate log P(keep) at 0 and tie."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.score_predictor.named_parameters():
            if name.endswith("weight") and param.ndim == 2:
                param.copy_(torch.randn(param.shape, generator=generator) / param.shape[1] ** 0.5)
    return model


def official_predictor(predictor, x, policy):
    """PredictorLG.forward written out: x [B, N, C], policy [B, N, 1] -> log-probabilities [B, N, 2]."""
    ln, fc_in = predictor.in_conv[0], predictor.in_conv[1]
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    h = (x - mean) / torch.sqrt(var + 1e-5) * ln.weight + ln.bias
    h = F.gelu(h @ fc_in.weight.T + fc_in.bias)
    C = h.shape[-1]
    local = h[:, :, : C // 2]
    global_ = (h[:, :, C // 2 :] * policy).sum(dim=1, keepdim=True) / policy.sum(dim=1, keepdim=True)
    z = torch.cat([local, global_.expand(-1, h.shape[1], -1)], dim=-1)
    fc1, fc2, fc3 = predictor.out_conv[0], predictor.out_conv[2], predictor.out_conv[4]
    z = F.gelu(z @ fc1.weight.T + fc1.bias)
    z = F.gelu(z @ fc2.weight.T + fc2.bias)
    z = z @ fc3.weight.T + fc3.bias
    return z - torch.log(torch.exp(z).sum(dim=-1, keepdim=True))


def batch_index_select(x, idx):
    """The official gather: per-row offsets into the flattened batch."""
    B, N = x.shape[:2]
    flat = (idx + torch.arange(B).view(B, 1) * N).reshape(-1)
    return x.reshape(B * N, -1)[flat].reshape(B, idx.shape[1], -1)


def official_dynamicvit(model, images, keep_rate, locations):
    """Logits, and for each stage the original patch positions kept, in kept order."""
    x = model._pos_embed(model.patch_embed(images))
    B, n0 = x.shape[0], x.shape[1] - 1
    prev = x.new_ones(B, n0, 1)
    positions = torch.arange(n0).expand(B, -1)
    kept_positions = []
    for i, block in enumerate(model.blocks):
        if i in locations:
            stage = locations.index(i)
            score = official_predictor(model.score_predictor[stage], x[:, 1:], prev)[:, :, 0]
            n_keep = int(n0 * [keep_rate ** (s + 1) for s in range(len(locations))][stage])
            idx = torch.argsort(score, dim=1, descending=True)[:, :n_keep]
            x = batch_index_select(x, torch.cat([torch.zeros(B, 1, dtype=idx.dtype), idx + 1], dim=1))
            prev = batch_index_select(prev, idx)
            positions = positions.gather(1, idx)
            kept_positions.append(positions)
        h = block.norm1(x)
        N, C = h.shape[1:]
        heads = block.attn.num_heads
        q, k, v = block.attn.qkv(h).reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * block.attn.scale).softmax(dim=-1)
        x = x + block.attn.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
        x = x + block.mlp(block.norm2(x))
    return model.head(model.norm(x)[:, 0]), kept_positions


def dynamicvit(model, **options):
    return peaked_predictors(methods.apply(model, "dynamicvit", **options)).eval()


@pytest.fixture
def deit_tiny64(deit_tiny):
    """In float64, so that two correct implementations never split a near-tie of keep scores differently."""
    return deit_tiny.double()


@pytest.mark.parametrize("keep_rate,locations", [(0.7, (3, 6, 9)), (0.5, (2, 5, 8)), (0.8, (1, 4, 7, 10)), (1.0, (3,))])
def test_matches_the_official_algorithm(deit_tiny64, images, keep_rate, locations):
    model = dynamicvit(deit_tiny64, keep_rate=keep_rate, locations=locations)
    images = images.double()
    with torch.no_grad():
        expected, expected_positions = official_dynamicvit(model, images, keep_rate, locations)
        got = model(images)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    stages = methods.kept_patches(model, images)
    assert [stage.block for stage in stages] == list(locations)
    for stage, positions in zip(stages, expected_positions):
        assert stage.others == "dropped" and torch.equal(stage.kept, positions)


def test_kept_patches_are_the_argsort_of_the_keep_score(deit_tiny64, images):
    model = dynamicvit(deit_tiny64, keep_rate=0.7)
    images = images.double()
    stages = methods.kept_patches(model, images)
    assert [(stage.block, stage.kept.shape[1]) for stage in stages] == [(3, 137), (6, 96), (9, 67)]
    with torch.no_grad():
        x = model.blocks[:3](model._pos_embed(model.patch_embed(images)))
        keep_score = model.score_predictor[0](x[:, 1:])[:, :, 0]
    assert torch.equal(stages[0].kept, torch.argsort(keep_score, dim=1, descending=True)[:, :137])


def test_predictor_equals_the_official_forward_written_out():
    torch.manual_seed(0)
    predictor = ScorePredictor(12)
    with torch.no_grad():
        for param in predictor.parameters():
            param.copy_(torch.randn(param.shape) * 0.5)
    x = torch.randn(2, 5, 12)
    with torch.no_grad():
        got = predictor(x)
        expected = official_predictor(predictor, x, torch.ones(2, 5, 1))
    assert got.shape == (2, 5, 2)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.exp().sum(dim=-1), torch.ones(2, 5))


def gelu(v):
    return v * 0.5 * (1 + math.erf(v / math.sqrt(2)))


def test_predictor_by_hand():
    """dim 4, tokens of mean 0 and variance 1, so the LayerNorm only divides by sqrt(1 + eps).

    in_conv.1 = 10 * identity, so h = GELU(10 x') = 10 x' on +1 channels and 0 (to 1e-22) on -1 ones:
    t0 -> [s, 0, s, 0], t1 -> [0, s, 0, s], t2 -> [s, s, 0, 0] with s = 10 / sqrt(1 + 1e-5).
    Global half = mean of channels 2, 3 over the three tokens, about [s/3, s/3]. out_conv reads
    local[0] - global[0] and turns it into the logits [y, 0].
    """
    predictor = ScorePredictor(4)
    tokens = torch.tensor([[[1.0, -1, 1, -1], [-1, 1, -1, 1], [1, 1, -1, -1]]])  # [1, 3, 4]
    with torch.no_grad():
        for param in predictor.parameters():
            param.zero_()
        predictor.in_conv[0].weight.fill_(1.0)
        predictor.in_conv[1].weight.copy_(10 * torch.eye(4))
        predictor.out_conv[0].weight[0, 0] = 1.0  # local[0]
        predictor.out_conv[0].weight[1, 2] = 1.0  # global[0]
        predictor.out_conv[2].weight.copy_(torch.tensor([[1.0, -1.0]]))
        predictor.out_conv[4].weight.copy_(torch.tensor([[1.0], [0.0]]))
        got = predictor(tokens)[0]  # [3, 2]
    s = 10 / math.sqrt(1 + 1e-5)
    on, off = gelu(s), gelu(-s)
    global_ = (on + off + off) / 3  # channel 2 of t0, t1, t2
    expected = []
    for local in (on, off, on):  # channel 0 of t0, t1, t2
        y = gelu(gelu(local) - gelu(global_))
        expected.append([y - math.log(math.exp(y) + 1), -math.log(math.exp(y) + 1)])
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-5, atol=1e-5)
    assert got[:, 0].argsort(descending=True)[-1] == 1  # t1, with nothing local, is ranked last


def test_global_half_is_the_mean_over_the_current_tokens():
    """Changing one token changes the others' scores only through the mean; permuting permutes."""
    torch.manual_seed(0)
    predictor = ScorePredictor(8)
    x = torch.randn(1, 6, 8)
    with torch.no_grad():
        base = predictor(x)
        perm = torch.randperm(6)
        torch.testing.assert_close(predictor(x[:, perm]), base[:, perm])
        predictor.out_conv[0].weight[:, 4:] = 0  # cut the global half: tokens become independent
        alone = predictor(x)
        y = x.clone()
        y[:, 0] += 1.0
        torch.testing.assert_close(predictor(y)[:, 1:], alone[:, 1:])


def test_prefix_rows_are_scored_but_leave_the_patch_scores_as_the_patches_alone_get():
    """The predictor runs on the whole sequence; the global mean is over the patch tokens only."""
    torch.manual_seed(0)
    predictor = ScorePredictor(8)
    x = torch.randn(2, 6, 8)
    with torch.no_grad():
        for prefix in (1, 2):
            scores = predictor(x, prefix)
            assert scores.shape == (2, 6, 2)
            torch.testing.assert_close(scores[:, prefix:], predictor(x[:, prefix:]), rtol=0, atol=0)


def test_the_scores_a_hook_sees_stay_differentiable():
    """The pruning ranks the prefix first by overwriting its scores; under autograd it does that on a copy,
    so a loss on the predictor's own output (read by a hook, as a training loop would) still backpropagates."""
    model = methods.apply(tiny_vit(), "dynamicvit", keep_rate=0.5, locations=(1, 2))
    seen = []
    model.score_predictor[0].register_forward_hook(lambda _module, _args, out: seen.append(out))
    model(torch.randn(2, 3, 64, 64))
    seen[0][:, 1:, 0].sum().backward()
    assert model.score_predictor[0].out_conv[4].weight.grad is not None
    assert torch.isfinite(seen[0]).all()  # under autograd the prefix's row is not overwritten with +inf


@pytest.mark.parametrize(
    "img_size,expected",
    [(224, [137, 96, 67]), (288, [226, 158, 111])],  # int(n0 * 0.7 ** s): n0 = 196, 324
)
def test_deit_small_token_counts_use_the_input_patch_count(img_size, expected):
    model = methods.apply(timm.create_model("deit_small_patch16_224", img_size=img_size), "dynamicvit")
    counts = methods.token_counts(model, img_size)
    assert [counts[i] - 1 for i in (3, 6, 9)] == expected
    assert counts[:3] == [1 + (img_size // 16) ** 2] * 3


def test_keep_count():
    assert [keep_count(0.7, s, 196) for s in range(3)] == [137, 96, 67]
    assert [keep_count(0.5, s, 196) for s in range(3)] == [98, 49, 24]
    assert [keep_count(0.9, s, 196) for s in range(3)] == [176, 158, 142]
    assert keep_count(1.0, 5, 324) == 324
    assert keep_count(0.1, 2, 16) == 1  # the official int() would give 0


def test_distillation_token_is_never_dropped():
    torch.manual_seed(0)
    model = dynamicvit(peaked_attention(timm.create_model("deit_tiny_distilled_patch16_224")), keep_rate=0.5)
    images = torch.randn(2, 3, 224, 224)
    captured = {}
    model.blocks[2].register_forward_hook(lambda m, args, out: captured.setdefault("before", out))
    model.blocks[3].norm1.register_forward_pre_hook(lambda m, args: captured.setdefault("after", args[0]))
    with torch.no_grad():
        logits = model(images)
    assert logits.shape == (2, 1000)
    assert captured["after"].shape[1] == 2 + 98
    assert torch.equal(captured["after"][:, :2], captured["before"][:, :2])  # CLS and distillation token, first
    assert [methods.token_counts(model, 224)[i] for i in (3, 6, 9)] == [2 + 98, 2 + 49, 2 + 24]


@pytest.mark.parametrize("kwargs", [dict(init_values=1e-1), dict(qk_norm=True)])
def test_layerscale_and_qk_norm_blocks(kwargs):
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = tiny_vit(**kwargs)(images)
        same = dynamicvit(tiny_vit(**kwargs), keep_rate=1.0, locations=(1, 2))(images)
        reduced_model = dynamicvit(tiny_vit(**kwargs), keep_rate=0.5, locations=(1, 2))
        reduced = reduced_model(images)
    torch.testing.assert_close(same, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(reduced, expected, atol=1e-4)
    assert methods.token_counts(reduced_model, 64)[1:3] == [1 + 8, 1 + 4]


def test_predictor_keys_and_sizes_are_the_official_ones():
    model = methods.apply(timm.create_model("deit_base_patch16_224"), "dynamicvit")
    keys = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith("score_predictor.")}
    D = 768
    expected = {}
    for s in range(3):
        p = f"score_predictor.{s}."
        expected |= {p + "in_conv.0.weight": (D,), p + "in_conv.0.bias": (D,)}
        expected |= {p + "in_conv.1.weight": (D, D), p + "in_conv.1.bias": (D,)}
        expected |= {p + "out_conv.0.weight": (D // 2, D), p + "out_conv.0.bias": (D // 2,)}
        expected |= {p + "out_conv.2.weight": (D // 4, D // 2), p + "out_conv.2.bias": (D // 4,)}
        expected |= {p + "out_conv.4.weight": (2, D // 4), p + "out_conv.4.bias": (2,)}
    assert keys == expected
    assert model.score_predictor[0].in_conv[0].eps == 1e-5
    # The n_parameters of the official DeiT-B DynamicViT training logs (issue #27).
    assert sum(p.numel() for p in model.parameters()) == 89_452_846


def test_official_init_seeded_and_warned(deit_tiny):
    with pytest.warns(UserWarning, match="untrained.*meaningless until a DynamicViT checkpoint is loaded"):
        methods.apply(deit_tiny, "dynamicvit")
    assert not predictors_trained(deit_tiny)
    again = methods.apply(timm.create_model("deit_tiny_patch16_224"), "dynamicvit")
    for (name, a), b in zip(deit_tiny.score_predictor.named_parameters(), again.score_predictor.parameters()):
        assert torch.equal(a, b), name  # seeded: the same predictors every time
        if name.endswith("bias"):
            assert not a.any(), name
    linear = deit_tiny.score_predictor[1].in_conv[1].weight
    assert abs(linear.std().item() - 0.02) < 0.001 and abs(linear.mean().item()) < 0.001
    assert torch.equal(deit_tiny.score_predictor[2].in_conv[0].weight, torch.ones(192))


def test_predictors_follow_the_model_dtype():
    model = methods.apply(tiny_vit().double(), "dynamicvit", locations=(1, 2))
    assert all(p.dtype == torch.float64 for p in model.score_predictor.parameters())
    model(torch.randn(1, 3, 64, 64, dtype=torch.float64))


# fvcore counts (1 MAC = one multiply-add), matched to the expected two-decimal figures within 0.01.
@pytest.mark.parametrize(
    "keep_rate,expected", [(1.0, 4.75), (0.9, 4.05), (0.8, 3.47), (0.7, 2.99), (0.6, 2.57), (0.5, 2.23)]
)
def test_deit_small_macs(keep_rate, expected):
    model = methods.apply(timm.create_model("deit_small_patch16_224"), "dynamicvit", keep_rate=keep_rate)
    assert count_macs(model, 224) / 1e9 == pytest.approx(expected, abs=0.01)


def test_deit_base_macs():
    model = methods.apply(timm.create_model("deit_base_patch16_224"), "dynamicvit", keep_rate=0.7)
    assert count_macs(model, 224) / 1e9 == pytest.approx(11.49, abs=0.01)


def test_macs_equal_the_analytic_formula():
    """Blocks on the tokens they see, plus each predictor on all of them, the class token's row too (mean and
    element-wise ops free, layer norms 5 per element)."""
    model = methods.apply(timm.create_model("deit_small_patch16_224"), "dynamicvit", keep_rate=0.7)
    C, hidden, n = 384, 1536, 197
    total = 196 * C * 3 * 16 * 16
    for i in range(12):
        if i in (3, 6, 9):
            total += n * (5 * C + C * C + C * (C // 2) + (C // 2) * (C // 4) + (C // 4) * 2)
            n = 1 + keep_count(0.7, (3, 6, 9).index(i), 196)
        total += 5 * n * C + 4 * n * C * C + 2 * n * n * C + 5 * n * C + 2 * n * C * hidden
    total += 5 * n * C + C * 1000
    assert count_macs(model, 224) == total


def test_training_with_gradients_says_that_it_runs_the_inference_selection(recwarn):
    """Official training keeps every token under Gumbel-softmax masks; here the hard top-k runs in both
    modes, the logits are the same, and the loss gives the predictors no gradient. Counting tokens or
    MACs of a model in training mode (which runs it in eval) says nothing."""
    model = methods.apply(tiny_vit(), "dynamicvit", keep_rate=0.5, locations=(1, 2)).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(images)
    model.train()
    methods.token_counts(model, 64)
    with torch.no_grad():
        model(images)
    assert not [warning for warning in recwarn if "training mode" in str(warning.message)]
    with pytest.warns(UserWarning, match="dynamicvit in training mode still keeps the top-k tokens"):
        model(images).sum().backward()
    assert all(param.grad is None for param in model.score_predictor.parameters())
    model.eval()
    torch.testing.assert_close(model(images), expected, rtol=0, atol=0)
