"""The noise contract (docs/architecture.md) in plain PyTorch integer arithmetic.

z[i, j] at (seed, t, stream) = BoxMuller4(Philox4x32_10(
    counter=(j // 4, i, t, stream), key=(seed & 0xffffffff, seed >> 32)))[j % 4]

uint32 words live in int64 tensors; products of two words are split into 16-bit
halves so nothing overflows int64.  Runs on any device torch supports.
"""

from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch

M32 = 0xFFFFFFFF
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
UNIFORM_SCALE = 4.6566127342e-10  # 2**-31, as Triton's uint_to_uniform_float
TWO_PI = 6.2831855  # float32(2*pi), as the kernels use it
STREAM_STEP, STREAM_Q_SAMPLE, STREAM_INIT = 0, 1, 2


def _mulhilo(a: torch.Tensor, m: int) -> Tuple[torch.Tensor, torch.Tensor]:
    a_hi, a_lo = a >> 16, a & 0xFFFF
    p1, p0 = a_hi * m, a_lo * m  # each < 2**48
    lo = (((p1 & 0xFFFF) << 16) + p0) & M32
    hi = (p1 + (p0 >> 16)) >> 16
    return hi, lo


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Random123's Philox4x32-10 on int64 tensors holding uint32 words (broadcasting)."""
    words = (c0, c1, c2, c3, k0, k1)
    # Python ints among the words become tensors on the tensors' device: broadcast_tensors does not move them.
    device = next((v.device for v in words if isinstance(v, torch.Tensor)), None)
    c0, c1, c2, c3, k0, k1 = torch.broadcast_tensors(*[torch.as_tensor(v, dtype=torch.int64, device=device) for v in words])
    for r in range(10):
        if r:
            k0 = (k0 + PHILOX_W0) & M32
            k1 = (k1 + PHILOX_W1) & M32
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def uint_to_uniform(x: torch.Tensor) -> torch.Tensor:
    """uint32 word -> float32 in [0, 1), bit-for-bit as Triton's uint_to_uniform_float."""
    s = torch.where(x >= 2**31, x - 2**32, x)  # bitcast to int32
    s = torch.where(s < 0, -s - 1, s)
    return s.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32)


def box_muller(u1: torch.Tensor, u2: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    u1 = torch.clamp_min(u1, 1e-7)
    r = torch.sqrt(-2.0 * torch.log(u1))
    theta = torch.tensor(TWO_PI, dtype=torch.float32) * u2
    return r * torch.cos(theta), r * torch.sin(theta)


def split_seed(seed: int) -> Tuple[int, int]:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed: expected an integer in [0, 2**64), got {seed}")
    return seed & M32, seed >> 32


def philox_randn(
    shape: Sequence[int],
    seed: int,
    t: Union[int, torch.Tensor] = 0,
    stream: int = STREAM_STEP,
    sample_offset: int = 0,
    device: Union[str, torch.device, None] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normals [B, *sample] following the noise contract.

    ``t`` is a scalar or a per-sample LongTensor [B]; sample i of the result has global
    index ``sample_offset + i``.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 1:
        raise ValueError("shape: expected at least a batch dimension")
    device = torch.device(device) if device is not None else (t.device if isinstance(t, torch.Tensor) else torch.device("cpu"))
    i = torch.arange(shape[0], dtype=torch.int64, device=device) + sample_offset
    return philox_randn_at(shape, seed, t, i, stream, dtype)


def philox_randn_at(shape: Sequence[int], seed: int, t: Union[int, torch.Tensor], sample: torch.Tensor,
                    stream: int = STREAM_STEP, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """philox_randn with each row's global sample index given: ``sample`` is an int64 [B] tensor."""
    shape = tuple(int(s) for s in shape)
    B = shape[0]
    n = 1
    for s in shape[1:]:
        n *= s
    k0, k1 = split_seed(seed)
    device = sample.device
    tt = torch.as_tensor(t, dtype=torch.int64, device=device).reshape(-1)
    tt = tt.expand(B) if tt.numel() == 1 else tt
    i = sample.to(torch.int64)
    groups = (n + 3) // 4
    g = torch.arange(groups, dtype=torch.int64, device=device)
    r0, r1, r2, r3 = philox4x32_10(g[None, :], (i & M32)[:, None], (tt & M32)[:, None], stream & M32, k0, k1)
    n0, n1 = box_muller(uint_to_uniform(r0), uint_to_uniform(r1))
    n2, n3 = box_muller(uint_to_uniform(r2), uint_to_uniform(r3))
    z = torch.stack([n0, n1, n2, n3], dim=-1).reshape(B, groups * 4)[:, :n]
    return z.reshape(shape).to(dtype)
