// GroupNorm with fused input add, scale-shift and SiLU on the GPU:
//   y = act(GN(x + add) * (1 + scale) + shift), statistics in fp32.
//
// A group is n = CG * HW values: CG rows of HW contiguous values in NCHW, HW rows of CG contiguous
// values C apart in channels_last.  The kernels are templated on the layout and on V, the values one
// access moves (16 bytes, 4 values, or 1): the widest that divides the group's contiguous run (HW or
// CG) with every pointer aligned to it, else scalar.  In-group offsets are 32-bit (the launcher
// checks C * HW < 2^31), a vector's position and channel cost one FastDivmod (multiply-high) per
// vector, and only the group's base offset is 64-bit.  Every path works on d = (x - px) + (add - pa),
// relative to the group's pivot (gn_pivot: exact for a large mean with a small spread), and takes
// its variance from centred squares: the on-chip path in two passes over its registers, the others
// from moments (count, mean, M2) merged without cancellation (GnMoments), never as E[d^2] - E[d]^2,
// which loses every digit when one value lies far from the rest.  A [CG] table in shared memory
// (opted in beyond 48 KiB) folds weight, bias, scale, shift (read in float32 or x's dtype: GnParam),
// mean and rstd into z = v A + Cc per channel, so normalising is one FMA per value; gn_onchip reads
// every parameter into it before the statistics, where the loads wait on nothing.
// The group's mean of d and rstd go out (float32 [B, G]) for the backward.
// - gn_onchip: one block per (sample, group) of T threads, the fewest power of two from 64 to 1024
//   (512 for scalar accesses) with 16 T >= n; each thread caches 16 values in registers, the block
//   reduces the mean, then the centred variance, and writes y.  One read + one write.  Taken when
//   the group fits (n <= 16384, 8192 scalar; its table, 12 bytes a channel, in shared memory) and
//   the grid fills the GPU: B*G >= SMs / 2 and B*G*T >= 256 SMs.
// - gn_rows_stats + gn_rows_finalize + gn_rows_norm: otherwise, for channels_last groups whose CG
//   values a position fill less than a 32-byte sector (and C / V <= 256): grid (S, B) of 256
//   threads, each block a tile of whole rows (positions x C channels, contiguous: full sectors);
//   a thread keeps one vector column, so one group and V channels, for the tile.  Pass 1 takes the
//   moments of d per group into [B, S, G] partials (each thread's in turn, in a fixed order: no
//   atomics, so a run repeats bit for bit); the finalize, grid (G, B), merges them into mean, rstd
//   and the [B, C] (A, Cc) table; pass 2 normalises with the thread's coefficients in registers.
//   Two reads + one write.
// - gn_stats + gn_norm: otherwise (batch 1 must not leave SMs idle), grid (B*G, S) of 256 threads,
//   S slices of n / S values for ~4 blocks per SM; gn_stats takes the moments of d over its slice,
//   gn_norm merges the S partials and normalises its slice.  Two reads + one write.
// Bytes: (2 on-chip, 3 rows or split) * N * sizeof(T), plus the [B, C] parameters.  ~7 FLOPs per
// value on chip, ~10 and a divide per vector for the moments (+ an exp and a divide for SiLU).
//
// Backward (formula in csrc/include/ddpm_fast/group_norm.h), grid (B*G, S) like the split path, with
// the same layouts, widths and 32-bit walk, and float32 parameters (read in the hot loop):
// - gnb_sums: a block recomputes xhat = (x - px) rstd + centre rstd and dz = dy act'(z) over its
//   slice of n / S values, keeps running S1, S2, S3 in registers for the vector's channels (one in
//   NCHW, V in channels_last) while they stay the same (a run of HW / V vectors in NCHW; always in
//   channels_last when CG / V divides 256), flushes them into shared memory [3][CG] (CG <= 4096)
//   with atomics, and stores the slice's partials.
// - gnb_dx: a block reduces the S partials of its group (slice 0 stores the totals and, once it has
//   m1 and m2, the add's gradient: the op's sums [4, B, C]), and writes
//   dx = (rstd W) dz - (rstd m1 + xhat rstd m2).
// x and dy are read twice (the second time mostly from L2), dx written once: 5 * N * sizeof(T)
// bytes at worst, ~10 FLOPs per value per pass (+ an exp and a divide with SiLU).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <tuple>
#include <utility>

#include "ddpm_fast/fastdiv.h"
#include "ddpm_fast/group_norm.h"

namespace ddpm_fast {
namespace {

constexpr int kThreads = 256;     // the split paths' and the backward's blocks
constexpr int kCache = 16;        // values per thread in gn_onchip
constexpr int64_t kMaxBackwardCg = 4096;  // the backward's [3][CG] sums: at most 48 KiB of shared memory

// gn_onchip's largest block: 1024 threads fit 64 registers; the scalar walk (a divmod and an
// address per value) needs more, so it stops at 512 (sm_80 spills at 64).
constexpr int max_onchip_threads(int V) { return V == 1 ? 512 : 1024; }

using Gn = GroupNormParams;

// V consecutive values, loaded and stored as one access of V * sizeof(T) bytes.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// The launch's geometry: (sample, group) of a block from its index, and where vector u of a group
// lies, as a 32-bit offset from the group's first value (the launcher checks C * HW < 2^31) and the
// channel (in the group) of its first value, with one multiply-high per vector instead of 64-bit
// divisions per value.  NCHW: a group is CG rows of HW values, vector u is at u * V in channel
// u / (HW / V).  channels_last: position u / (CG / V), channels from (u % (CG / V)) * V.
struct Walk {
  FastDivmod groups;  // G
  FastDivmod per;     // vectors per channel (NCHW) or per position (channels_last)
  uint32_t C;

  template <bool CL, int V>
  __device__ uint32_t at(uint32_t u, uint32_t* k) const {
    uint32_t q;
    const uint32_t r = per.divmod(u, &q);
    if constexpr (CL) {
      *k = r * V;
      return q * C + r * V;
    } else {
      *k = q;
      return u * V;
    }
  }
};

// A block's group: sample b, group g, its first value's offset, and its pivot (x, add).  Values are
// taken relative to the pivot, d = (x - px) + (add - pa): exact for a large mean with a small
// spread, so nothing rounds at the scale of the mean.
struct Group {
  int64_t b, g, base;
  float px, pa;
};

template <typename T, bool CL>
__device__ Group group_of(const T* x, const Gn& p, const Walk& w, uint32_t bg) {
  uint32_t b;
  const uint32_t g = w.groups.divmod(bg, &b);
  const int64_t base = CL ? static_cast<int64_t>(b) * p.HW * p.C + g * p.CG : (b * p.C + g * p.CG) * p.HW;
  const GnPivot pv = gn_pivot(x, p, b, g);
  return Group{b, g, base, pv.px, pv.pa};
}

template <typename U>
__device__ U* dynamic_shared() {
  extern __shared__ float4 df_gn_shared[];
  return reinterpret_cast<U*>(df_gn_shared);
}

// Sum over the block (blockDim.x a multiple of 32), returned to every thread (two values at once).
__device__ float2 block_sum2(float a, float b) {
  __shared__ float2 partial[32];
  for (int o = 16; o > 0; o >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, o);
    b += __shfl_xor_sync(0xffffffffu, b, o);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // partial[] may still be read from a previous call
  if (lane == 0) partial[warp] = make_float2(a, b);
  __syncthreads();
  float2 r = make_float2(0.f, 0.f);
  for (int i = 0; i < static_cast<int>(blockDim.x / 32); ++i) {
    r.x += partial[i].x;
    r.y += partial[i].y;
  }
  return r;
}

// Merges the moments of the V values v[] into acc (gn_merge): their mean, then their centred
// squares.  The weight V / n is an approximate divide (2 ulps): the IEEE one is a call in the hot
// loop, which then no longer keeps several loads in flight.
template <int V>
__device__ void push_moments(GnMoments& acc, const float (&v)[V]) {
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < V; ++j) sum += v[j];
  const float mv = sum * (1.0f / V);  // V is a power of two: exact
  float q = 0.f;
#pragma unroll
  for (int j = 0; j < V; ++j) q = fmaf(v[j] - mv, v[j] - mv, q);
  const float before = acc.n, delta = mv - acc.mean;
  acc.n += V;
  const float r = __fdividef(static_cast<float>(V), acc.n);
  acc.mean = fmaf(delta, r, acc.mean);
  acc.m2 += fmaf(delta * delta * before, r, q);
}

// The block's moments, returned to every thread: mean = sum n mean / sum n, then M2 = sum (M2 +
// n (mean_t - mean)^2), two block sums in a fixed order whose terms cannot cancel.
__device__ GnMoments block_moments(GnMoments t) {
  const float2 ns = block_sum2(t.n, t.n * t.mean);
  const float mean = ns.y / ns.x, dm = t.mean - mean;  // a block's values count more than 0
  return GnMoments{ns.x, mean, block_sum2(fmaf(t.n * dm, dm, t.m2), 0.f).x};
}

// SiLU with the hardware exp and an approximate divide: no slow path; for z < -87 (1 + e^-z beyond
// 2^126) it returns 0 instead of a value below 1e-36.
__device__ float silu_of(float z) { return __fdividef(z, 1.0f + __expf(-z)); }

// tab[k] = add - pa for each channel k of the group (0 without add): d = (x - px) + tab[k].
__device__ void fill_add_table(float* tab, const Gn& p, const Group& gr) {
  for (int k = threadIdx.x; k < p.CG; k += blockDim.x) {
    tab[k] = p.add ? p.add[gr.b * p.C + gr.g * p.CG + k] - gr.pa : 0.f;
  }
}

// (A, Cc) with z = v A + Cc, so that the weight, bias, scale, shift and statistics cost one FMA per
// value: A = rstd W and Cc = centre A + Bc, where for v = x - px the centre is (add - pa) - md, and
// for v = d (the add already in) it is -md.
__device__ float2 norm_coef(float W, float Bc, float centre, float rstd) {
  const float A = rstd * W;
  return make_float2(A, centre * A + Bc);
}

// tab[k] = (A, Cc) for each channel k of the group, from the parameters.
__device__ void fill_norm_table(float2* tab, const Gn& p, const Group& gr, float md, float rstd, bool v_has_add) {
  for (int k = threadIdx.x; k < p.CG; k += blockDim.x) {
    const GnChannel ch = gn_channel(p, gr.b, gr.g * p.CG + k);
    tab[k] = norm_coef(ch.W, ch.Bc, v_has_add ? -md : gn_centre(ch.add, gr.pa, md), rstd);
  }
}

// The same table in two halves, so that every parameter is read before the statistics (its loads
// overlap the pivot's, and none waits on the reductions): first tab[k] = (W, Bc) and adds[k] = add - pa
// (0 without add: d = (x - px) + adds[k]) ...
__device__ void fill_channel_table(float2* tab, float* adds, const Gn& p, const Group& gr) {
  for (int k = threadIdx.x; k < p.CG; k += blockDim.x) {
    const GnChannel ch = gn_channel(p, gr.b, gr.g * p.CG + k);
    tab[k] = make_float2(ch.W, ch.Bc);
    adds[k] = p.add ? ch.add - gr.pa : 0.f;
  }
}

// ... then, with the statistics, tab[k] = (A, Cc) over (W, Bc): each thread rewrites only the
// entries it filled, so no barrier comes between.
__device__ void finish_norm_table(float2* tab, const float* adds, const Gn& p, float md, float rstd, bool v_has_add) {
  for (int k = threadIdx.x; k < p.CG; k += blockDim.x) {
    const float2 wb = tab[k];
    tab[k] = norm_coef(wb.x, wb.y, v_has_add ? -md : adds[k] - md, rstd);
  }
}

// v[j] = x[j] - px for the V values at x.
template <typename T, int V>
__device__ void load_pack(const T* x, float px, float (&v)[V]) {
  const Pack<T, V> in = *reinterpret_cast<const Pack<T, V>*>(x);
#pragma unroll
  for (int j = 0; j < V; ++j) v[j] = static_cast<float>(in.v[j]) - px;
}

template <typename T, int V>
__device__ void store_pack(T* y, const float (&v)[V]) {
  Pack<T, V> out;
#pragma unroll
  for (int j = 0; j < V; ++j) out.v[j] = static_cast<T>(v[j]);
  *reinterpret_cast<Pack<T, V>*>(y) = out;
}

// y = act(v A + Cc) for the V values at y, channel k (+ j in channels_last), from the (A, Cc) table.
template <typename T, bool CL, int V>
__device__ void normalise_pack(T* y, const float (&v)[V], const float2* tab, uint32_t k, bool silu) {
  float z[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const float2 c = tab[CL ? k + j : k];
    z[j] = fmaf(v[j], c.x, c.y);
    if (silu) z[j] = silu_of(z[j]);
  }
  store_pack<T, V>(y, z);
}

// One block of blockDim.x threads per (sample, group); each thread caches kCache values in registers.
template <typename T, bool CL, int V>
__global__ void __launch_bounds__(max_onchip_threads(V), 1)
    gn_onchip(const T* __restrict__ x, T* __restrict__ y, float* __restrict__ mean_out, float* __restrict__ rstd_out,
              Gn p, Walk w) {
  constexpr int kVecs = kCache / V;
  float2* tab = dynamic_shared<float2>();                 // [CG] (W, Bc), then (A, Cc)
  float* add_tab = reinterpret_cast<float*>(tab + p.CG);  // [CG] add - pa
  const Group gr = group_of<T, CL>(x, p, w, blockIdx.x);
  fill_channel_table(tab, add_tab, p, gr);
  __syncthreads();
  const uint32_t nv = static_cast<uint32_t>(p.n / V);
  float v[kVecs][V];  // d = (x - px) + (add - pa)
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < kVecs; ++i) {
    const uint32_t u = threadIdx.x + i * blockDim.x;
    if (u < nv) {
      uint32_t k;
      const uint32_t o = w.at<CL, V>(u, &k);
      load_pack<T, V>(x + gr.base + o, gr.px, v[i]);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        v[i][j] += add_tab[CL ? k + j : k];
        sum += v[i][j];
      }
    }
  }
  const float n = static_cast<float>(p.n), md = block_sum2(sum, 0.f).x / n;
  float m2 = 0.f;
#pragma unroll
  for (int i = 0; i < kVecs; ++i) {
    if (threadIdx.x + i * blockDim.x < nv) {
#pragma unroll
      for (int j = 0; j < V; ++j) m2 = fmaf(v[i][j] - md, v[i][j] - md, m2);
    }
  }
  const float rstd = rsqrtf(block_sum2(m2, 0.f).x / n + p.eps);
  if (threadIdx.x == 0) {
    mean_out[blockIdx.x] = md;
    rstd_out[blockIdx.x] = rstd;
  }
  finish_norm_table(tab, add_tab, p, md, rstd, true);
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kVecs; ++i) {
    const uint32_t u = threadIdx.x + i * blockDim.x;
    if (u < nv) {
      uint32_t k;
      const uint32_t o = w.at<CL, V>(u, &k);
      normalise_pack<T, CL, V>(y + gr.base + o, v[i], tab, k, p.silu);
    }
  }
}

// Split path, pass 1: block (group, s) takes the moments of d over vectors [s * chunk, (s + 1) * chunk).
template <typename T, bool CL, int V>
__global__ void __launch_bounds__(kThreads)
    gn_stats(const T* __restrict__ x, GnMoments* __restrict__ part, Gn p, Walk w, uint32_t chunk) {
  float* add_tab = dynamic_shared<float>();
  const Group gr = group_of<T, CL>(x, p, w, blockIdx.x);
  fill_add_table(add_tab, p, gr);
  __syncthreads();
  GnMoments acc{0.f, 0.f, 0.f};
  const uint32_t end = min(static_cast<uint32_t>(p.n / V), (blockIdx.y + 1) * chunk);
#pragma unroll 4  // loads in flight: nvcc no longer unrolls this loop by itself once it carries the moments
  for (uint32_t u = blockIdx.y * chunk + threadIdx.x; u < end; u += kThreads) {
    uint32_t k;
    const uint32_t o = w.at<CL, V>(u, &k);
    float d[V];
    load_pack<T, V>(x + gr.base + o, gr.px, d);
#pragma unroll
    for (int j = 0; j < V; ++j) d[j] += add_tab[CL ? k + j : k];
    push_moments<V>(acc, d);
  }
  const GnMoments r = block_moments(acc);
  if (threadIdx.x == 0) part[blockIdx.x * gridDim.y + blockIdx.y] = r;
}

// The group's (mean of d, rstd) from its moments.
__device__ float2 mean_rstd(GnMoments m, const Gn& p) {
  return make_float2(m.mean, rsqrtf(m.m2 / static_cast<float>(p.n) + p.eps));
}

// Split path, pass 2: merge the group's S partials, normalise this block's slice.
template <typename T, bool CL, int V>
__global__ void __launch_bounds__(kThreads)
    gn_norm(const T* __restrict__ x, T* __restrict__ y, const GnMoments* __restrict__ part,
            float* __restrict__ mean_out, float* __restrict__ rstd_out, Gn p, Walk w, uint32_t chunk) {
  float2* tab = dynamic_shared<float2>();
  const uint32_t bg = blockIdx.x, s = blockIdx.y;
  GnMoments acc{0.f, 0.f, 0.f};
  for (uint32_t k = threadIdx.x; k < gridDim.y; k += kThreads) acc = gn_merge(acc, part[bg * gridDim.y + k]);
  const float2 st = mean_rstd(block_moments(acc), p);
  const float md = st.x, rstd = st.y;
  if (s == 0 && threadIdx.x == 0) {
    mean_out[bg] = md;
    rstd_out[bg] = rstd;
  }
  const Group gr = group_of<T, CL>(x, p, w, bg);
  fill_norm_table(tab, p, gr, md, rstd, false);
  __syncthreads();
  const uint32_t end = min(static_cast<uint32_t>(p.n / V), (s + 1) * chunk);
  for (uint32_t u = s * chunk + threadIdx.x; u < end; u += kThreads) {
    uint32_t k;
    const uint32_t o = w.at<CL, V>(u, &k);
    float xp[V];
    load_pack<T, V>(x + gr.base + o, gr.px, xp);
    normalise_pack<T, CL, V>(y + gr.base + o, xp, tab, k, p.silu);
  }
}

// ------------------------------------------------------------------------------ channels_last rows
// channels_last with narrow groups (a group's CG values a position fill less than a 32-byte sector):
// a block takes a tile of whole rows (positions x all C channels, contiguous) so that every sector
// is used in full.  Thread t keeps vector column j = t % L of the L = C / V vectors a row, so one
// group and V channels for the whole tile, stepping R = 256 / L rows at a time.
struct Rows {
  uint32_t L, R, tile;  // vectors a row, rows a step, rows a block
};

// Pass 1: block (tile s, sample b) takes the moments of d per group over its rows: part[b][s][g].
// Thread t's moments join its group's in a fixed order (thread g of the block sums those of the
// group's R x CG / V threads, rows r, columns j: t = r L + j), so that every run rounds alike.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads) gn_rows_stats(const T* __restrict__ x, GnMoments* __restrict__ part,
                                                          Gn p, Rows rw) {
  float* slot = dynamic_shared<float>();  // [2][kThreads]: each thread's count and n mean, then its M2 term
  float* count = slot + 2 * kThreads;     // [G]
  float* mean = count + p.G;              // [G]
  const uint32_t s = blockIdx.x, b = blockIdx.y, C = static_cast<uint32_t>(p.C), t = threadIdx.x;
  const uint32_t c0 = t % rw.L * V, g = c0 / static_cast<uint32_t>(p.CG), cols = static_cast<uint32_t>(p.CG) / V;
  GnMoments acc{0.f, 0.f, 0.f};
  if (t < rw.L * rw.R) {
    const T* xs = x + static_cast<int64_t>(b) * p.HW * p.C;
    const GnPivot pv = gn_pivot(x, p, b, g);
    const float px = pv.px;
    float kc[V];
#pragma unroll
    for (int j = 0; j < V; ++j) kc[j] = p.add ? p.add[b * p.C + c0 + j] - pv.pa : 0.f;
    const uint32_t end = min(static_cast<uint32_t>(p.HW), (s + 1) * rw.tile);
#pragma unroll 4  // loads in flight: the step R is not known at compile time
    for (uint32_t pos = s * rw.tile + t / rw.L; pos < end; pos += rw.R) {
      float d[V];
      load_pack<T, V>(xs + pos * C + c0, px, d);
#pragma unroll
      for (int j = 0; j < V; ++j) d[j] += kc[j];
      push_moments<V>(acc, d);
    }
  }
  slot[t] = acc.n;
  slot[kThreads + t] = acc.n * acc.mean;
  __syncthreads();
  // A group's threads: columns [gg cols, (gg + 1) cols) of rows [0, R); row 0 holds values of every tile.
  for (uint32_t gg = t; gg < static_cast<uint32_t>(p.G); gg += kThreads) {
    float n = 0.f, sum = 0.f;
    for (uint32_t r = 0; r < rw.R; ++r) {
      for (uint32_t j = gg * cols; j < (gg + 1) * cols; ++j) {
        n += slot[r * rw.L + j];
        sum += slot[kThreads + r * rw.L + j];
      }
    }
    count[gg] = n;
    mean[gg] = sum / n;
  }
  __syncthreads();
  if (t < rw.L * rw.R) {
    const float dm = acc.mean - mean[g];
    slot[kThreads + t] = fmaf(acc.n * dm, dm, acc.m2);
  }
  __syncthreads();
  for (uint32_t gg = t; gg < static_cast<uint32_t>(p.G); gg += kThreads) {
    float m2 = 0.f;
    for (uint32_t r = 0; r < rw.R; ++r) {
      for (uint32_t j = gg * cols; j < (gg + 1) * cols; ++j) m2 += slot[kThreads + r * rw.L + j];
    }
    part[(static_cast<int64_t>(b) * gridDim.x + s) * p.G + gg] = GnMoments{count[gg], mean[gg], m2};
  }
}

// Block (g, b) merges the group's S partials into its statistics and its channels' (A, Cc) [B, C].
template <typename T>
__global__ void __launch_bounds__(kThreads)
    gn_rows_finalize(const T* __restrict__ x, const GnMoments* __restrict__ part, float* __restrict__ mean_out, float* __restrict__ rstd_out,
                     float2* __restrict__ coef, Gn p, uint32_t S) {
  const uint32_t g = blockIdx.x, b = blockIdx.y;
  GnMoments acc{0.f, 0.f, 0.f};
  for (uint32_t q = threadIdx.x; q < S; q += kThreads) {
    acc = gn_merge(acc, part[(static_cast<int64_t>(b) * S + q) * p.G + g]);
  }
  const float2 st = mean_rstd(block_moments(acc), p);
  const float md = st.x, rstd = st.y;
  if (threadIdx.x == 0) {
    mean_out[b * p.G + g] = md;
    rstd_out[b * p.G + g] = rstd;
  }
  const Group gr{b, g, 0, 0.f, gn_pivot(x, p, b, g).pa};
  fill_norm_table(coef + b * p.C + g * p.CG, p, gr, md, rstd, false);
}

// Pass 2: y over the block's rows, with the thread's V channels' (A, Cc) in registers.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads, 1)  // without the 1, ptxas on sm_80 keeps 32 registers and spills
    gn_rows_norm(const T* __restrict__ x, T* __restrict__ y, const float2* __restrict__ coef, Gn p, Rows rw) {
  if (threadIdx.x >= rw.L * rw.R) return;
  const uint32_t s = blockIdx.x, b = blockIdx.y, C = static_cast<uint32_t>(p.C);
  const uint32_t c0 = threadIdx.x % rw.L * V, g = c0 / static_cast<uint32_t>(p.CG);
  const int64_t base = static_cast<int64_t>(b) * p.HW * p.C;
  const float px = gn_pivot(x, p, b, g).px;
  float A[V], Cc[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const float2 c = coef[b * p.C + c0 + j];
    A[j] = c.x;
    Cc[j] = c.y;
  }
  const uint32_t end = min(static_cast<uint32_t>(p.HW), (s + 1) * rw.tile);
#pragma unroll 4
  for (uint32_t pos = s * rw.tile + threadIdx.x / rw.L; pos < end; pos += rw.R) {
    float v[V];
    load_pack<T, V>(x + base + pos * C + c0, px, v);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      v[j] = fmaf(v[j], A[j], Cc[j]);
      if (p.silu) v[j] = silu_of(v[j]);
    }
    store_pack<T, V>(y + base + pos * C + c0, v);
  }
}

// ------------------------------------------------------------------------------ launch helpers
// The widest access (values) that every vector of the group can use: V divides the run of
// contiguous values of a group (HW in NCHW, CG in channels_last) and every pointer is aligned to it.
// Instantiated widths: 16 bytes, 4 values (8 bytes for 16-bit types: a channels_last group of 4
// channels, as in a 128-channel U-Net with 32 groups), and 1.
template <typename T>
int vector_width(const Gn& p, std::initializer_list<const void*> ptrs) {
  const int64_t run = p.channels_last ? p.CG : p.HW;
  for (const int V : {16 / static_cast<int>(sizeof(T)), 4}) {
    bool ok = run % V == 0;
    for (const void* q : ptrs) ok = ok && reinterpret_cast<uintptr_t>(q) % (V * sizeof(T)) == 0;
    if (ok) return V;
  }
  return 1;
}

// Calls f.template operator()<CL, V>() for the runtime layout and width.
template <typename T, typename F>
void dispatch_geometry(bool channels_last, int V, F&& f) {
  auto by_width = [&]<bool CL>() {
    if constexpr (sizeof(T) == 2) {
      if (V == 8) return f.template operator()<CL, 8>();
    }
    if (V == 4) return f.template operator()<CL, 4>();
    return f.template operator()<CL, 1>();
  };
  if (channels_last) {
    by_width.template operator()<true>();
  } else {
    by_width.template operator()<false>();
  }
}

Walk walk_of(const Gn& p, int V) {
  Walk w;
  w.groups = FastDivmod(static_cast<uint32_t>(p.G));
  w.per = FastDivmod(static_cast<uint32_t>(std::max<int64_t>(1, (p.channels_last ? p.CG : p.HW) / V)));
  w.C = static_cast<uint32_t>(p.C);
  return w;
}

// 32-bit in-group offsets and block indices.
void check_sizes(const Gn& p) {
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(p.C * p.HW <= kMax, "x: the CUDA GroupNorm indexes a sample with 32 bits: C * H * W must be below ",
              "2^31, got ", p.C * p.HW);
  TORCH_CHECK(p.B * p.G <= kMax, "x: the CUDA GroupNorm takes fewer than 2^31 groups (B * num_groups), got ",
              p.B * p.G);
}

// The forward's per-channel tables in dynamic shared memory: beyond the default 48 KiB a kernel must
// opt in, up to what the GPU allows.  gn_onchip takes 12 bytes a channel of a group, (W, Bc) then
// (A, Cc), and add - pa; gn_norm 8, the (A, Cc); gn_stats 4, the adds.
constexpr size_t kDefaultShared = 48 * 1024 - 1024;  // room for the kernels' own shared arrays
constexpr size_t kOnchipTable = sizeof(float2) + sizeof(float);

size_t optin_shared(const at::Tensor& x) {
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, x.device().index()));
  return static_cast<size_t>(optin) - 1024;
}

template <typename K>
void allow_shared(K* kernel, int64_t CG, size_t per_channel, const at::Tensor& x) {
  const size_t bytes = static_cast<size_t>(CG) * per_channel;
  if (bytes <= kDefaultShared) return;
  const size_t most = optin_shared(x);
  TORCH_CHECK(bytes <= most, "num_groups: ", CG, " channels a group need more shared memory than this GPU's ",
              most + 1024, " bytes a block");
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

// The split paths' slices in vectors: (S, vectors per slice), S enough to give the GPU ~4 blocks per SM.
std::pair<uint32_t, uint32_t> split_of(int64_t nv, int64_t groups, int sms) {
  const int64_t want = std::max<int64_t>(1, (4 * sms + groups - 1) / groups);
  const int64_t S = std::min<int64_t>({want, (nv + kThreads - 1) / kThreads, 1024});
  const int64_t chunk = (nv + S - 1) / S;
  return {static_cast<uint32_t>((nv + chunk - 1) / chunk), static_cast<uint32_t>(chunk)};
}

int sm_count(const at::Tensor& x) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.device().index()));
  return sms;
}

// On-chip block size: the fewest threads (a power of two, at least 64) that cache the group, 0 if
// the group does not fit in max_onchip_threads(V) * kCache values.
int onchip_threads(int64_t n, int V) {
  for (int t = 64; t <= max_onchip_threads(V); t *= 2) {
    if (n <= static_cast<int64_t>(t) * kCache) return t;
  }
  return 0;
}

// The rows path for channels_last groups narrower than a 32-byte sector a position, when a row of
// vectors fits a block (C / V <= 256) and the split path would be taken.
bool use_rows(const Gn& p, int V, size_t elem) {
  return p.channels_last && p.CG * static_cast<int64_t>(elem) < 32 && p.C / V <= kThreads && p.B <= 65535;
}

// Rows per block for ~4 blocks per SM over the batch: (S tiles a sample, the lanes and tile).
std::pair<uint32_t, Rows> rows_of(const Gn& p, int V, int sms) {
  Rows rw;
  rw.L = static_cast<uint32_t>(p.C / V);
  rw.R = kThreads / rw.L;
  const int64_t steps = (p.HW + rw.R - 1) / rw.R;
  const int64_t S = std::clamp<int64_t>((4 * sms + p.B - 1) / p.B, 1, steps);
  rw.tile = static_cast<uint32_t>((steps + S - 1) / S * rw.R);
  return {static_cast<uint32_t>((p.HW + rw.tile - 1) / rw.tile), rw};
}

// The one-read on-chip path unless its grid of one block per group leaves the GPU short of work:
// fewer blocks than half the SMs, or fewer than 256 threads (8 warps, each thread with kCache loads
// in flight) per SM.  Then the split path spreads each group over several blocks at the price of a
// second read (mostly from L2).
// A group so wide that gn_onchip's 12-byte table does not fit (over 13500 channels on sm_80) goes
// to the split path, whose tables are 8 bytes a channel.
bool use_onchip(int64_t groups, int threads, int sms, int64_t CG, const at::Tensor& x) {
  if (threads == 0 || 2 * groups < sms || groups * threads < 256LL * sms) return false;
  const size_t table = static_cast<size_t>(CG) * kOnchipTable;
  return table <= kDefaultShared || table <= optin_shared(x);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_cuda(
    const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, const std::optional<at::Tensor>& add,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, bool silu, bool channels_last) {
  const Gn p = group_norm_params(x, num_groups, weight, bias, eps, add, scale, shift, silu, channels_last);
  check_sizes(p);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x, format_of(channels_last));
  at::Tensor mean = at::empty({p.B, p.G}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({p.B, p.G}, x.options().dtype(at::kFloat));
  if (x.numel() == 0) return {y, mean.zero_(), rstd.zero_()};
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int sms = sm_count(x);
  const int64_t groups = p.B * p.G;
  float *mp = mean.data_ptr<float>(), *rp = rstd.data_ptr<float>();
  DDPM_FAST_DISPATCH_KERNEL_TYPES(x.scalar_type(), "group_norm_cuda", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const int V = vector_width<scalar_t>(p, {xp, yp});
    const Walk w = walk_of(p, V);
    const int threads = onchip_threads(p.n, V);
    dispatch_geometry<scalar_t>(channels_last, V, [&]<bool CL, int kV>() {
      if (use_onchip(groups, threads, sms, p.CG, x)) {
        allow_shared(gn_onchip<scalar_t, CL, kV>, p.CG, kOnchipTable, x);
        gn_onchip<scalar_t, CL, kV><<<static_cast<unsigned>(groups), threads, p.CG * kOnchipTable, stream>>>(
            xp, yp, mp, rp, p, w);
        return;
      }
      if (CL && use_rows(p, kV, sizeof(scalar_t))) {
        const auto [S, rw] = rows_of(p, kV, sms);
        at::Tensor part = at::empty({p.B * S * p.G * 3}, x.options().dtype(at::kFloat));
        at::Tensor coef = at::empty({p.B * p.C * 2}, x.options().dtype(at::kFloat));
        auto* pp = reinterpret_cast<GnMoments*>(part.data_ptr<float>());
        auto* cp = reinterpret_cast<float2*>(coef.data_ptr<float>());
        const dim3 grid(S, static_cast<unsigned>(p.B));
        const size_t slots = (2 * kThreads + 2 * p.G) * sizeof(float);
        gn_rows_stats<scalar_t, kV><<<grid, kThreads, slots, stream>>>(xp, pp, p, rw);
        const dim3 fgrid(static_cast<unsigned>(p.G), static_cast<unsigned>(p.B));
        gn_rows_finalize<scalar_t><<<fgrid, kThreads, 0, stream>>>(xp, pp, mp, rp, cp, p, S);
        gn_rows_norm<scalar_t, kV><<<grid, kThreads, 0, stream>>>(xp, yp, cp, p, rw);
        return;
      }
      const auto [slices, chunk] = split_of(p.n / kV, groups, sms);
      at::Tensor part = at::empty({groups * slices * 3}, x.options().dtype(at::kFloat));
      const dim3 grid(static_cast<unsigned>(groups), slices);
      auto* pp = reinterpret_cast<GnMoments*>(part.data_ptr<float>());
      allow_shared(gn_stats<scalar_t, CL, kV>, p.CG, sizeof(float), x);
      allow_shared(gn_norm<scalar_t, CL, kV>, p.CG, sizeof(float2), x);
      gn_stats<scalar_t, CL, kV><<<grid, kThreads, p.CG * sizeof(float), stream>>>(xp, pp, p, w, chunk);
      gn_norm<scalar_t, CL, kV><<<grid, kThreads, p.CG * sizeof(float2), stream>>>(xp, yp, pp, mp, rp, p, w, chunk);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, mean, rstd};
}

// ------------------------------------------------------------------------------ backward
// A vector's running per-channel state in the backward: NC = the channels a vector spans (V in
// channels_last, 1 in NCHW), reloaded only when the vector's channel changes (a run of HW / V
// vectors in NCHW; in channels_last always the same when the block's stride in vectors, kThreads,
// is a multiple of CG / V).  xhat = (x - px) r + cr, z = xhat W + Bc.
template <int NC>
struct BwdChannels {
  float cr[NC], W[NC], Bc[NC];

  __device__ void load(const Gn& p, const Group& gr, float md, float r, uint32_t k) {
#pragma unroll
    for (int j = 0; j < NC; ++j) {
      const GnChannel ch = gn_channel<true>(p, gr.b, gr.g * p.CG + k + j);
      cr[j] = gn_centre(ch.add, gr.pa, md) * r;
      W[j] = ch.W;
      Bc[j] = ch.Bc;
    }
  }
};

__device__ float grad_z(float dy, float xh, float W, float Bc, bool silu) {
  if (!silu) return dy;
  const float z = fmaf(xh, W, Bc);
  return gn_silu_grad(dy, z, __fdividef(1.0f, 1.0f + __expf(-z)));
}

template <typename T, bool CL, int V>
__global__ void __launch_bounds__(kThreads)
    gnb_sums(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ mean,
             const float* __restrict__ rstd, float* __restrict__ part, Gn p, Walk w, uint32_t chunk) {
  constexpr int NC = CL ? V : 1;
  constexpr uint32_t kNone = 0xffffffffu;
  float* sh = dynamic_shared<float>();  // [3][CG]: this slice's S1, S2, S3 per channel
  for (int k = threadIdx.x; k < 3 * p.CG; k += kThreads) sh[k] = 0.f;
  __syncthreads();
  const uint32_t bg = blockIdx.x, s = blockIdx.y;
  const Group gr = group_of<T, CL>(x, p, w, bg);
  const float r = rstd[bg], md = mean[bg];
  uint32_t cur = kNone;
  BwdChannels<NC> ch;
  float a1[NC], a2[NC], a3[NC];
  auto flush = [&] {
#pragma unroll
    for (int j = 0; j < NC; ++j) {
      atomicAdd(sh + cur + j, a1[j]);
      atomicAdd(sh + p.CG + cur + j, a2[j]);
      atomicAdd(sh + 2 * p.CG + cur + j, a3[j]);
    }
  };
  const uint32_t end = min(static_cast<uint32_t>(p.n / V), (s + 1) * chunk);
  for (uint32_t u = s * chunk + threadIdx.x; u < end; u += kThreads) {
    uint32_t k;
    const uint32_t o = w.at<CL, V>(u, &k);
    if (k != cur) {
      if (cur != kNone) flush();
      cur = k;
      ch.load(p, gr, md, r, k);
#pragma unroll
      for (int j = 0; j < NC; ++j) a1[j] = a2[j] = a3[j] = 0.f;
    }
    float xv[V], gv[V];
    load_pack<T, V>(x + gr.base + o, gr.px, xv);
    load_pack<T, V>(dy + gr.base + o, 0.f, gv);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int c = CL ? j : 0;
      const float xh = fmaf(xv[j], r, ch.cr[c]);
      const float gz = grad_z(gv[j], xh, ch.W[c], ch.Bc[c], p.silu);
      a1[c] += gz;
      a2[c] = fmaf(gz, xh, a2[c]);
      a3[c] += xh;
    }
  }
  if (cur != kNone) flush();
  __syncthreads();
  float* out = part + (static_cast<int64_t>(bg) * gridDim.y + s) * 3 * p.CG;
  for (int k = threadIdx.x; k < 3 * p.CG; k += kThreads) out[k] = sh[k];
}

template <typename T, bool CL, int V>
__global__ void __launch_bounds__(kThreads)
    gnb_dx(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx, const float* __restrict__ mean,
           const float* __restrict__ rstd, const float* __restrict__ part, float* __restrict__ sums, Gn p, Walk w,
           uint32_t chunk) {
  constexpr int NC = CL ? V : 1;
  const uint32_t bg = blockIdx.x, s = blockIdx.y, S = gridDim.y;
  const Group gr = group_of<T, CL>(x, p, w, bg);
  float m1 = 0.f, m2 = 0.f;
  for (int k = threadIdx.x; k < p.CG; k += kThreads) {
    float t1 = 0.f, t2 = 0.f, t3 = 0.f;
    for (uint32_t q = 0; q < S; ++q) {
      const float* pp = part + (static_cast<int64_t>(bg) * S + q) * 3 * p.CG;
      t1 += pp[k];
      t2 += pp[p.CG + k];
      t3 += pp[2 * p.CG + k];
    }
    const int64_t c = gr.g * p.CG + k;
    const float W = gn_channel<true>(p, gr.b, c).W;
    m1 += W * t1;
    m2 += W * t2;
    if (s == 0) {
      sums[gr.b * p.C + c] = t1;
      sums[(p.B + gr.b) * p.C + c] = t2;
      sums[(2 * p.B + gr.b) * p.C + c] = t3;
    }
  }
  const float2 m = block_sum2(m1, m2);
  const float r = rstd[bg], md = mean[bg];
  if (s == 0) {  // the add's gradient, from the totals this thread stored above
    const int64_t BC = p.B * p.C;
    const float n = static_cast<float>(p.n);
    for (int k = threadIdx.x; k < p.CG; k += kThreads) {
      const int64_t bc = gr.b * p.C + gr.g * p.CG + k;
      sums[3 * BC + bc] = gn_dadd(r, gn_channel<true>(p, gr.b, gr.g * p.CG + k).W, sums[bc], sums[2 * BC + bc],
                                  static_cast<float>(p.HW), m.x / n, m.y / n);
    }
  }
  // dx = r (W gz - m1 - xhat m2) = (r W) gz - (r m1 + xhat (r m2))
  const float rm1 = r * m.x / static_cast<float>(p.n), rm2 = r * m.y / static_cast<float>(p.n);
  constexpr uint32_t kNone = 0xffffffffu;
  uint32_t cur = kNone;
  BwdChannels<NC> ch;
  const uint32_t end = min(static_cast<uint32_t>(p.n / V), (s + 1) * chunk);
  for (uint32_t u = s * chunk + threadIdx.x; u < end; u += kThreads) {
    uint32_t k;
    const uint32_t o = w.at<CL, V>(u, &k);
    if (k != cur) {
      cur = k;
      ch.load(p, gr, md, r, k);
    }
    float xv[V], gv[V];
    load_pack<T, V>(x + gr.base + o, gr.px, xv);
    load_pack<T, V>(dy + gr.base + o, 0.f, gv);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int c = CL ? j : 0;
      const float xh = fmaf(xv[j], r, ch.cr[c]);
      const float gz = grad_z(gv[j], xh, ch.W[c], ch.Bc[c], p.silu);
      gv[j] = fmaf(r * ch.W[c], gz, -fmaf(xh, rm2, rm1));
    }
    store_pack<T, V>(dx + gr.base + o, gv);
  }
}

std::tuple<at::Tensor, at::Tensor> group_norm_backward_cuda(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd, int64_t num_groups,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& add, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& shift, bool silu, bool channels_last) {
  const Gn p = group_norm_params(x, num_groups, weight, bias, 1.0, add, scale, shift, silu, channels_last);
  check_group_norm_backward(dy, x, mean, rstd, num_groups, channels_last);
  check_sizes(p);
  TORCH_CHECK(p.CG <= kMaxBackwardCg, "num_groups: the CUDA backward takes at most ", kMaxBackwardCg,
              " channels a group, got ", p.CG);
  for (const GnParam* q : {&p.weight, &p.bias, &p.add, &p.scale, &p.shift}) {
    TORCH_CHECK(!*q || q->dtype == at::kFloat, "weight, bias, add, scale, shift: the CUDA backward takes them in "
                "float32 (ops.py casts them), got ", q->dtype);
  }
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty_like(x, format_of(channels_last));
  at::Tensor sums = at::empty({4, p.B, p.C}, x.options().dtype(at::kFloat));
  if (x.numel() == 0) return {dx, sums.zero_()};
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t groups = p.B * p.G;
  const int sms = sm_count(x);
  const size_t shared = 3 * p.CG * sizeof(float);
  const float *mp = mean.data_ptr<float>(), *rp = rstd.data_ptr<float>();
  DDPM_FAST_DISPATCH_KERNEL_TYPES(x.scalar_type(), "group_norm_backward_cuda", [&] {
    const scalar_t *dyp = dy.data_ptr<scalar_t>(), *xp = x.data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    const int V = vector_width<scalar_t>(p, {dyp, xp, dxp});
    const Walk w = walk_of(p, V);
    dispatch_geometry<scalar_t>(channels_last, V, [&]<bool CL, int kV>() {
      const auto [slices, chunk] = split_of(p.n / kV, groups, sms);
      at::Tensor part = at::empty({groups * slices * 3 * p.CG}, x.options().dtype(at::kFloat));
      const dim3 grid(static_cast<unsigned>(groups), slices);
      gnb_sums<scalar_t, CL, kV><<<grid, kThreads, shared, stream>>>(dyp, xp, mp, rp, part.data_ptr<float>(), p, w,
                                                                      chunk);
      gnb_dx<scalar_t, CL, kV><<<grid, kThreads, 0, stream>>>(dyp, xp, dxp, mp, rp, part.data_ptr<float>(),
                                                              sums.data_ptr<float>(), p, w, chunk);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dx, sums};
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) {
  m.impl("group_norm", &group_norm_cuda);
  m.impl("group_norm_backward", &group_norm_backward_cuda);
}

}  // namespace ddpm_fast
