import math

import pytest
import torch
import torch.nn.functional as F

import ddpm_fast as df
from conftest import rel_err


@pytest.mark.parametrize("B,H,L,d", [(1, 1, 1, 32), (2, 4, 17, 64), (1, 1, 255, 256)])
def test_reference_matches_sdpa_float64(B, H, L, d, gen):
    q, k, v = (torch.randn(B, H, L, d, generator=gen, dtype=torch.float64) for _ in range(3))
    out = df.attention(q, k, v)
    assert rel_err(out, F.scaled_dot_product_attention(q, k, v)) < 1e-12
    assert rel_err(df.attention(q, k, v, scale=0.3), F.scaled_dot_product_attention(q, k, v, scale=0.3)) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_no_worse_than_eager(dtype, gen):
    q, k, v = (torch.randn(2, 2, 33, 64, generator=gen, dtype=torch.float64) for _ in range(3))
    ref = df.attention(q, k, v)
    out = df.attention(q.to(dtype), k.to(dtype), v.to(dtype))
    s = (q.to(dtype) @ k.to(dtype).transpose(-1, -2)) / math.sqrt(64)
    eager = torch.softmax(s, -1) @ v.to(dtype)
    assert out.dtype == dtype
    assert rel_err(out, ref) <= 2 * rel_err(eager, ref) + 1e-6


def test_block_matches_diffusers_attention(gen):
    diffusers = pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import Attention

    C = 64
    attn = Attention(C, heads=1, dim_head=C, norm_num_groups=32, eps=1e-6, residual_connection=True,
                     bias=True, upcast_softmax=True, _from_deprecated_attn_block=True).double().eval()
    for p in attn.parameters():
        p.data = torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.2
    x = torch.randn(2, C, 5, 6, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        theirs = attn(x)
        ours = df.reference.attention_block(
            x, attn.group_norm.weight, attn.group_norm.bias, attn.to_q.weight, attn.to_q.bias,
            attn.to_k.weight, attn.to_k.bias, attn.to_v.weight, attn.to_v.bias,
            attn.to_out[0].weight, attn.to_out[0].bias, num_groups=32, eps=1e-6)
    assert rel_err(ours, theirs) < 1e-12


@pytest.mark.parametrize("q,k,v,exc,match", [
    (torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 5, 8), ValueError, "q, k, v"),
    (torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8).half(), torch.randn(1, 1, 4, 8), TypeError, "k:"),
    (torch.randn(1, 1, 4, 0), torch.randn(1, 1, 4, 0), torch.randn(1, 1, 4, 0), ValueError, "d must"),
    (torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8), ValueError, "q:"),
    (torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8, device="meta"), torch.randn(1, 1, 4, 8), ValueError, "k:"),
])
def test_bad_input(q, k, v, exc, match):
    with pytest.raises(exc, match=match):
        df.attention(q, k, v)
