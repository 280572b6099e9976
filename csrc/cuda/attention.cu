// Flash attention forward on tensor cores (mma.sync m16n8k16, fp16/bf16 in, fp32 accumulate):
//   o[b, h, i] = sum_j softmax_j(q[b, h, i] . k[b, h, j] * scale) v[b, h, j]
// with an online softmax over key tiles, so the Lq x Lk scores never leave registers.
//
// Grid: one 128-thread block per (64 queries, b, h); each of the 4 warps owns 16 query rows.
// The block stages its q tile [64, D] once and each key/value tile [BN, D] (BN = 64, or 32 for
// D = 256) in shared memory: 128-bit loads when the last dim is contiguous and 16-byte aligned,
// element loads for any other strides; rows past L and columns past d are zero-filled, so tails
// need no masking beyond setting scores of missing keys to -inf.  d is padded to D in {32, 64,
// 128, 256}.  The fragment layouts of m16n8k16 are fixed by PTX, so the scores' accumulator
// registers are re-packed in place as the A operand of p v (the FlashAttention-2 trick), and the
// per-row rescaling of o happens in registers: each lane owns rows g and g + 8 of its warp's 16.
// p is rounded to the input dtype for the p v product (as flash attention does); the row sums
// stay fp32.
// Bytes: (2 Lq + 2 Lk) d sizeof(T) per head (q, k, v in and o out; k and v are re-read once per
// 64-query tile).  FLOPs: 4 Lq Lk D per head (+ ~5 Lq Lk for the softmax).
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
  bool vec;          // 128-bit tile loads are legal for q, k and v
};

// The two input types: the mma instruction, f32 -> packed pair, f32 -> stored bits.
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
  static __device__ uint16_t bits(float x) { return __half_as_ushort(__float2half_rn(x)); }
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
  static __device__ uint16_t bits(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }
};

template <int D>
struct Tile {
  // Shared-memory row pitch: 8 extra halves shift consecutive rows by 4 banks, so the fragment
  // loads below (8 rows x 4 words per instruction) hit 32 distinct banks.
  static constexpr int kPitch = D + 8;
  // Keys per tile: keeps the q + k + v tiles at <= 68 KB and the scores at 16 registers per lane.
  static constexpr int kBN = D > 128 ? 32 : 64;
  static constexpr size_t kSmemBytes = static_cast<size_t>(kBM + 2 * kBN) * kPitch * sizeof(uint16_t);
};

// rows x D tile from global (row `r` at g + r * row_stride) into shared memory, zero past
// valid_rows and d.
template <int D, int ROWS>
__device__ void load_tile(uint16_t* s, const uint16_t* g, int64_t row_stride, int64_t col_stride, int64_t valid_rows,
                          int64_t d, bool vec) {
  if (vec) {
    constexpr int kChunks = D / 8;  // 16-byte chunks per row
    for (int i = threadIdx.x; i < ROWS * kChunks; i += kThreads) {
      const int r = i / kChunks, c = (i % kChunks) * 8;
      uint4 val = make_uint4(0u, 0u, 0u, 0u);
      if (r < valid_rows && c < d) val = *reinterpret_cast<const uint4*>(g + r * row_stride + c);
      *reinterpret_cast<uint4*>(s + r * Tile<D>::kPitch + c) = val;
    }
  } else {
    for (int i = threadIdx.x; i < ROWS * D; i += kThreads) {
      const int r = i / D, c = i % D;
      s[r * Tile<D>::kPitch + c] = (r < valid_rows && c < d) ? g[r * row_stride + c * col_stride] : uint16_t{0};
    }
  }
}

__device__ uint32_t ld32(const uint16_t* p) { return *reinterpret_cast<const uint32_t*>(p); }

__device__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) flash_fwd(const AttnArgs a) {
  constexpr int BN = Tile<D>::kBN, P = Tile<D>::kPitch;
  extern __shared__ uint4 smem_raw[];  // uint4: 16-byte alignment for the vector stores
  uint16_t* sq = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* sk = sq + kBM * P;
  uint16_t* sv = sk + BN * P;

  const int64_t tile = blockIdx.x % a.q_tiles, bh = blockIdx.x / a.q_tiles;
  const int64_t b = bh / a.H, h = bh % a.H, q0 = tile * kBM;
  const uint16_t* kg = a.k + b * a.sk[0] + h * a.sk[1];
  const uint16_t* vg = a.v + b * a.sv[0] + h * a.sv[1];
  load_tile<D, kBM>(sq, a.q + b * a.sq[0] + h * a.sq[1] + q0 * a.sq[2], a.sq[2], a.sq[3], a.Lq - q0, a.d, a.vec);

  // Lane roles in every m16n8k16 fragment: g = row (mod 8) / key / column group, t = pair index.
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  const uint16_t* qw = sq + warp * 16 * P;
  float o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // rows g and g + 8

  for (int64_t k0 = 0; k0 < a.Lk; k0 += BN) {
    __syncthreads();  // every warp is done with the previous k, v tiles
    load_tile<D, BN>(sk, kg + k0 * a.sk[2], a.sk[2], a.sk[3], a.Lk - k0, a.d, a.vec);
    load_tile<D, BN>(sv, vg + k0 * a.sv[2], a.sv[2], a.sv[3], a.Lk - k0, a.d, a.vec);
    __syncthreads();

    // s = q k^T for this warp's 16 rows x BN keys: A = q rows (row-major), B = k rows (k^T column-major).
    float s[BN / 8][4];
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint16_t* qa = qw + g * P + kk * 16 + 2 * t;
      const uint32_t af[4] = {ld32(qa), ld32(qa + 8 * P), ld32(qa + 8), ld32(qa + 8 * P + 8)};
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) {
        const uint16_t* kb = sk + (j * 8 + g) * P + kk * 16 + 2 * t;
        T::mma(s[j], af, ld32(kb), ld32(kb + 8));
      }
    }

    // Online softmax.  s[j][e] is row g + 8 * (e >> 1), key k0 + 8 j + 2 t + (e & 1); the other
    // three lanes of the quad hold the rest of both rows.
    float mx[2] = {m[0], m[1]};
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const bool key = k0 + j * 8 + 2 * t + (e & 1) < a.Lk;
        s[j][e] = key ? s[j][e] * a.scale_log2 : -INFINITY;
        mx[e >> 1] = fmaxf(mx[e >> 1], s[j][e]);
      }
    }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = quad_max(mx[r]);  // finite: key k0 (or an earlier tile's) is always present
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
    // p; B = v[key][dim] gathered as pairs of keys (2 t, 2 t + 1) at dim 8 n + g.
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      const uint32_t pf[4] = {T::pack(s[2 * kk][0], s[2 * kk][1]), T::pack(s[2 * kk][2], s[2 * kk][3]),
                              T::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              T::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
      const uint16_t* vb = sv + (kk * 16 + 2 * t) * P + g;
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        const uint16_t* c = vb + n * 8;
        const uint32_t b0 = c[0] | (static_cast<uint32_t>(c[P]) << 16);
        const uint32_t b1 = c[8 * P] | (static_cast<uint32_t>(c[9 * P]) << 16);
        T::mma(o[n], pf, b0, b1);
      }
    }
  }

  const float inv[2] = {1.f / quad_sum(l[0]), 1.f / quad_sum(l[1])};
  uint16_t* og = a.o + bh * a.Lq * a.d;
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t row = q0 + warp * 16 + g + 8 * (e >> 1);
      const int64_t col = n * 8 + 2 * t + (e & 1);
      if (row < a.Lq && col < a.d) og[row * a.d + col] = T::bits(o[n][e] * inv[e >> 1]);
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
