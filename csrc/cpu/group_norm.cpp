// GroupNorm with fused input add, scale-shift and SiLU on the CPU:
//   y = act(GN(x + add) * (1 + scale) + shift), statistics in fp32.
//
// Both layouts take every value as d = (x - px) + (add_c - pa) relative to its group's pivot
// (gn_pivot: exact for a large mean with a small spread), gather the moments of d (count, mean,
// M2: no cancellation, whatever d's distance from the pivot), then fold mean, rstd, weight, bias,
// scale and shift into one multiply-add per channel, y = (d - mean) * A_c + B_c, then SiLU.  The
// loops are built for AVX-512/AVX2 (DF_CPU_CLONES) and run on fp32: straight on fp32 input, through
// a buffer for fp16/bf16.
// - NCHW: at::parallel_for over (sample, group), >= ~32K values per thread so small maps do not pay
//   for waking threads.  A group is Cg contiguous rows of HW (one row when there is no add).
// - channels_last: a sample is HW rows of C contiguous channels, so the loops run across channels
//   with per-channel pivots: slices of rows are the tasks; per-channel moments per slice (Welford's
//   update, one row at a time) are merged per group, then the same slices write y.  Every cache
//   line is used whole.
// The input is read twice, usually from cache, and written once: 2-3 * N * sizeof(T) bytes,
// ~10 FLOPs per element (+~20 with SiLU).  The group's centred mean md and rstd go out for the backward.
//
// Backward (formula in csrc/include/ddpm_fast/group_norm.h): the same tasks.  Pass 1 recomputes
// xhat and dz = dy act'(z) and sums S1, S2, S3 per (sample, channel) (per slice for channels_last,
// then reduced); pass 2 recomputes them again and writes dx.  x and dy are read twice (the second
// time usually from cache), dx written once: 2-3 * 3 * N * sizeof(T) bytes, ~12 FLOPs per element
// per pass (+~25 with SiLU's derivative).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "ddpm_fast/group_norm.h"

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "normals.h"

namespace ddpm_fast {
namespace {

constexpr int kChunk = 64;
constexpr int64_t kBlock = 256;

// Inlined into the DF_CPU_CLONES functions that call it, compiled there for each clone's ISA.
#define DF_INLINE __attribute__((always_inline)) inline
constexpr int64_t kValuesPerThread = 32768;

// Merges the moments of d = (v - px) + shift over v[0, n) into *acc (v - px is exact for values near
// the pivot), kBlock values at a time: the block's mean, then its centred squares, while it is in L1.
DF_CPU_CLONES void centred_moments(const float* v, int64_t n, float px, float shift, GnMoments* acc) {
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const float* u = v + i0;
    const int64_t m = std::min(kBlock, n - i0);
    float s = 0.0f, q = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < m; ++i) s += (u[i] - px) + shift;
    const float mb = s / static_cast<float>(m);
#pragma omp simd reduction(+ : q)
    for (int64_t i = 0; i < m; ++i) {
      const float e = ((u[i] - px) + shift) - mb;
      q += e * e;
    }
    *acc = gn_merge(*acc, GnMoments{static_cast<float>(m), mb, q});
  }
}

// out = ((v - px) + centre) * A + B: centring first keeps a large mean from cancelling in fp32.
DF_CPU_CLONES void centred_affine(const float* v, float* out, int64_t n, float px, float centre, float A, float B) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = ((v[i] - px) + centre) * A + B;
}

// The same across one channels_last row, with per-channel pivots and coefficients: Welford's update
// of each channel's mean and M2 by the row's d, inv = 1 / (rows so far, this one included).
DF_CPU_CLONES void channel_moments(const float* v, const float* px, const float* shift, float* mean, float* m2,
                                   float inv, int64_t C) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const float d = (v[c] - px[c]) + shift[c], delta = d - mean[c];
    mean[c] += delta * inv;
    m2[c] += delta * (d - mean[c]);
  }
}

DF_CPU_CLONES void channel_affine(const float* v, float* out, const float* px, const float* centre, const float* A,
                                  const float* B, int64_t C) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) out[c] = ((v[c] - px[c]) + centre[c]) * A[c] + B[c];
}

// Group (b, g)'s mean and rstd from its moments, folded into its channels' coefficients:
// y_c = ((x - px) + centre_c) * A_c + B_c.  pa is the group's pivot add.
// The group's centred mean md and rstd go to mean[b * G + g], rstd[b * G + g].
void group_coefs(const GroupNormParams& a, int64_t b, int64_t g, GnMoments m, float pa, float* centre, float* A,
                 float* Bc, float* mean, float* rstd_out) {
  const float md = m.mean, rstd = 1.0f / std::sqrt(m.m2 / static_cast<float>(a.n) + a.eps);
  mean[b * a.G + g] = md;
  rstd_out[b * a.G + g] = rstd;
  for (int64_t k = 0; k < a.CG; ++k) {
    const int64_t c = g * a.CG + k, bc = b * a.C + c;
    const float w = a.weight ? a.weight[c] : 1.0f, bi = a.bias ? a.bias[c] : 0.0f;
    const float sc = 1.0f + (a.scale ? a.scale[bc] : 0.0f), sh = a.shift ? a.shift[bc] : 0.0f;
    centre[k] = ((a.add ? a.add[bc] : 0.0f) - pa) - md;
    A[k] = rstd * w * sc;
    Bc[k] = bi * sc + sh;
  }
}

// x[0, n) as fp32: x itself for fp32 input, else converted into buf.
template <typename scalar_t>
const float* as_fp32(const scalar_t* x, int64_t n, float* buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return x;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(x[i]);
    return buf;
  }
}

// Calls f(values, count) over x[0, n) as fp32: in one piece for fp32, else in converted chunks.
template <typename scalar_t, typename F>
void for_fp32_chunks(const scalar_t* x, int64_t n, F&& f) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return f(x, n);
  } else {
    float buf[kChunk];
    for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
      const int m = static_cast<int>(std::min<int64_t>(kChunk, n - i0));
      f(as_fp32(x + i0, m, buf), m);
    }
  }
}

template <typename scalar_t>
void group_norm_nchw(const scalar_t* x, scalar_t* y, float* mean, float* rstd, const GroupNormParams& a) {
  const int64_t grain = std::max<int64_t>(1, kValuesPerThread / std::max<int64_t>(1, a.n));
  at::parallel_for(0, a.B * a.G, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> A(a.CG), Bc(a.CG), centre(a.CG);
    float buf[kChunk];
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / a.G, g = bg % a.G, c0 = g * a.CG;
      const scalar_t* xg = x + (b * a.C + c0) * a.HW;
      scalar_t* yg = y + (b * a.C + c0) * a.HW;
      auto add = [&](int64_t c) { return a.add ? a.add[b * a.C + c] : 0.0f; };
      // The pivot (x, add), kept as two numbers so nothing rounds at |mean|.
      const GnPivot pv = gn_pivot(x, a, b, g);
      const float px = pv.px, pa = pv.pa;
      GnMoments mom{0.0f, 0.0f, 0.0f};
      if (!a.add) {  // one shift for the whole group: one contiguous row
        for_fp32_chunks(xg, a.n, [&](const float* v, int64_t m) { centred_moments(v, m, px, 0.0f, &mom); });
      } else {
        for (int64_t k = 0; k < a.CG; ++k) {
          const float shift = add(c0 + k) - pa;
          for_fp32_chunks(xg + k * a.HW, a.HW,
                          [&](const float* v, int64_t m) { centred_moments(v, m, px, shift, &mom); });
        }
      }
      group_coefs(a, b, g, mom, pa, centre.data(), A.data(), Bc.data(), mean, rstd);
      for (int64_t k = 0; k < a.CG; ++k) {
        const scalar_t* xr = xg + k * a.HW;
        scalar_t* yr = yg + k * a.HW;
        if constexpr (std::is_same_v<scalar_t, float>) {
          centred_affine(xr, yr, a.HW, px, centre[k], A[k], Bc[k]);
        } else {
          for (int64_t i0 = 0; i0 < a.HW; i0 += kChunk) {
            const int m = static_cast<int>(std::min<int64_t>(kChunk, a.HW - i0));
            centred_affine(as_fp32(xr + i0, m, buf), buf, m, px, centre[k], A[k], Bc[k]);
            if (a.silu) cpu::silu_inplace(buf, m);
            for (int i = 0; i < m; ++i) yr[i0 + i] = static_cast<scalar_t>(buf[i]);
          }
        }
      }
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (a.silu) cpu::silu_inplace(yg, a.n);  // once for the whole group
      }
    }
  });
}

// channels_last work split: S slices of `rows` rows per sample, enough tasks for every thread, each
// >= ~32K values unless the sample is smaller.
struct RowSlices {
  int64_t rows, S;
};

RowSlices row_slices(const GroupNormParams& a, int64_t values_per_row) {
  const int64_t min_rows = std::max<int64_t>(1, kValuesPerThread / values_per_row);
  const int64_t want = (at::get_num_threads() + a.B - 1) / a.B;
  const int64_t rows = std::max(min_rows, (a.HW + want - 1) / want);
  return RowSlices{rows, (a.HW + rows - 1) / rows};
}

template <typename scalar_t>
void group_norm_channels_last(const scalar_t* x, scalar_t* y, float* mean, float* rstd, const GroupNormParams& a) {
  const int64_t B = a.B, C = a.C, HW = a.HW;
  const RowSlices sl = row_slices(a, C);
  const int64_t rows = sl.rows, S = sl.S;

  // Per (b, c): the group's pivot x, the add shift relative to the group's pivot add.
  std::vector<float> px(B * C), shift(B * C), pa(B * a.G);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t g = 0; g < a.G; ++g) {
      const int64_t c0 = g * a.CG;
      const GnPivot pv = gn_pivot(x, a, b, g);
      pa[b * a.G + g] = pv.pa;
      for (int64_t c = c0; c < c0 + a.CG; ++c) {
        px[b * C + c] = pv.px;
        shift[b * C + c] = (a.add ? a.add[b * C + c] : 0.0f) - pa[b * a.G + g];
      }
    }
  }
  auto for_rows = [&](auto&& body) {  // body(task, b, first row, end row, fp32 row buffer of C)
    at::parallel_for(0, B * S, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> buf(std::is_same_v<scalar_t, float> ? 0 : C);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / S, r0 = (task % S) * rows;
        body(task, b, r0, std::min(HW, r0 + rows), buf.data());
      }
    });
  };

  std::vector<float> part(B * S * 2 * C, 0.0f);  // [b, slice] -> per-channel mean and M2 of d over its rows
  for_rows([&](int64_t task, int64_t b, int64_t r0, int64_t r1, float* buf) {
    float* m = part.data() + task * 2 * C;
    for (int64_t r = r0; r < r1; ++r) {
      channel_moments(as_fp32(x + (b * HW + r) * C, C, buf), px.data() + b * C, shift.data() + b * C, m, m + C,
                      1.0f / static_cast<float>(r - r0 + 1), C);
    }
  });

  std::vector<float> A(B * C), Bc(B * C), centre(B * C);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t g = 0; g < a.G; ++g) {
      GnMoments mom{0.0f, 0.0f, 0.0f};
      for (int64_t s = 0; s < S; ++s) {
        const float* p = part.data() + (b * S + s) * 2 * C + g * a.CG;
        const float rows_s = static_cast<float>(std::min(HW, (s + 1) * rows) - s * rows);
        for (int64_t k = 0; k < a.CG; ++k) mom = gn_merge(mom, GnMoments{rows_s, p[k], p[C + k]});
      }
      const int64_t o = b * C + g * a.CG;
      group_coefs(a, b, g, mom, pa[b * a.G + g], centre.data() + o, A.data() + o, Bc.data() + o, mean, rstd);
    }
  }

  for_rows([&](int64_t, int64_t b, int64_t r0, int64_t r1, float* buf) {
    const float *pxb = px.data() + b * C, *cb = centre.data() + b * C, *Ab = A.data() + b * C, *Bb = Bc.data() + b * C;
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* row = x + (b * HW + r) * C;
      scalar_t* out = y + (b * HW + r) * C;
      if constexpr (std::is_same_v<scalar_t, float>) {  // straight into y, activated there
        channel_affine(row, out, pxb, cb, Ab, Bb, C);
        if (a.silu) cpu::silu_inplace(out, C);
      } else {
        channel_affine(as_fp32(row, C, buf), buf, pxb, cb, Ab, Bb, C);
        if (a.silu) cpu::silu_inplace(buf, C);
        for (int64_t c = 0; c < C; ++c) out[c] = static_cast<scalar_t>(buf[c]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_cpu(
    const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, const std::optional<at::Tensor>& add,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, bool silu, bool channels_last) {
  const GroupNormParams a =
      group_norm_params(x, num_groups, weight, bias, eps, add, scale, shift, silu, channels_last);
  at::Tensor y = at::empty_like(x, format_of(channels_last));
  at::Tensor mean = at::empty({a.B, a.G}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({a.B, a.G}, x.options().dtype(at::kFloat));
  if (x.numel() == 0) return {y, mean.zero_(), rstd.zero_()};
  DDPM_FAST_DISPATCH_KERNEL_TYPES(x.scalar_type(), "group_norm_cpu", [&] {
    auto kernel = channels_last ? group_norm_channels_last<scalar_t> : group_norm_nchw<scalar_t>;
    kernel(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), mean.data_ptr<float>(), rstd.data_ptr<float>(), a);
  });
  return {y, mean, rstd};
}

// ------------------------------------------------------------------------------ backward
// dz = dy act'(z) at xhat (group_norm.h).  The loops below are instantiated per kSilu and inlined
// into each DF_CPU_CLONES entry point, so every variant vectorises without a branch inside.
template <bool kSilu>
DF_INLINE float grad_z(float dy, float xh, float W, float Bc) {
  if constexpr (!kSilu) {
    return dy;
  } else {
    const float z = xh * W + Bc;
    return gn_silu_grad(dy, z, 1.0f / (1.0f + cpu::exp_poly(-z)));
  }
}

// s[0..3) += S1, S2, S3 over one NCHW row (one channel); px is the group's pivot x.
template <bool kSilu>
DF_INLINE void sums_row(const float* x, const float* dy, int64_t n, float px, float centre, float rstd, GnChannel ch,
                        float* s) {
  float a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma omp simd reduction(+ : a1, a2, a3)
  for (int64_t i = 0; i < n; ++i) {
    const float xh = gn_xhat(x[i], px, centre, rstd);
    const float gz = grad_z<kSilu>(dy[i], xh, ch.W, ch.Bc);
    a1 += gz;
    a2 += gz * xh;
    a3 += xh;
  }
  s[0] += a1;
  s[1] += a2;
  s[2] += a3;
}

DF_CPU_CLONES void bwd_sums_row(const float* x, const float* dy, int64_t n, float px, float centre, float rstd,
                                GnChannel ch, bool silu, float* s) {
  silu ? sums_row<true>(x, dy, n, px, centre, rstd, ch, s) : sums_row<false>(x, dy, n, px, centre, rstd, ch, s);
}

template <bool kSilu>
DF_INLINE void dx_row(const float* x, const float* dy, float* dx, int64_t n, float px, float centre, float rstd,
                      GnChannel ch, float m1, float m2) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float xh = gn_xhat(x[i], px, centre, rstd);
    dx[i] = gn_dx(grad_z<kSilu>(dy[i], xh, ch.W, ch.Bc), xh, ch.W, rstd, m1, m2);
  }
}

DF_CPU_CLONES void bwd_dx_row(const float* x, const float* dy, float* dx, int64_t n, float px, float centre,
                              float rstd, GnChannel ch, float m1, float m2, bool silu) {
  silu ? dx_row<true>(x, dy, dx, n, px, centre, rstd, ch, m1, m2)
       : dx_row<false>(x, dy, dx, n, px, centre, rstd, ch, m1, m2);
}

// One sample's coefficients per channel, for channels_last rows of C channels.
struct GnColumns {
  const float *px, *rstd, *centre, *W, *Bc, *m1, *m2;
};

template <bool kSilu>
DF_INLINE void sums_cols(const float* x, const float* dy, int64_t C, GnColumns k, float* s1, float* s2, float* s3) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const float xh = gn_xhat(x[c], k.px[c], k.centre[c], k.rstd[c]);
    const float gz = grad_z<kSilu>(dy[c], xh, k.W[c], k.Bc[c]);
    s1[c] += gz;
    s2[c] += gz * xh;
    s3[c] += xh;
  }
}

DF_CPU_CLONES void bwd_sums_cols(const float* x, const float* dy, int64_t C, GnColumns k, bool silu, float* s1,
                                 float* s2, float* s3) {
  silu ? sums_cols<true>(x, dy, C, k, s1, s2, s3) : sums_cols<false>(x, dy, C, k, s1, s2, s3);
}

template <bool kSilu>
DF_INLINE void dx_cols(const float* x, const float* dy, float* dx, int64_t C, GnColumns k) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const float xh = gn_xhat(x[c], k.px[c], k.centre[c], k.rstd[c]);
    dx[c] = gn_dx(grad_z<kSilu>(dy[c], xh, k.W[c], k.Bc[c]), xh, k.W[c], k.rstd[c], k.m1[c], k.m2[c]);
  }
}

DF_CPU_CLONES void bwd_dx_cols(const float* x, const float* dy, float* dx, int64_t C, GnColumns k, bool silu) {
  silu ? dx_cols<true>(x, dy, dx, C, k) : dx_cols<false>(x, dy, dx, C, k);
}

// Calls f(x values, dy values, count, first index) over [0, n) as fp32: in one piece for fp32, else
// in converted chunks.
template <typename scalar_t, typename F>
void for_fp32_pairs(const scalar_t* x, const scalar_t* dy, int64_t n, F&& f) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    f(x, dy, n, int64_t{0});
  } else {
    float bx[kChunk], bd[kChunk];
    for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
      const int m = static_cast<int>(std::min<int64_t>(kChunk, n - i0));
      f(as_fp32(x + i0, m, bx), as_fp32(dy + i0, m, bd), int64_t{m}, i0);
    }
  }
}

// out[0, n) = v as scalar_t (v is out itself for fp32).
template <typename scalar_t>
void store_fp32(const float* v, scalar_t* out, int64_t n) {
  if constexpr (!std::is_same_v<scalar_t, float>) {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(v[i]);
  }
}

// m1, m2 of group (b, g) from its channels' S1, S2 (sums laid out [4, B, C]).
std::pair<float, float> group_m(const GroupNormParams& a, const float* sums, int64_t b, int64_t g) {
  float m1 = 0.0f, m2 = 0.0f;
  for (int64_t c = g * a.CG; c < (g + 1) * a.CG; ++c) {
    const float W = gn_channel(a, b, c).W;
    m1 += W * sums[b * a.C + c];
    m2 += W * sums[(a.B + b) * a.C + c];
  }
  const float n = static_cast<float>(a.n);
  return {m1 / n, m2 / n};
}

// sums[3] = dadd for the channels of group (b, g), from sums[0] and sums[2] (layout [4, B, C]).
void add_grads(const GroupNormParams& a, float* sums, int64_t b, int64_t g, float rstd, float m1, float m2) {
  const int64_t BC = a.B * a.C;
  for (int64_t c = g * a.CG; c < (g + 1) * a.CG; ++c) {
    const int64_t bc = b * a.C + c;
    sums[3 * BC + bc] = gn_dadd(rstd, gn_channel(a, b, c).W, sums[bc], sums[2 * BC + bc], static_cast<float>(a.HW),
                                m1, m2);
  }
}

template <typename scalar_t>
void gn_backward_nchw(const scalar_t* dy, const scalar_t* x, scalar_t* dx, float* sums, const float* mean,
                      const float* rstd, const GroupNormParams& a) {
  const int64_t BC = a.B * a.C;
  const int64_t grain = std::max<int64_t>(1, kValuesPerThread / std::max<int64_t>(1, a.n));
  at::parallel_for(0, a.B * a.G, grain, [&](int64_t begin, int64_t end) {
    float out[kChunk];
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / a.G, g = bg % a.G;
      const GnPivot pv = gn_pivot(x, a, b, g);
      const float px = pv.px, pa = pv.pa, r = rstd[bg];
      for (int64_t c = g * a.CG; c < (g + 1) * a.CG; ++c) {
        const int64_t o = (b * a.C + c) * a.HW;
        const GnChannel ch = gn_channel(a, b, c);
        const float centre = gn_centre(ch.add, pa, mean[bg]);
        float s[3] = {0.0f, 0.0f, 0.0f};
        for_fp32_pairs(x + o, dy + o, a.HW, [&](const float* xv, const float* dv, int64_t m, int64_t) {
          bwd_sums_row(xv, dv, m, px, centre, r, ch, a.silu, s);
        });
        for (int j = 0; j < 3; ++j) sums[j * BC + b * a.C + c] = s[j];
      }
      const std::pair<float, float> m = group_m(a, sums, b, g);
      const float m1 = m.first, m2 = m.second;
      add_grads(a, sums, b, g, r, m1, m2);
      for (int64_t c = g * a.CG; c < (g + 1) * a.CG; ++c) {
        const int64_t o = (b * a.C + c) * a.HW;
        const GnChannel ch = gn_channel(a, b, c);
        const float centre = gn_centre(ch.add, pa, mean[bg]);
        for_fp32_pairs(x + o, dy + o, a.HW, [&](const float* xv, const float* dv, int64_t m, int64_t i0) {
          float* d = std::is_same_v<scalar_t, float> ? reinterpret_cast<float*>(dx + o + i0) : out;
          bwd_dx_row(xv, dv, d, m, px, centre, r, ch, m1, m2, a.silu);
          store_fp32(d, dx + o + i0, m);
        });
      }
    }
  });
}

template <typename scalar_t>
void gn_backward_channels_last(const scalar_t* dy, const scalar_t* x, scalar_t* dx, float* sums, const float* mean,
                               const float* rstd, const GroupNormParams& a) {
  const int64_t B = a.B, C = a.C, HW = a.HW, BC = B * C;
  const RowSlices sl = row_slices(a, 2 * C);
  const int64_t rows = sl.rows, S = sl.S;
  // Per (b, c): the group's pivot x and rstd, the channel's coefficients, then its group's m1, m2.
  std::vector<float> cols(7 * BC);
  float *px_c = cols.data(), *rstd_c = px_c + BC, *centre_c = rstd_c + BC, *W_c = centre_c + BC, *B_c = W_c + BC;
  float *m1_c = B_c + BC, *m2_c = m1_c + BC;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t g = 0; g < a.G; ++g) {
      const int64_t bg = b * a.G + g;
      const GnPivot pv = gn_pivot(x, a, b, g);
      for (int64_t c = g * a.CG; c < (g + 1) * a.CG; ++c) {
        const int64_t bc = b * C + c;
        const GnChannel ch = gn_channel(a, b, c);
        px_c[bc] = pv.px;
        rstd_c[bc] = rstd[bg];
        centre_c[bc] = gn_centre(ch.add, pv.pa, mean[bg]);
        W_c[bc] = ch.W;
        B_c[bc] = ch.Bc;
      }
    }
  }
  auto columns = [&](int64_t b) {
    const int64_t o = b * C;
    return GnColumns{px_c + o, rstd_c + o, centre_c + o, W_c + o, B_c + o, m1_c + o, m2_c + o};
  };
  auto for_rows = [&](auto&& body) {  // body(task, b, row, x row, dy row as fp32, fp32 out buffer)
    at::parallel_for(0, B * S, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> buf(std::is_same_v<scalar_t, float> ? 0 : 3 * C);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / S, r0 = (task % S) * rows;
        for (int64_t r = r0; r < std::min(HW, r0 + rows); ++r) {
          const int64_t o = (b * HW + r) * C;
          body(task, b, o, as_fp32(x + o, C, buf.data()), as_fp32(dy + o, C, buf.data() + C), buf.data() + 2 * C);
        }
      }
    });
  };

  std::vector<float> part(B * S * 3 * C, 0.0f);  // [b, slice] -> per-channel S1, S2, S3
  for_rows([&](int64_t task, int64_t b, int64_t, const float* xv, const float* dv, float*) {
    float* p = part.data() + task * 3 * C;
    bwd_sums_cols(xv, dv, C, columns(b), a.silu, p, p + C, p + 2 * C);
  });
  for (int64_t b = 0; b < B; ++b) {
    for (int j = 0; j < 3; ++j) {
      float* out = sums + j * BC + b * C;
      std::fill(out, out + C, 0.0f);
      for (int64_t s = 0; s < S; ++s) {
        const float* p = part.data() + ((b * S + s) * 3 + j) * C;
        for (int64_t c = 0; c < C; ++c) out[c] += p[c];
      }
    }
    for (int64_t g = 0; g < a.G; ++g) {
      const auto [m1, m2] = group_m(a, sums, b, g);
      std::fill(m1_c + b * C + g * a.CG, m1_c + b * C + (g + 1) * a.CG, m1);
      std::fill(m2_c + b * C + g * a.CG, m2_c + b * C + (g + 1) * a.CG, m2);
      add_grads(a, sums, b, g, rstd[b * a.G + g], m1, m2);
    }
  }
  for_rows([&](int64_t, int64_t b, int64_t o, const float* xv, const float* dv, float* buf) {
    float* d = std::is_same_v<scalar_t, float> ? reinterpret_cast<float*>(dx + o) : buf;
    bwd_dx_cols(xv, dv, d, C, columns(b), a.silu);
    store_fp32(d, dx + o, C);
  });
}

std::tuple<at::Tensor, at::Tensor> group_norm_backward_cpu(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd, int64_t num_groups,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& add, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& shift, bool silu, bool channels_last) {
  const GroupNormParams a =
      group_norm_params(x, num_groups, weight, bias, 1.0, add, scale, shift, silu, channels_last);
  check_group_norm_backward(dy, x, mean, rstd, num_groups, channels_last);
  at::Tensor dx = at::empty_like(x, format_of(channels_last));
  at::Tensor sums = at::empty({4, a.B, a.C}, x.options().dtype(at::kFloat));
  if (x.numel() == 0) return {dx, sums.zero_()};
  DDPM_FAST_DISPATCH_KERNEL_TYPES(x.scalar_type(), "group_norm_backward_cpu", [&] {
    auto kernel = channels_last ? gn_backward_channels_last<scalar_t> : gn_backward_nchw<scalar_t>;
    kernel(dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), sums.data_ptr<float>(),
           mean.data_ptr<float>(), rstd.data_ptr<float>(), a);
  });
  return {dx, sums};
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, CPU, m) {
  m.impl("group_norm", &group_norm_cpu);
  m.impl("group_norm_backward", &group_norm_backward_cpu);
}

}  // namespace ddpm_fast
