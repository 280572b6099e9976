"""Lane-by-lane emulation of the fragment addressing in csrc/cuda/attention.cu (flash_fwd).

The CUDA kernel cannot run on a machine without a GPU, so this file checks its data movement on the
CPU: ldmatrix and mma.sync.m16n8k16 are emulated from their PTX ISA definitions, fed with exactly the
shared-memory addresses the kernel computes (the expressions below mirror the kernel's), and the
results are compared with q @ k^T and p @ v in numpy.  Section titles are those of the PTX ISA
(numbers as in PTX ISA 8.x, chapter 9.7.14 "Warp Level Matrix Multiply-Accumulate Instructions").
"""
import numpy as np
import pytest

LANES = np.arange(32)
BM, THREADS = 64, 128  # kBM, kThreads


def geometry(D):
    """Tile<D>: row pitch in halves, keys per tile, rows per stage, dynamic shared memory bytes."""
    P = D + 8
    BN = 32 if D > 128 else 64
    stage_rows = 2 * BN
    return P, BN, stage_rows, 2 * stage_rows * P * 2


# ---------------------------------------------------------------- PTX semantics

def ldmatrix_x4(smem, addr, trans=False):
    """ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16 (9.7.14.5.15 "Warp-level matrix load
    instruction: ldmatrix").  addr[l] (in 16-bit elements) is the start of row l % 8 of matrix l // 8:
    "addresses addr0-addr7 correspond to the rows of the first matrix, addr8-addr15 to the rows of
    the second", and so on.  Destination register i of lane l holds two elements of matrix i: without
    .trans row l // 4, columns 2 (l % 4) and 2 (l % 4) + 1 ("a group of four threads loads an entire
    row"); with .trans the matrix is read column-major, so column l // 4, rows 2 (l % 4) and +1.
    Returns regs[lane][i] = (low half, high half)."""
    assert all(a % 8 == 0 for a in addr), "ldmatrix rows must be 16-byte aligned"
    mats = [np.array([smem[addr[8 * i + r]:addr[8 * i + r] + 8] for r in range(8)]) for i in range(4)]
    regs = []
    for lane in LANES:
        g, t = lane // 4, lane % 4
        if trans:
            regs.append([(m[2 * t, g], m[2 * t + 1, g]) for m in mats])
        else:
            regs.append([(m[g, 2 * t], m[g, 2 * t + 1]) for m in mats])
    return regs


def a_coords(i, lane):
    """A (16 x 16, .row) element a_i of a lane (9.7.14.5.8 "Matrix Fragments for mma.m16n8k16 with
    floating point type", figure "MMA .m16n8k16 fragment layout for matrix A with .f16/.bf16 type"):
    row = groupID for a0, a1, a4, a5 else groupID + 8; col = threadID_in_group * 2 + (i & 1), + 8 for
    i >= 4.  Register r of the four .f16x2 registers holds a_{2r} (low half) and a_{2r+1}."""
    g, t = lane // 4, lane % 4
    return g + 8 * (i in (2, 3, 6, 7)), 2 * t + (i & 1) + 8 * (i >= 4)


def b_coords(i, lane):
    """B (16 x 8, .col) element b_i (same section, matrix B figure): row (k) = threadID_in_group * 2
    + (i & 1), + 8 for i >= 2; col = groupID.  Register r holds b_{2r} and b_{2r+1}."""
    g, t = lane // 4, lane % 4
    return 2 * t + (i & 1) + 8 * (i >= 2), g


def c_coords(i, lane):
    """C/D (16 x 8, f32) element c_i (same section, accumulator figure): row = groupID, + 8 for
    i >= 2; col = threadID_in_group * 2 + (i & 1)."""
    g, t = lane // 4, lane % 4
    return g + 8 * (i >= 2), 2 * t + (i & 1)


def mma_m16n8k16(c, a, b0, b1):
    """mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: D = A B + C on the whole warp.  c[lane] is
    4 floats, a[lane] 4 packed pairs, b0/b1[lane] one packed pair each.  Returns the new c."""
    A, B, C = np.zeros((16, 16)), np.zeros((16, 8)), np.zeros((16, 8))
    for lane in LANES:
        for r in range(4):
            for h in range(2):
                A[a_coords(2 * r + h, lane)] = a[lane][r][h]
        for r, reg in enumerate((b0[lane], b1[lane])):
            for h in range(2):
                B[b_coords(2 * r + h, lane)] = reg[h]
        for i in range(4):
            C[c_coords(i, lane)] = c[lane][i]
    Dm = A @ B + C
    return [[Dm[c_coords(i, lane)] for i in range(4)] for lane in LANES]


# ---------------------------------------------------------------- the kernel's addressing

def load_tile(smem, base, x, rows, D, valid_rows, d):
    """load_tile<D, ROWS> with vec = true: 16-byte chunks, zero past valid_rows and d."""
    P = D + 8
    chunks = D // 8
    for tid in range(THREADS):
        for i in range(tid, rows * chunks, THREADS):
            r, c = i // chunks, (i % chunks) * 8
            assert (base + r * P + c) % 8 == 0, "cp.async destinations must be 16-byte aligned"
            valid = r < valid_rows and c < d
            smem[base + r * P + c:base + r * P + c + 8] = x[r, c:c + 8] if valid else 0


def lane_roles():
    """The kernel's per-lane constants (g, t, row16, col8, key16, kcol8)."""
    lane = LANES
    return lane >> 2, lane & 3, lane & 15, (lane >> 4) * 8, (lane & 7) + (lane >> 4) * 8, lane & 8


def warp_tile(smem, D, warp, sq, sk, sv, keys):
    """One warp's s = q k^T, then o = s v, as flash_fwd addresses them (s stands in for p: the
    pack of accumulators into the A operand is what is checked).  Returns (s, o) fragments and the
    staged output rows."""
    P, BN, _, _ = geometry(D)
    g, t, row16, col8, key16, kcol8 = lane_roles()
    qf = [ldmatrix_x4(smem, sq + (warp * 16 + row16) * P + kk * 16 + col8) for kk in range(D // 16)]
    s = [[[0.0] * 4 for _ in LANES] for _ in range(BN // 8)]
    for kk in range(D // 16):
        for j in range(0, BN // 8, 2):
            kf = ldmatrix_x4(smem, sk + (j * 8 + key16) * P + kk * 16 + kcol8)
            s[j] = mma_m16n8k16(s[j], qf[kk], [r[0] for r in kf], [r[1] for r in kf])
            s[j + 1] = mma_m16n8k16(s[j + 1], qf[kk], [r[2] for r in kf], [r[3] for r in kf])
    o = [[[0.0] * 4 for _ in LANES] for _ in range(D // 8)]
    for kk in range(BN // 16):
        pf = [[(s[2 * kk][l][0], s[2 * kk][l][1]), (s[2 * kk][l][2], s[2 * kk][l][3]),
               (s[2 * kk + 1][l][0], s[2 * kk + 1][l][1]), (s[2 * kk + 1][l][2], s[2 * kk + 1][l][3])]
              for l in LANES]
        for n in range(0, D // 8, 2):
            vf = ldmatrix_x4(smem, sv + (kk * 16 + row16) * P + n * 8 + col8, trans=True)
            o[n] = mma_m16n8k16(o[n], pf, [r[0] for r in vf], [r[1] for r in vf])
            o[n + 1] = mma_m16n8k16(o[n + 1], pf, [r[2] for r in vf], [r[3] for r in vf])
    # Output staging: so = smem + warp * 16 * P; pair (o[n][2r], o[n][2r+1]) at row g + 8 r, col 8 n + 2 t.
    so = warp * 16 * P
    staged = np.full(16 * P, np.nan)
    for n in range(D // 8):
        for r in range(2):
            for lane in LANES:
                off = (g[lane] + 8 * r) * P + n * 8 + 2 * t[lane]
                assert (so + off) % 2 == 0, "32-bit shared stores must be 4-byte aligned"
                staged[off:off + 2] = o[n][lane][2 * r], o[n][lane][2 * r + 1]
    return s, o, staged.reshape(16, P)


@pytest.mark.parametrize("D", [32, 64, 128, 256])
def test_fragments_reproduce_qk_and_pv(D):
    rng = np.random.default_rng(D)
    P, BN, stage_rows, _ = geometry(D)
    d, keys, q_rows = D - 8, BN - 3, BM - 5  # tails in every direction: zero fill must hold
    q, k, v = rng.standard_normal((BM, D)), rng.standard_normal((BN, D)), rng.standard_normal((BN, D))
    smem = np.full(4 * BN * P, np.nan)  # padding columns stay NaN: any read of them would show
    stage = 1  # the kernel's first tile: k, v in stage 0, q in stage 1
    sk, sv, sq = 0, BN * P, stage * stage_rows * P
    load_tile(smem, sq, q, BM, D, q_rows, d)
    load_tile(smem, sk, k, BN, D, keys, d)
    load_tile(smem, sv, v, BN, D, keys, d)
    qz, kz, vz = (np.where((np.arange(x.shape[0])[:, None] < n) & (np.arange(D) < d), x, 0.0)
                  for x, n in ((q, q_rows), (k, keys), (v, keys)))
    g, t, *_ = lane_roles()
    for warp in range(THREADS // 32):
        s, o, staged = warp_tile(smem, D, warp, sq, sk, sv, keys)
        S = qz[warp * 16:warp * 16 + 16] @ kz.T
        for j in range(BN // 8):
            for lane in LANES:
                for e in range(4):  # the kernel's reading of s[j][e] (softmax mask and row statistics)
                    row, key = g[lane] + 8 * (e >> 1), j * 8 + 2 * t[lane] + (e & 1)
                    assert s[j][lane][e] == pytest.approx(S[row, key], abs=1e-9)
        O = S @ vz
        np.testing.assert_allclose(staged[:, :D], O, atol=1e-9)
        assert np.isnan(staged[:, D:]).all(), "o staging wrote into the row padding"


@pytest.mark.parametrize("D", [32, 64, 128, 256])
def test_ldmatrix_phases_are_bank_conflict_free(D):
    """Each 8-lane phase of an ldmatrix reads 8 rows of 16 bytes (4 banks each); the D + 8 pitch must
    spread them over all 32 banks, for every address pattern the kernel uses."""
    P, BN, stage_rows, _ = geometry(D)
    _, _, row16, col8, key16, kcol8 = lane_roles()
    patterns = [stage_rows * P + (w * 16 + row16) * P + kk * 16 + col8 for w in range(4) for kk in range(D // 16)]
    patterns += [(j * 8 + key16) * P + kk * 16 + kcol8 for j in range(0, BN // 8, 2) for kk in range(D // 16)]
    patterns += [BN * P + (kk * 16 + row16) * P + n * 8 + col8 for kk in range(BN // 16) for n in range(0, D // 8, 2)]
    for addr in patterns:
        for phase in range(4):
            banks = {(a * 2 // 4 + w) % 32 for a in addr[8 * phase:8 * phase + 8] for w in range(4)}
            assert len(banks) == 32


@pytest.mark.parametrize("D", [32, 64, 128, 256])
def test_shared_memory_plan(D):
    """q fits in stage 1, the staged o in the ring, and the bytes stay under sm_80's 163 KB opt-in
    (the header quotes 20, 36, 68, 66 KB)."""
    P, BN, stage_rows, nbytes = geometry(D)
    assert BM <= stage_rows and 4 * 16 <= 2 * stage_rows
    assert nbytes == {32: 20480, 64: 36864, 128: 69632, 256: 67584}[D] <= 163 * 1024
    assert (P * 2) % 16 == 0
