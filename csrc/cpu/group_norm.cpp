// GroupNorm with fused input add, scale-shift and SiLU on the CPU:
//   y = act(GN(x + add) * (1 + scale) + shift), statistics in fp32.
//
// Both layouts take every value as d = (x - x_first) + (add_c - add_first) relative to its group's
// first value (exact for a large mean with a small spread), sum d and d^2, then fold mean, rstd,
// weight, bias, scale and shift into one multiply-add per channel, y = (d - mean) * A_c + B_c, then
// SiLU.  The loops are built for AVX-512/AVX2 (DF_CPU_CLONES) and run on fp32: straight on fp32
// input, through a buffer for fp16/bf16.
// - NCHW: at::parallel_for over (sample, group), >= ~32K values per thread so small maps do not pay
//   for waking threads.  A group is Cg contiguous rows of HW (one row when there is no add).
// - channels_last: a sample is HW rows of C contiguous channels, so the loops run across channels
//   with per-channel pivots: slices of rows are the tasks; per-channel partial sums per slice are
//   reduced per group, then the same slices write y.  Every cache line is used whole.
// The input is read twice, usually from cache, and written once: 2-3 * N * sizeof(T) bytes,
// ~6 FLOPs per element (+~20 with SiLU).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "ddpm_fast/group_norm.h"

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "normals.h"

namespace ddpm_fast {
namespace {

constexpr int kChunk = 64;
constexpr int64_t kValuesPerThread = 32768;

// s1 += sum d, s2 += sum d^2 over d = (v - px) + shift: v - px is exact for values near the pivot.
DF_CPU_CLONES void centred_sums(const float* v, int64_t n, float px, float shift, float* s1, float* s2) {
  float a1 = 0.0f, a2 = 0.0f;
#pragma omp simd reduction(+ : a1, a2)
  for (int64_t i = 0; i < n; ++i) {
    const float d = (v[i] - px) + shift;
    a1 += d;
    a2 += d * d;
  }
  *s1 += a1;
  *s2 += a2;
}

// out = ((v - px) + centre) * A + B: centring first keeps a large mean from cancelling in fp32.
DF_CPU_CLONES void centred_affine(const float* v, float* out, int64_t n, float px, float centre, float A, float B) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = ((v[i] - px) + centre) * A + B;
}

// The same two loops across one channels_last row, with per-channel pivots and coefficients.
DF_CPU_CLONES void channel_sums(const float* v, const float* px, const float* shift, float* s1, float* s2, int64_t C) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const float d = (v[c] - px[c]) + shift[c];
    s1[c] += d;
    s2[c] += d * d;
  }
}

DF_CPU_CLONES void channel_affine(const float* v, float* out, const float* px, const float* centre, const float* A,
                                  const float* B, int64_t C) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) out[c] = ((v[c] - px[c]) + centre[c]) * A[c] + B[c];
}

// Group (b, g)'s mean and rstd from its sums, folded into its channels' coefficients:
// y_c = ((x - px) + centre_c) * A_c + B_c.  pa is the group's pivot add.
void group_coefs(const GroupNormParams& a, int64_t b, int64_t g, float s1, float s2, float pa, float* centre,
                 float* A, float* Bc) {
  const float n = static_cast<float>(a.n), md = s1 / n;
  const float rstd = 1.0f / std::sqrt(std::max(s2 / n - md * md, 0.0f) + a.eps);
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
void group_norm_nchw(const scalar_t* x, scalar_t* y, const GroupNormParams& a) {
  const int64_t grain = std::max<int64_t>(1, kValuesPerThread / std::max<int64_t>(1, a.n));
  at::parallel_for(0, a.B * a.G, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> A(a.CG), Bc(a.CG), centre(a.CG);
    float buf[kChunk];
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / a.G, g = bg % a.G, c0 = g * a.CG;
      const scalar_t* xg = x + (b * a.C + c0) * a.HW;
      scalar_t* yg = y + (b * a.C + c0) * a.HW;
      auto add = [&](int64_t c) { return a.add ? a.add[b * a.C + c] : 0.0f; };
      // The pivot (x, add) of the group's first value, kept as two numbers so nothing rounds at |mean|.
      const float px = static_cast<float>(xg[0]), pa = add(c0);
      float s1 = 0.0f, s2 = 0.0f;
      if (!a.add) {  // one shift for the whole group: one contiguous row
        for_fp32_chunks(xg, a.n, [&](const float* v, int64_t m) { centred_sums(v, m, px, 0.0f, &s1, &s2); });
      } else {
        for (int64_t k = 0; k < a.CG; ++k) {
          const float shift = add(c0 + k) - pa;
          for_fp32_chunks(xg + k * a.HW, a.HW,
                          [&](const float* v, int64_t m) { centred_sums(v, m, px, shift, &s1, &s2); });
        }
      }
      group_coefs(a, b, g, s1, s2, pa, centre.data(), A.data(), Bc.data());
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

template <typename scalar_t>
void group_norm_channels_last(const scalar_t* x, scalar_t* y, const GroupNormParams& a) {
  const int64_t B = a.B, C = a.C, HW = a.HW;
  // Row slices: enough tasks for every thread, each >= ~32K values unless the sample is smaller.
  const int64_t min_rows = std::max<int64_t>(1, kValuesPerThread / C);
  const int64_t want = (at::get_num_threads() + B - 1) / B;
  const int64_t rows = std::max(min_rows, (HW + want - 1) / want);
  const int64_t S = (HW + rows - 1) / rows;

  // Per (b, c): the group's pivot x, the add shift relative to the group's pivot add.
  std::vector<float> px(B * C), shift(B * C), pa(B * a.G);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t g = 0; g < a.G; ++g) {
      const int64_t c0 = g * a.CG;
      pa[b * a.G + g] = a.add ? a.add[b * C + c0] : 0.0f;
      for (int64_t c = c0; c < c0 + a.CG; ++c) {
        px[b * C + c] = static_cast<float>(x[b * HW * C + c0]);
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

  std::vector<float> part(B * S * 2 * C, 0.0f);  // [b, slice] -> per-channel sum d, sum d^2
  for_rows([&](int64_t task, int64_t b, int64_t r0, int64_t r1, float* buf) {
    float* s1 = part.data() + task * 2 * C;
    for (int64_t r = r0; r < r1; ++r) {
      channel_sums(as_fp32(x + (b * HW + r) * C, C, buf), px.data() + b * C, shift.data() + b * C, s1, s1 + C, C);
    }
  });

  std::vector<float> A(B * C), Bc(B * C), centre(B * C);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t g = 0; g < a.G; ++g) {
      float s1 = 0.0f, s2 = 0.0f;
      for (int64_t s = 0; s < S; ++s) {
        const float* p = part.data() + (b * S + s) * 2 * C + g * a.CG;
        for (int64_t k = 0; k < a.CG; ++k) {
          s1 += p[k];
          s2 += p[C + k];
        }
      }
      const int64_t o = b * C + g * a.CG;
      group_coefs(a, b, g, s1, s2, pa[b * a.G + g], centre.data() + o, A.data() + o, Bc.data() + o);
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

at::Tensor group_norm_cpu(const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias, double eps, const std::optional<at::Tensor>& add,
                          const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, bool silu,
                          bool channels_last) {
  const GroupNormParams a =
      group_norm_params(x, num_groups, weight, bias, eps, add, scale, shift, silu, channels_last);
  at::Tensor y = at::empty_like(x, format_of(channels_last));
  if (x.numel() == 0) return y;
  DDPM_FAST_DISPATCH_KERNEL_TYPES(x.scalar_type(), "group_norm_cpu", [&] {
    if (channels_last) {
      group_norm_channels_last<scalar_t>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), a);
    } else {
      group_norm_nchw<scalar_t>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), a);
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, CPU, m) { m.impl("group_norm", &group_norm_cpu); }

}  // namespace ddpm_fast
