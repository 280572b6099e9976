// Flash attention forward on tensor cores (mma.sync m16n8k16, fp16/bf16 in, fp32 accumulate):
//   o[b, h, i] = sum_j softmax_j(q[b, h, i] . k[b, h, j] * scale) v[b, h, j]
// with an online softmax over key tiles, so the Lq x Lk scores never leave registers.
//
// Grid: one 128-thread block per (64 queries, b, h); each of the 4 warps owns 16 query rows.
// Shared memory: two stages of [k tile; v tile], [BN, D] each (BN = 64, or 32 for D = 256), rows
// padded to D + 8 halves: 4 BN (D + 8) 2 bytes = 20, 36, 68, 66 KB for D = 32, 64, 128, 256
// (above 48 KB through cudaFuncSetAttribute; sm_80 allows 163 KB).  The q tile [64, D] lands in
// stage 1 together with key tile 0 in stage 0; each warp then ldmatrix-loads its q A fragments
// once and keeps them in registers.  Tiles move by 16-byte cp.async, tile i + 1 in flight while
// tile i is computed, when the last dim is contiguous and 16-byte aligned; otherwise by element
// loads.  Rows past L and columns past d are zero-filled (cp.async src-size 0), so tails need no
// masking beyond setting scores of missing keys to -inf; d is padded to D in {32, 64, 128, 256}.
// k and v reach the B fragments by ldmatrix.x4 (.trans for v).  The fragment layouts of
// m16n8k16 are fixed by PTX, so the scores' accumulator registers are re-packed in place as the
// A operand of p v (the FlashAttention-2 trick), and the per-row rescaling of o happens in
// registers: each lane owns rows g and g + 8 of its warp's 16.  p is rounded to the input dtype
// for the p v product (as flash attention does); the row sums stay fp32.  o is normalized,
// rounded and staged in shared memory, then stored as 16-byte row chunks (element stores when
// d % 8 != 0).  Per key tile and warp: D BN / 64 HMMA and D BN / 128 ldmatrix.x4.
// Bytes per head: 2 Lq d sizeof(T) (q in, o out) + 2 Lk d sizeof(T) per 64-query tile (k and v,
// re-read by every tile, mostly from L2).  FLOPs: 4 Lq Lk D per head (+ ~5 Lq Lk for the softmax).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cstdint>

#include "ddpm_fast/launch.h"

namespace ddpm_fast {
namespace {

constexpr int kThreads = 128;
constexpr int kBM = 64;  // queries per block: 4 warps x 16 rows
constexpr int kMaxHeadDim = 256;

struct AttnArgs {
  const uint16_t *q, *k, *v;  // fp16 or bf16 bits
  uint16_t* o;                // contiguous [B, H, Lq, d]
  int64_t sq[4], sk[4], sv[4];  // element strides of b, h, l, d
  int64_t H, Lq, Lk, d, q_tiles;
  float scale_log2;  // scale * log2(e): the softmax runs on exp2
  bool vec;          // 16-byte cp.async tile loads are legal for q, k and v
  bool vec_out;      // 16-byte o stores are legal
};

// The two input types: the mma instruction and f32 -> packed pair (round to nearest even).
struct Fp16 {
  static __device__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ uint32_t pack(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
};

struct Bf16 {
  static __device__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
};

template <int D>
struct Tile {
  // Shared-memory row pitch: 8 extra halves (16 bytes) shift consecutive rows by 4 banks, so each
  // 8-row phase of an ldmatrix (8 rows x 16 bytes) hits 32 distinct banks, and every row stays
  // 16-byte aligned as ldmatrix and cp.async need.
  static constexpr int kPitch = D + 8;
  // Keys per tile: keeps the scores at 16 registers per lane and (D = 256) the q fragments and
  // o accumulators within the register file.
  static constexpr int kBN = D > 128 ? 32 : 64;
  // Two stages of [k tile; v tile] (2 kBN rows each).  q is staged in stage 1 before the first
  // key tile needs it, and the normalized o in stage 0 after the last one.
  static constexpr int kStageRows = 2 * kBN;
  static constexpr size_t kSmemBytes = static_cast<size_t>(2 * kStageRows) * kPitch * sizeof(uint16_t);
  static_assert(kBM <= kStageRows, "the q tile must fit in one stage");
  // Blocks per SM the register budget must allow (at most 65536 / (128 kMinBlocks) registers):
  // left alone, ptxas spends slack on hoisted addresses (D = 64 took 165 registers, 3 blocks).
  // sm_90 then needs 80, 128, 168, 252 registers, without spills, for D = 32, 64, 128, 256; sm_80's
  // code for D = 64 spills at 128 registers, so it gets 3 blocks' budget there.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  static constexpr int kMinBlocks = D <= 32 ? 6 : (D <= 64 ? 3 : (D <= 128 ? 3 : 1));
#else
  static constexpr int kMinBlocks = D <= 32 ? 6 : (D <= 64 ? 4 : (D <= 128 ? 3 : 1));
#endif
};

__device__ uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

// 16 bytes global -> shared without a register round trip; src_bytes = 0 writes 16 zero bytes
// and reads nothing (`g` is then any valid address: the tile's base).
__device__ void cp_async16(uint16_t* s, const uint16_t* g, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(s)), "l"(g), "r"(src_bytes)
               : "memory");
}
__device__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 b16 matrices; lane l gives the row address of matrix l / 8, row l % 8, and receives in
// r[i] row l / 4, columns 2 (l % 4) and +1 of matrix i (.trans: column l / 4, rows 2 (l % 4) and +1).
__device__ void ldmatrix_x4(uint32_t (&r)[4], const uint16_t* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ void ldmatrix_x4_trans(uint32_t (&r)[4], const uint16_t* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// rows x D tile from global (row `r` at g + r * row_stride) into shared memory, zero past
// valid_rows (>= 1) and d.  vec: 16-byte cp.async chunks, left in flight for the caller's
// commit/wait; otherwise element loads and stores, visible after the caller's __syncthreads.
template <int D, int ROWS>
__device__ void load_tile(uint16_t* s, const uint16_t* g, int64_t row_stride, int64_t col_stride, int64_t valid_rows,
                          int64_t d, bool vec) {
  if (vec) {
    constexpr int kChunks = D / 8;  // 16-byte chunks per row; vec implies d % 8 == 0
#pragma unroll 1  // unrolled, the chunk offsets stay live across the key loop and cost registers
    for (int i = threadIdx.x; i < ROWS * kChunks; i += kThreads) {
      const int r = i / kChunks, c = (i % kChunks) * 8;
      const bool valid = r < valid_rows && c < d;
      cp_async16(s + r * Tile<D>::kPitch + c, valid ? g + r * row_stride + c : g, valid ? 16 : 0);
    }
  } else {
    for (int i = threadIdx.x; i < ROWS * D; i += kThreads) {
      const int r = i / D, c = i % D;
      s[r * Tile<D>::kPitch + c] = (r < valid_rows && c < d) ? g[r * row_stride + c * col_stride] : uint16_t{0};
    }
  }
}

__device__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// The fragment addressing below is emulated lane by lane in tests/test_attention_fragments.py
// (ldmatrix and mma.m16n8k16 per the PTX ISA); keep the two in step.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, Tile<D>::kMinBlocks) flash_fwd(const AttnArgs a) {
  constexpr int BN = Tile<D>::kBN, P = Tile<D>::kPitch;
  extern __shared__ uint4 smem_raw[];  // uint4: 16-byte alignment for cp.async, ldmatrix and the o copy
  uint16_t* smem = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* sq = smem + Tile<D>::kStageRows * P;  // stage 1

  const int64_t q_tile = blockIdx.x % a.q_tiles, bh = blockIdx.x / a.q_tiles;
  const int64_t b = bh / a.H, h = bh % a.H, q0 = q_tile * kBM;
  const uint16_t* kg = a.k + b * a.sk[0] + h * a.sk[1];
  const uint16_t* vg = a.v + b * a.sv[0] + h * a.sv[1];
  const int64_t key_tiles = (a.Lk + BN - 1) / BN;
  auto load_kv = [&](int64_t kt, int stage) {
    uint16_t* sk = smem + stage * Tile<D>::kStageRows * P;
    const int64_t k0 = kt * BN;
    load_tile<D, BN>(sk, kg + k0 * a.sk[2], a.sk[2], a.sk[3], a.Lk - k0, a.d, a.vec);
    load_tile<D, BN>(sk + BN * P, vg + k0 * a.sv[2], a.sv[2], a.sv[3], a.Lk - k0, a.d, a.vec);
  };
  load_tile<D, kBM>(sq, a.q + b * a.sq[0] + h * a.sq[1] + q0 * a.sq[2], a.sq[2], a.sq[3], a.Lq - q0, a.d, a.vec);
  load_kv(0, 0);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  // Lane roles in every m16n8k16 fragment: g = row (mod 8) / key / column group, t = pair index.
  // ldmatrix row addresses (lane / 8 picks the 8x8 matrix, so the result register): for q and v,
  // lanes 0-15 give rows 0-15 at column 0 and lanes 16-31 the same rows at column 8; for k, lanes
  // 0-7, 8-15, 16-23, 24-31 give keys 0-7 at columns 0 and 8, then keys 8-15 at columns 0 and 8,
  // so registers 0-1 and 2-3 are the B fragments of two consecutive 8-key blocks.
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  const int row16 = lane & 15, col8 = (lane >> 4) * 8;
  const int key16 = (lane & 7) + (lane >> 4) * 8, kcol8 = lane & 8;
  // This warp's 16 q rows as A fragments, kept in registers across all key tiles.
  uint32_t qf[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) ldmatrix_x4(qf[kk], sq + (warp * 16 + row16) * P + kk * 16 + col8);

  float o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // rows g and g + 8

  for (int64_t kt = 0; kt < key_tiles; ++kt) {
    const int stage = static_cast<int>(kt & 1);
    __syncthreads();  // every warp is done with the other stage (the previous tile, or q)
    if (kt + 1 < key_tiles) load_kv(kt + 1, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();  // this tile's group has landed; the next one stays in flight
    __syncthreads();
    const uint16_t* sk = smem + stage * Tile<D>::kStageRows * P;
    const uint16_t* sv = sk + BN * P;
    const int keys = static_cast<int>(a.Lk - kt * BN < BN ? a.Lk - kt * BN : BN);  // valid keys in this tile

    // s = q k^T for this warp's 16 rows x BN keys: B = k^T (column-major) is k's rows as stored.
    // One ldmatrix.x4 gives the B fragments of key blocks j and j + 1.
    float s[BN / 8][4];
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int j = 0; j < BN / 8; j += 2) {
        uint32_t kf[4];
        ldmatrix_x4(kf, sk + (j * 8 + key16) * P + kk * 16 + kcol8);
        T::mma(s[j], qf[kk], kf[0], kf[1]);
        T::mma(s[j + 1], qf[kk], kf[2], kf[3]);
      }
    }

    // Online softmax.  s[j][e] is row g + 8 * (e >> 1), key 8 j + 2 t + (e & 1) of the tile; the
    // other three lanes of the quad hold the rest of both rows.
    float mx[2] = {m[0], m[1]};
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const bool key = j * 8 + 2 * t + (e & 1) < keys;
        s[j][e] = key ? s[j][e] * a.scale_log2 : -INFINITY;
        mx[e >> 1] = fmaxf(mx[e >> 1], s[j][e]);
      }
    }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = quad_max(mx[r]);  // finite: the tile's first key (or an earlier tile's) is always present
      alpha[r] = exp2f(m[r] - mx[r]);
      m[r] = mx[r];
      l[r] *= alpha[r];
    }
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[j][e] = exp2f(s[j][e] - m[e >> 1]);
        l[e >> 1] += s[j][e];  // this lane's partial row sum; the quad is reduced once at the end
      }
    }
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      o[n][0] *= alpha[0];
      o[n][1] *= alpha[0];
      o[n][2] *= alpha[1];
      o[n][3] *= alpha[1];
    }

    // o += p v: the accumulators of key columns 16 kk .. 16 kk + 15 are exactly the A fragment of
    // p.  B = v[key][dim] is row-major, so ldmatrix.trans turns each stored 8 keys x 8 dims block
    // into the (2 t, 2 t + 1) key pairs at dim g; one x4 covers dim blocks n and n + 1.
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      const uint32_t pf[4] = {T::pack(s[2 * kk][0], s[2 * kk][1]), T::pack(s[2 * kk][2], s[2 * kk][3]),
                              T::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              T::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int n = 0; n < D / 8; n += 2) {
        uint32_t vf[4];
        ldmatrix_x4_trans(vf, sv + (kk * 16 + row16) * P + n * 8 + col8);
        T::mma(o[n], pf, vf[0], vf[1]);
        T::mma(o[n + 1], pf, vf[2], vf[3]);
      }
    }
  }

  // Normalize, round, and stage this warp's 16 x D rows of o in shared memory (stage 0, rows
  // 16 warp ..), so that global stores are whole 16-byte row chunks.
  const float inv[2] = {1.f / quad_sum(l[0]), 1.f / quad_sum(l[1])};
  __syncthreads();  // every warp is done with the last tile's stage
  uint16_t* so = smem + warp * 16 * P;
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      *reinterpret_cast<uint32_t*>(so + (g + 8 * r) * P + n * 8 + 2 * t) =
          T::pack(o[n][2 * r] * inv[r], o[n][2 * r + 1] * inv[r]);
    }
  }
  __syncwarp();
  const int64_t row0 = q0 + warp * 16;
  uint16_t* og = a.o + (bh * a.Lq + row0) * a.d;
  if (a.vec_out) {
    constexpr int kChunks = D / 8;
    for (int i = lane; i < 16 * kChunks; i += 32) {
      const int r = i / kChunks, c = (i % kChunks) * 8;
      if (row0 + r < a.Lq && c < a.d) {
        *reinterpret_cast<uint4*>(og + r * a.d + c) = *reinterpret_cast<const uint4*>(so + r * P + c);
      }
    }
  } else {
    for (int i = lane; i < 16 * D; i += 32) {
      const int r = i / D, c = i % D;
      if (row0 + r < a.Lq && c < a.d) og[r * a.d + c] = so[r * P + c];
    }
  }
}

template <typename T, int D>
void launch(const AttnArgs& args, int64_t blocks, cudaStream_t stream) {
  constexpr size_t bytes = Tile<D>::kSmemBytes;
  C10_CUDA_CHECK(cudaFuncSetAttribute(flash_fwd<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
  flash_fwd<T, D><<<static_cast<unsigned>(blocks), kThreads, bytes, stream>>>(args);
}

template <typename T>
void launch_for_head_dim(const AttnArgs& args, int64_t blocks, cudaStream_t stream) {
  if (args.d <= 32) {
    launch<T, 32>(args, blocks, stream);
  } else if (args.d <= 64) {
    launch<T, 64>(args, blocks, stream);
  } else if (args.d <= 128) {
    launch<T, 128>(args, blocks, stream);
  } else {
    launch<T, 256>(args, blocks, stream);
  }
}

bool vector_loads_ok(const at::Tensor& x) {
  return x.stride(3) == 1 && x.stride(0) % 8 == 0 && x.stride(1) % 8 == 0 && x.stride(2) % 8 == 0 &&
         aligned16(x.data_ptr());
}

at::Tensor attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v: expected [B, heads, L, d] tensors");
  TORCH_CHECK(k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
              "q, k, v: expected q [B, h, Lq, d] and k, v [B, h, Lk, d]");
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16,
              "q: the CUDA attention kernel (tensor cores) takes float16 or bfloat16, got ", dtype);
  TORCH_CHECK(k.scalar_type() == dtype && v.scalar_type() == dtype, "k, v: expected q's dtype ", dtype);
  TORCH_CHECK(q.is_cuda() && k.device() == q.device() && v.device() == q.device(),
              "q, k, v: expected CUDA tensors on one device");
  const int64_t d = q.size(3);
  TORCH_CHECK(d >= 1 && d <= kMaxHeadDim, "q: head dimension d must be in [1, ", kMaxHeadDim, "], got ", d);
  TORCH_CHECK(k.size(2) >= 1, "k: expected at least one key");
  TORCH_CHECK(scale > 0, "scale: expected a positive float, got ", scale);
  const c10::cuda::CUDAGuard guard(q.device());
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.device().index()));
  TORCH_CHECK(major >= 8, "attention (cuda): mma.sync on fp16/bf16 needs compute capability 8.0 or newer, got ",
              major, ".x");

  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2), d}, q.options());
  if (out.numel() == 0) return out;
  AttnArgs args{};
  args.q = static_cast<const uint16_t*>(q.data_ptr());
  args.k = static_cast<const uint16_t*>(k.data_ptr());
  args.v = static_cast<const uint16_t*>(v.data_ptr());
  args.o = static_cast<uint16_t*>(out.data_ptr());
  for (int i = 0; i < 4; ++i) {
    args.sq[i] = q.stride(i);
    args.sk[i] = k.stride(i);
    args.sv[i] = v.stride(i);
  }
  args.H = q.size(1);
  args.Lq = q.size(2);
  args.Lk = k.size(2);
  args.d = d;
  args.q_tiles = (args.Lq + kBM - 1) / kBM;
  args.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  args.vec = d % 8 == 0 && vector_loads_ok(q) && vector_loads_ok(k) && vector_loads_ok(v);
  args.vec_out = d % 8 == 0 && aligned16(out.data_ptr());
  const int64_t blocks = args.q_tiles * q.size(0) * q.size(1);
  TORCH_CHECK(blocks < (int64_t{1} << 31), "q: B * heads * ceil(Lq / 64) = ", blocks, " blocks exceed the grid");
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (dtype == at::kHalf) {
    launch_for_head_dim<Fp16>(args, blocks, stream);
  } else {
    launch_for_head_dim<Bf16>(args, blocks, stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) { m.impl("attention", &attention_cuda); }

}  // namespace ddpm_fast
