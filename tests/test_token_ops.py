import math

import pytest
import torch

from methods import token_ops


def test_keep_count_is_the_official_ceiling():
    assert token_ops.keep_count(0.7, 196) == 138  # 137.2 -> 138
    assert token_ops.keep_count(0.7, 139) == 98  # 97.3 -> 98
    assert token_ops.keep_count(0.5, 196) == 98
    assert token_ops.keep_count(1.0, 196) == 196
    assert token_ops.keep_count(0.01, 3) == 1


def test_class_attention_equals_the_row_of_the_explicit_attention():
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 7, 5, generator=generator)  # [B, H, N, D]
    k = torch.randn(2, 3, 7, 5, generator=generator)
    scale = 5**-0.5
    full = (q @ k.transpose(-2, -1) * scale).softmax(dim=-1)  # [B, H, N, N], what the official code builds
    got = token_ops.class_attention(q[:, :, :1], k, scale)
    torch.testing.assert_close(got, full[:, :, 0].mean(dim=1), rtol=1e-6, atol=1e-7)


def test_class_attention_by_hand():
    # One head, D = 1, scale 1: logits are q*k = [0, ln 2, ln 3] -> softmax = [1, 2, 3] / 6.
    q = torch.ones(1, 1, 1, 1)
    k = torch.tensor([0.0, math.log(2), math.log(3)]).view(1, 1, 3, 1)
    got = token_ops.class_attention(q, k, scale=1.0)
    torch.testing.assert_close(got, torch.tensor([[1 / 6, 2 / 6, 3 / 6]]))


def test_top_k_positions_by_hand():
    scores = torch.tensor([[-5.0, 0.1, 0.5, 0.2, 0.9]])  # a class token, then 4 patches
    assert token_ops.top_k_positions(scores, 3, prefix=1).tolist() == [[0, 4, 2, 3]]  # highest first


def test_gather_and_fuse_by_hand():
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [3.0, -1.0]]])  # [1, 4, 2]
    scores = torch.tensor([[0.4, 0.1, 0.3, 0.2]])
    kept = torch.tensor([[0, 2]])  # the top 2
    assert token_ops.gather_tokens(x, kept).tolist() == [[[1.0, 0.0], [2.0, 2.0]]]
    fused = torch.full((1, 1, 2), math.nan)  # its slot: what is there is not read
    token_ops.fuse_dropped(x, scores, kept, out=fused)
    # Dropped: token 1 (weight 0.1) and token 3 (weight 0.2): 0.1*[0,1] + 0.2*[3,-1] = [0.6, -0.1].
    torch.testing.assert_close(fused, torch.tensor([[[0.6, -0.1]]]))
    assert torch.equal(scores, torch.tensor([[0.0, 0.1, 0.0, 0.2]]))  # the kept tokens' weights zeroed in place


@pytest.mark.parametrize("prefix", [0, 1, 3])
def test_top_k_positions_put_the_prefix_first_in_order(prefix):
    """The same positions as a top-k over the patches alone, shifted past a prefix that comes first as it is,
    whatever the prefix's own scores."""
    generator = torch.Generator().manual_seed(3)
    scores = torch.rand(4, prefix + 9, generator=generator)
    scores[:, :prefix] = torch.linspace(-1.0, 2.0, prefix)  # prefix scores below and above the patches'
    patches = torch.topk(scores[:, prefix:], 5, dim=1, sorted=True).indices + prefix
    expected = torch.cat([torch.arange(prefix).expand(4, -1), patches], dim=1)
    assert torch.equal(token_ops.top_k_positions(scores, 5, prefix), expected)
    assert torch.isinf(scores[:, :prefix]).all()  # overwritten, as documented


def fused_qkv_keys(generator: torch.Generator, B: int = 2, N: int = 7, H: int = 3, D: int = 5):
    """q and k as timm's attention leaves them: views of one [B, N, 3, H, D] projection, heads side by side."""
    q, k, _ = torch.randn(B, N, 3, H, D, generator=generator).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k  # [B, H, N, D] each, not foldable over (B, H)


def test_class_logits_read_the_strided_keys_as_the_explicit_product():
    q, k = fused_qkv_keys(torch.Generator().manual_seed(1))
    assert k.stride(0) != k.shape[1] * k.stride(1)  # the block-diagonal path: (B, H) do not fold
    scale = 5**-0.5
    expected = (q * scale @ k.transpose(-2, -1))[:, :, 0]  # [B, H, N], from copies
    for keys in (k, k.contiguous()):
        torch.testing.assert_close(token_ops.class_logits(q[:, :, :1], keys, scale), expected, rtol=1e-6, atol=1e-6)


def test_gather_tokens_by_hand():
    x = torch.arange(2 * 5 * 2.0).view(2, 5, 2)  # token j of sequence b is [10b + 2j, 10b + 2j + 1]
    positions = torch.tensor([[0, 3, 1], [0, 2, 4]])
    assert token_ops.gather_tokens(x, positions).tolist() == [
        [[0, 1], [6, 7], [2, 3]],
        [[10, 11], [14, 15], [18, 19]],
    ]
    assert torch.equal(token_ops.gather_tokens(x, positions, token_ops.batch_rows(x)), x[[[0], [1]], positions])


def test_fused_token_stays_in_the_tokens_dtype_under_autocast():
    """Autocast would run the mat-vec on a bfloat16 copy of the tokens; it runs on the fp32 tokens, as
    without it, straight into the fused token's slot."""
    generator = torch.Generator().manual_seed(2)
    x, scores = torch.randn(2, 6, 4, generator=generator), torch.rand(2, 6, generator=generator)
    kept = torch.tensor([[0, 2], [0, 5]])
    expected, got = torch.zeros(2, 1, 4), torch.zeros(2, 1, 4)
    token_ops.fuse_dropped(x, scores.clone(), kept, out=expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        token_ops.fuse_dropped(x, scores.clone(), kept, out=got)
        assert (scores.unsqueeze(1) @ x).dtype == torch.bfloat16  # what autocast makes of a plain product
    assert torch.equal(got, expected)
    dropped = scores.scatter(1, kept, 0.0)
    torch.testing.assert_close(expected, (dropped.unsqueeze(-1) * x).sum(dim=1, keepdim=True))


def test_class_attention_of_half_precision_keys_is_fp32_and_keeps_the_small_weights():
    """Logits 20 apart: a weight of e^-20 (2e-9) flushes to zero in fp16 but not in the fp32 softmax."""
    q = torch.zeros(1, 1, 1, 2, dtype=torch.float16)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, 3, 2, dtype=torch.float16)
    k[0, 0, :, 0] = torch.tensor([20.0, 0.0, 10.0])
    got = token_ops.class_attention_per_head(q, k, 1.0)
    expected = torch.tensor([20.0, 0.0, 10.0], dtype=torch.float64).softmax(dim=0)
    assert got.dtype == torch.float32 and (got > 0).all()
    assert (token_ops.class_logits(q, k, 1.0).softmax(dim=-1) == 0).any()  # what an fp16 softmax gives
    torch.testing.assert_close(got[0, 0].double(), expected, rtol=1e-3, atol=0)
    assert token_ops.class_attention_per_head(q.double(), k.double(), 1.0).dtype == torch.float64
