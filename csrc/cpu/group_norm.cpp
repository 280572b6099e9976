// GroupNorm with fused input add, scale-shift and SiLU on the CPU:
//   y = act(GN(x + add) * (1 + scale) + shift), statistics in fp32.
//
// Work split: at::parallel_for over (sample, group), at least ~32K values per thread so small maps
// do not pay for waking threads.  Pass 1 sums d and d^2 with d = (x - x_first) + (add_c - add_first),
// exact for a large mean with a small spread; pass 2 folds mean, rstd, weight, bias, scale and shift
// into one multiply-add per channel, y = (x + add_c - mean) * A_c + B_c, then SiLU.  Both passes run
// in loops built for AVX-512/AVX2 (DF_CPU_CLONES): straight on fp32 rows with unit stride (an NCHW
// group without add is one row), through a 64-value fp32 buffer otherwise (fp16/bf16, channels_last
// rows with stride C).  The group is read twice, usually from cache, and written once:
// 2-3 * N * sizeof(T) bytes, ~6 FLOPs per element (+~20 with SiLU).
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

// out = ((v - px) + shift) * A + B: centring first keeps a large mean from cancelling in fp32.
DF_CPU_CLONES void centred_affine(const float* v, float* out, int64_t n, float px, float shift, float A, float B) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = ((v[i] - px) + shift) * A + B;
}

// Calls f(values, count) over n values x[i * step] as fp32: directly for a unit-stride fp32 row,
// else in chunks converted into a buffer.
template <typename scalar_t, typename F>
void for_fp32_chunks(const scalar_t* x, int64_t step, int64_t n, F&& f) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (step == 1) return f(x, n);
  }
  float buf[kChunk];
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
    const int m = static_cast<int>(std::min<int64_t>(kChunk, n - i0));
    for (int i = 0; i < m; ++i) buf[i] = static_cast<float>(x[(i0 + i) * step]);
    f(buf, m);
  }
}

// y[i * step] = act(((x[i * step] - px) + shift) * A + B) for i < n; fp32 unit-stride rows are
// written straight to y and left to the caller to activate (one SiLU call for a whole NCHW group).
template <typename scalar_t>
void apply_row(const scalar_t* x, scalar_t* y, int64_t step, int64_t n, float px, float shift, float A, float B,
               bool silu) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (step == 1) return centred_affine(x, y, n, px, shift, A, B);
  }
  float buf[kChunk];
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
    const int m = static_cast<int>(std::min<int64_t>(kChunk, n - i0));
    for (int i = 0; i < m; ++i) buf[i] = static_cast<float>(x[(i0 + i) * step]);
    centred_affine(buf, buf, m, px, shift, A, B);
    if (silu) cpu::silu_inplace(buf, m);
    for (int i = 0; i < m; ++i) y[(i0 + i) * step] = static_cast<scalar_t>(buf[i]);
  }
}

template <typename scalar_t>
void group_norm_kernel(const scalar_t* x, scalar_t* y, const GroupNormParams& a) {
  const int64_t grain = std::max<int64_t>(1, kValuesPerThread / std::max<int64_t>(1, a.n));
  at::parallel_for(0, a.B * a.G, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> A(a.CG), Bc(a.CG), centre(a.CG);
    const int64_t step = a.channels_last ? a.C : 1;
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / a.G, c0 = (bg % a.G) * a.CG;
      auto row = [&](int64_t c) { return b * a.C * a.HW + (a.channels_last ? c : c * a.HW); };
      auto add = [&](int64_t c) { return a.add ? a.add[b * a.C + c] : 0.0f; };
      // The pivot (x, add) of the group's first value, kept as two numbers so nothing rounds at |mean|.
      const float px = static_cast<float>(x[row(c0)]), pa = add(c0);
      float s1 = 0.0f, s2 = 0.0f;
      if (!a.channels_last && !a.add) {  // the group is one contiguous row
        for_fp32_chunks(x + row(c0), 1, a.n, [&](const float* v, int64_t m) { centred_sums(v, m, px, 0.0f, &s1, &s2); });
      } else {
        for (int64_t c = c0; c < c0 + a.CG; ++c) {
          const float shift = add(c) - pa;
          for_fp32_chunks(x + row(c), step, a.HW,
                          [&](const float* v, int64_t m) { centred_sums(v, m, px, shift, &s1, &s2); });
        }
      }
      const float n = static_cast<float>(a.n), md = s1 / n;
      const float rstd = 1.0f / std::sqrt(std::max(s2 / n - md * md, 0.0f) + a.eps);
      for (int64_t k = 0; k < a.CG; ++k) {
        const int64_t c = c0 + k;
        const float w = a.weight ? a.weight[c] : 1.0f, bi = a.bias ? a.bias[c] : 0.0f;
        const float sc = 1.0f + (a.scale ? a.scale[b * a.C + c] : 0.0f), sh = a.shift ? a.shift[b * a.C + c] : 0.0f;
        centre[k] = (add(c) - pa) - md;
        A[k] = rstd * w * sc;
        Bc[k] = bi * sc + sh;
      }
      for (int64_t k = 0; k < a.CG; ++k) {
        const int64_t off = row(c0 + k);
        apply_row(x + off, y + off, step, a.HW, px, centre[k], A[k], Bc[k], a.silu);
      }
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (!a.channels_last && a.silu) cpu::silu_inplace(y + row(c0), a.n);
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_cpu", [&] {
    group_norm_kernel<scalar_t>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), a);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, CPU, m) { m.impl("group_norm", &group_norm_cpu); }

}  // namespace ddpm_fast
