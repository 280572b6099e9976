import math
import os
import subprocess
import sys
import warnings

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
    (torch.randn(1, 1, 4, 8), torch.randn(1, 1, 0, 8), torch.randn(1, 1, 0, 8), ValueError, "at least one key"),
    (torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8), ValueError, "q:"),
    (torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8, device="meta"), torch.randn(1, 1, 4, 8), ValueError, "k:"),
])
def test_bad_input(q, k, v, exc, match):
    with pytest.raises(exc, match=match):
        df.attention(q, k, v)


# ----------------------------------------------------------------- fused kernels
from conftest import (GPU_KERNEL_BACKENDS, backend_device, batch_past_int32, layout, needs,  # noqa: E402
                      requires_cuda)


def test_cublas_workspace_is_fixed_before_cuda_starts():
    """The kernel tests run under the poison fixture's deterministic mode, where a CUDA matmul raises
    unless CUBLAS_WORKSPACE_CONFIG was set before cuBLAS started (tests/conftest.py sets it)."""
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") in (":4096:8", ":16:8")


@requires_cuda
@pytest.mark.cuda
def test_cuda_matmul_under_the_poison_fixture(poison):
    a = torch.randn(64, 64, device="cuda", dtype=torch.float16)
    assert torch.isfinite(a @ a).all()

TRITON_MARKS = [needs("triton"), pytest.mark.triton]
CUDA_MARKS = [needs("cuda"), pytest.mark.cuda]
# The CUDA kernel runs fp16/bf16 on tensor cores; fp32 is Triton's (tf32x3 dots, also on tensor cores).
BACKEND_DTYPES = [pytest.param("triton", dt, marks=TRITON_MARKS, id=f"triton-{str(dt)[6:]}")
                  for dt in (torch.float32, torch.float16, torch.bfloat16)] + \
                 [pytest.param("cuda", dt, marks=CUDA_MARKS, id=f"cuda-{str(dt)[6:]}")
                  for dt in (torch.float16, torch.bfloat16)]
# Every padded head size of both kernels, odd d (element loads, zero-padded columns) and tails.
SIZES = [(32, 1), (32, 16), (64, 255), (128, 256), (256, 16), (32, 1024), (33, 70), (200, 65)]


def interpreted(backend: str) -> bool:
    return backend == "triton" and not torch.cuda.is_available()


def assert_close_to_float64(out, ref, q, k, v, scale=None):
    """fp32 within 1e-5; fp16/bf16 by flash attention's rule: no worse than twice eager PyTorch in
    the same dtype (+1e-6 for the case where eager is exact)."""
    err = rel_err(out, ref)
    if out.dtype == torch.float32:
        assert err < 1e-5, err
        return
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    eager = torch.softmax((q @ k.transpose(-1, -2)).float() * scale, -1).to(q.dtype) @ v
    assert err <= 2 * rel_err(eager, ref) + 1e-6, (err, rel_err(eager, ref))


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("d,L", SIZES, ids=[f"d{d}-L{L}" for d, L in SIZES])
@pytest.mark.parametrize("heads", [1, 4])
def test_kernel_matches_float64(backend, dtype, d, L, heads, gen, poison):
    if interpreted(backend) and heads == 4 and L > 256:
        pytest.skip("kept small under the interpreter: one head covers the larger sizes")
    dev = backend_device(backend)
    q, k, v = (torch.randn(2, heads, L, d, generator=gen, dtype=torch.float64) for _ in range(3))
    ref = df.reference.attention(q, k, v)
    qd, kd, vd = (t.to(dev, dtype) for t in (q, k, v))
    out = df.attention(qd, kd, vd, backend=backend)
    assert out.dtype == dtype and out.shape == q.shape and out.device == qd.device
    assert_close_to_float64(out, ref, qd, kd, vd)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuda: no GPU")
@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("d", [32, 64, 128, 256])
@pytest.mark.parametrize("L", [1, 16, 255, 256, 1024])
@pytest.mark.parametrize("heads", [1, 4])
def test_kernel_full_grid_on_gpu(backend, dtype, d, L, heads, gen, poison):
    """Every d x L x heads x dtype of the issue (the interpreter runs the pairs above)."""
    q, k, v = (torch.randn(2, heads, L, d, generator=gen, dtype=torch.float64) for _ in range(3))
    qd, kd, vd = (t.to("cuda", dtype) for t in (q, k, v))
    out = df.attention(qd, kd, vd, backend=backend)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close_to_float64(out, df.reference.attention(q, k, v), qd, kd, vd)


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
def test_kernel_strided_inputs_and_cross_lengths(backend, dtype, gen):
    dev = backend_device(backend)
    qkv = torch.randn(2, 40, 3 * 64, generator=gen).to(dev, dtype)  # [B, L, 3C] as a fused projection writes it
    q, k, v = (t.reshape(2, 40, 1, 64).transpose(1, 2) for t in qkv.split(64, dim=-1))
    assert not q.is_contiguous()
    q64, k64, v64 = q.double(), k.double(), v.double()
    qkv_before = qkv.clone()
    assert_close_to_float64(df.attention(q, k, v, backend=backend), df.reference.attention(q64, k64, v64), q, k, v)
    kk, vv = k[:, :, :17], v[:, :, :17]
    assert_close_to_float64(df.attention(q, kk, vv, scale=0.2, backend=backend),
                            df.reference.attention(q64, kk.double(), vv.double(), scale=0.2), q, kk, vv, 0.2)
    # d not the innermost dimension: no vector loads
    qs, ks, vs = (layout(t.contiguous(), "strided") for t in (q, k, v))
    assert qs.stride(-1) != 1
    assert_close_to_float64(df.attention(qs, ks, vs, backend=backend), df.reference.attention(q64, k64, v64), q, k, v)
    # d innermost, but a row pitch of 70 elements (not 16-byte multiples): no vector loads either
    wide = torch.randn(3, 2, 40, 70, generator=gen).to(dev, dtype)
    qw, kw, vw = (wide[i:i + 1, :, :, :64] for i in range(3))
    assert qw.stride(-1) == 1 and qw.stride(-2) == 70
    assert_close_to_float64(df.attention(qw, kw, vw, backend=backend),
                            df.reference.attention(qw.double(), kw.double(), vw.double()), qw, kw, vw)
    # one key/value head read by every query head (stride 0 over heads), as multi-query attention does
    k1, v1 = k.expand(2, 3, 40, 64), v.expand(2, 3, 40, 64)
    q3 = qkv[..., :64].reshape(2, 40, 1, 64).expand(2, 40, 3, 64).transpose(1, 2) * torch.tensor(
        [1.0, -0.5, 2.0], device=dev, dtype=dtype).view(1, 3, 1, 1)
    assert k1.stride(1) == 0
    assert_close_to_float64(df.attention(q3, k1, v1, backend=backend),
                            df.reference.attention(q3.double(), k1.double(), v1.double()), q3, k1, v1)
    assert torch.equal(qkv, qkv_before)


@pytest.mark.parametrize("backend", GPU_KERNEL_BACKENDS)
def test_gpu_offsets_past_int32(backend, past_int32, poison):
    """q, k, v and the output over 2^31 bfloat16 elements each (4 GiB), B x H = 131077 rows of the grid:
    every output element written, and the last four batch entries, which start past what an int32
    offset reaches, within flash attention's rule against the float64 reference."""
    B = batch_past_int32(256 * 64)
    q, k, v = (torch.randn(B, 1, 256, 64, generator=past_int32, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    out = df.attention(q, k, v, backend=backend)
    assert out.numel() > 2**31 and bool(torch.isfinite(out).all())
    tail = slice(B - 4, B)
    qt, kt, vt = q[tail], k[tail], v[tail]
    assert_close_to_float64(out[tail], df.reference.attention(qt.double(), kt.double(), vt.double()), qt, kt, vt)


def unaligned_copy(x: torch.Tensor) -> torch.Tensor:
    """x's values in a contiguous tensor whose data starts one element past a 16-byte boundary."""
    buf = torch.empty(x.numel() + 1, device=x.device, dtype=x.dtype)
    out = buf[1:].view(x.shape)
    out.copy_(x)
    return out


def _tf32(x: torch.Tensor, rounded: bool) -> torch.Tensor:
    """fp32 -> fp32 with tf32's 10-bit mantissa: rounded to nearest (ties away, as cvt.rna.tf32.f32),
    or truncated (what a tensor core does with the low 13 bits of an fp32 operand)."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000 if rounded else bits) & ~0x1FFF).view(torch.float32)


def _emulated_dot(a: torch.Tensor, b: torch.Tensor, precision: str) -> torch.Tensor:
    """a @ b in fp32 with tl.dot's input rounding: products of tf32 values are exact in fp32, so fp32
    matmuls of the rounded operands stand in for the tensor core."""
    if precision == "ieee":
        return a @ b
    if precision == "tf32":
        return _tf32(a, False) @ _tf32(b, False)
    if precision == "tf32-rn":
        return _tf32(a, True) @ _tf32(b, True)
    a_hi, b_hi = _tf32(a, True), _tf32(b, True)  # tf32x3, as Triton splits it
    a_lo, b_lo = _tf32(a - a_hi, False), _tf32(b - b_hi, False)
    return a_lo @ b_hi + a_hi @ b_lo + a_hi @ b_hi


def _emulated_attention(q, k, v, precision):
    s = _emulated_dot(q, k.transpose(-1, -2), precision) * q.shape[-1] ** -0.5
    p = torch.exp(s - s.amax(-1, keepdim=True))
    return _emulated_dot(p, v, precision) / p.sum(-1, keepdim=True)


# The U-Net's attention shapes: the CIFAR-10 DDPM at 16 x 16 (one head of 256) and at 4 x 4, a
# 64-wide multi-head one, and sharper scores (q x 3).
TF32_CASES = [(4, 1, 256, 256, 1.0), (4, 1, 16, 256, 1.0), (2, 4, 256, 64, 1.0), (4, 1, 256, 256, 3.0)]


@pytest.mark.parametrize("B,H,L,d,sharp", TF32_CASES)
def test_tf32x3_is_as_accurate_as_fp32_and_tf32_is_not(B, H, L, d, sharp, gen):
    """Why fp32 attention runs tf32x3 (ddpm_fast/triton/attention.py): with its input rounding emulated
    on the CPU, its error against float64 matches full-fp32 dots (~4e-7), where plain tf32's is 3e-4
    (operands rounded) to 1.5e-3 (truncated).  The interpreter ignores input_precision: the rounding is
    checked here, the kernel on a GPU by the test below."""
    q, k, v = (torch.randn(B, H, L, d, generator=gen, dtype=torch.float64) for _ in range(3))
    q = q * sharp
    ref = df.reference.attention(q, k, v)
    err = {p: rel_err(_emulated_attention(q.float(), k.float(), v.float(), p), ref)
           for p in ("ieee", "tf32x3", "tf32-rn", "tf32")}
    assert err["tf32x3"] < 2 * err["ieee"] and err["tf32x3"] < 1e-6, err  # ratio <= 1.26 over 40 seeds
    assert err["tf32-rn"] > 1e-4 and err["tf32"] > 5e-4, err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuda: no GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("d", [32, 64, 128, 256, 40, 200, 13])
@pytest.mark.parametrize("Lq,Lk", [(1, 1), (1, 130), (65, 1), (77, 200)])
@pytest.mark.parametrize("fmt", ["contiguous", "unaligned"])
def test_cuda_kernel_tiles_tails_and_alignment(dtype, d, Lq, Lk, fmt, gen, poison):
    """Odd Lq and Lk over 1 to 7 key tiles (both cp.async stages, odd and even tile counts) for every
    padded D; d = 40, 200 zero-fill columns in 16-byte chunks, d = 13 takes element loads and element
    o stores; unaligned inputs take element loads with 16-byte o stores."""
    q, k, v = (torch.randn(2, 3, n, d, generator=gen, dtype=torch.float64) for n in (Lq, Lk, Lk))
    qd, kd, vd = (t.to("cuda", dtype) for t in (q, k, v))
    if fmt == "unaligned":
        qd, kd, vd = (unaligned_copy(t) for t in (qd, kd, vd))
        assert qd.data_ptr() % 16 != 0
    before = [t.clone() for t in (qd, kd, vd)]
    out = df.attention(qd, kd, vd, backend="cuda")
    assert out.dtype == dtype and out.shape == q.shape
    assert_close_to_float64(out, df.reference.attention(q, k, v), qd, kd, vd)
    assert all(torch.equal(t, b) for t, b in zip((qd, kd, vd), before))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuda: no GPU")
@pytest.mark.parametrize("B,H,L,d,sharp", TF32_CASES + [(2, 2, 1024, 128, 1.0), (2, 2, 255, 32, 1.0)])
def test_fp32_tensor_core_dots_keep_fp32_accuracy(B, H, L, d, sharp, gen, poison):
    """The Triton fp32 path (tf32x3 on tensor cores) within 2e-6 of float64: about 4e-7 expected, and
    plain tf32 (4e-4 and more) would fail.  Whatever torch's allow_tf32 says."""
    q, k, v = (torch.randn(B, H, L, d, generator=gen, dtype=torch.float64) for _ in range(3))
    q = q * sharp
    ref = df.reference.attention(q, k, v)
    qd, kd, vd = (t.to("cuda", torch.float32) for t in (q, k, v))
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        for allow in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = allow
            out = df.attention(qd, kd, vd, backend="triton")
            assert out.dtype == torch.float32
            assert rel_err(out, ref) < 2e-6, (allow, rel_err(out, ref))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


_MMA_PROBE = r"""
import re, sys, tempfile, torch
from ddpm_fast.triton import compile_gate as gate
gate._init_worker(int(sys.argv[1]), tempfile.mkdtemp())
from ddpm_fast.triton.attention import attention
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for d in (1, 16, 32, 33, 64, 100, 128, 200, 256):
        q = torch.empty(2, 2, 64, d, dtype=dtype)
        gate._WORKER["compiled"] = []
        attention(q, q, q, 0.125)
        ptx = gate._WORKER["compiled"][-1][1].asm["ptx"]
        print(str(dtype)[6:], d, len(re.findall(r"wgmma\.mma_async", ptx)), len(re.findall(r"\bmma\.sync", ptx)))
"""


@pytest.mark.slow
@pytest.mark.compile_only
@pytest.mark.triton
@pytest.mark.parametrize("arch", [80, 90])
def test_dots_compile_to_tensor_core_instructions(arch):
    """Compiled for sm_90 (the compile gate's stand-in target), every dot is a wgmma but fp32's at
    d = 256 (mma.sync: a 64-row wgmma tile spills there); for sm_80, mma.sync.  No dtype falls back to
    FMA dots."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _MMA_PROBE, str(arch)], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.split()
    assert len(lines) == 4 * 3 * 9, r.stdout
    for line in r.stdout.splitlines():
        dtype, d, wgmma, mma = line.split()
        wants_wgmma = arch == 90 and not (dtype == "float32" and int(d) > 128)
        assert (int(wgmma) > 0, int(mma) > 0) == (wants_wgmma, not wants_wgmma), line


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuda: no GPU")
def test_cuda_kernel_refuses_what_it_cannot_run(gen):
    q = torch.randn(1, 2, 8, 64, generator=gen).cuda()
    with pytest.raises(df.BackendUnavailableError, match="fp16/bf16 on tensor cores"):
        df.attention(q, q, q, backend="cuda")
    assert rel_err(df.attention(q, q, q), df.reference.attention(q.double(), q.double(), q.double())) < 1e-5
    big = torch.randn(1, 1, 8, 320, generator=gen).cuda().half()
    with pytest.raises(df.BackendUnavailableError, match="d=320"):
        df.attention(big, big, big, backend="cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuda: no GPU")
def test_cuda_kernel_opcheck(gen):
    q, k, v = (torch.randn(2, 3, n, 40, generator=gen).cuda().half() for n in (9, 13, 13))
    torch.library.opcheck(torch.ops.ddpm_fast.attention.default, (q, k, v, 0.25))


def test_fake_kernel_shape():
    if not hasattr(torch.ops.ddpm_fast, "attention"):
        pytest.skip(f"the extension is not loaded: {df.available_backends()['cpu']}")
    q, k, v = (torch.empty(2, 3, n, 40, device="meta", dtype=torch.bfloat16) for n in (9, 13, 13))
    out = torch.ops.ddpm_fast.attention(q, k, v, 0.25)
    assert out.shape == (2, 3, 9, 40) and out.dtype == torch.bfloat16 and out.is_contiguous()


def test_large_head_dim_falls_back_once(gen):
    q = torch.randn(1, 1, 8, 320, generator=gen)
    out = df.attention(q, q, q)  # auto: SDPA (CPU), or SDPA with a one-time warning above d = 256 on a GPU
    assert rel_err(out, df.reference.attention(q.double(), q.double(), q.double())) < 1e-5
    if df.available_backends()["triton"] is True:
        with pytest.raises(df.BackendUnavailableError, match="d=320 is above"):
            df.attention(q.to(backend_device("triton")), q.to(backend_device("triton")),
                         q.to(backend_device("triton")), backend="triton")


@pytest.mark.parametrize("dtype,capability,triton_ready,want", [
    (torch.bfloat16, (9, 0), True, "cuda"), (torch.float16, (8, 0), True, "cuda"),
    (torch.float32, (9, 0), True, "triton"), (torch.float16, (7, 5), True, "triton"),
    (torch.float32, (9, 0), False, "sdpa"), (torch.float16, (7, 5), False, "sdpa"),
])
def test_auto_goes_on_to_the_next_kernel_where_one_refuses(dtype, capability, triton_ready, want, monkeypatch):
    """ops.attention's walk down ops.KERNELS on a GPU, with the kernels stubbed: CUDA where it takes
    the dtype and the GPU, else Triton, else SDPA (runs without a GPU)."""
    from ddpm_fast import ops

    tri = pytest.importorskip("ddpm_fast.triton.attention")
    ran = []
    monkeypatch.setattr(ops, "_STATUS", {"reference": True, "cpu": True, "cuda": True,
                                         "triton": True if triton_ready else "triton: not installed"})
    monkeypatch.setattr(ops, "pick_backend", lambda *args, **kwargs: "cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.ops.ddpm_fast, "attention", lambda q, *_: ran.append("cuda") or q, raising=False)
    monkeypatch.setattr(tri, "attention", lambda q, *_: ran.append("triton") or q)
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, *_, **__: ran.append("sdpa") or q)
    q = torch.randn(1, 1, 4, 8).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the SDPA fallback's one-time warning
        assert ops.attention(q, q, q) is q
    assert ran == [want]


@pytest.mark.cuda
@pytest.mark.triton
@requires_cuda
@needs("cuda")
@needs("triton")
@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 0),
                    reason="the CUDA attention kernel needs sm_80 (auto takes Triton before it)")
def test_auto_runs_cuda_for_16_bit_and_triton_for_fp32(gen, monkeypatch):
    """backend='auto' on a GPU takes the CUDA kernel for fp16/bf16 (the faster one in the H200 record,
    ops.KERNELS) and goes on to Triton for fp32, which the CUDA kernel refuses."""
    import ddpm_fast.triton.attention as tri

    ran, real = [], tri.attention
    monkeypatch.setattr(tri, "attention", lambda *args: ran.append(args[0].dtype) or real(*args))
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        q, k, v = (torch.randn(2, 3, n, 64, generator=gen).to("cuda", dtype) for n in (70, 45, 45))
        out = df.attention(q, k, v)
        ref = df.reference.attention(*(t.cpu().double() for t in (q, k, v)))
        assert out.dtype == dtype and rel_err(out.cpu(), ref) < (1e-5 if dtype == torch.float32 else 1e-2)
        if dtype != torch.float32:
            assert torch.equal(out, df.attention(q, k, v, backend="cuda"))
    assert ran == [torch.float32]


@pytest.mark.parametrize("heads,rescale,residual", [(1, 1.0, True), (2, 2.0, True), (1, 1.0, False)])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_fused_processor_matches_diffusers_attention(heads, rescale, residual, fmt, gen):
    pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import Attention

    from ddpm_fast.modules import FusedAttnProcessor

    C = 64
    attn = Attention(C, heads=heads, dim_head=C // heads, norm_num_groups=32, eps=1e-6, residual_connection=residual,
                     rescale_output_factor=rescale, bias=True, upcast_softmax=True,
                     _from_deprecated_attn_block=True).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        x = layout(torch.randn(2, C, 5, 6, generator=gen), fmt)
        ref = attn.double()(x.double())
        attn.float().set_processor(FusedAttnProcessor())
        out = attn(x)
    assert out.shape == x.shape
    assert rel_err(out, ref) < 1e-5


def test_our_block_matches_reference_block(gen):
    from ddpm_fast.models import AttentionBlock

    blk = AttentionBlock(64, groups=32, eps=1e-6).eval()
    with torch.no_grad():
        for p in blk.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        x = torch.randn(3, 64, 4, 7, generator=gen)
        ref = df.reference.attention_block(x.double(), *(p.double() for p in (
            blk.group_norm.weight, blk.group_norm.bias, blk.to_q.weight, blk.to_q.bias, blk.to_k.weight,
            blk.to_k.bias, blk.to_v.weight, blk.to_v.bias, blk.to_out[0].weight, blk.to_out[0].bias)), eps=1e-6)
        assert rel_err(blk(x), ref) < 1e-5
        with torch.no_grad():
            blk.to_q.weight.mul_(0.5)  # the cached q/k/v weight follows the module's parameters
        ref2 = df.reference.attention_block(x.double(), *(p.double() for p in (
            blk.group_norm.weight, blk.group_norm.bias, blk.to_q.weight, blk.to_q.bias, blk.to_k.weight,
            blk.to_k.bias, blk.to_v.weight, blk.to_v.bias, blk.to_out[0].weight, blk.to_out[0].bias)), eps=1e-6)
        assert rel_err(blk(x), ref2) < 1e-5
