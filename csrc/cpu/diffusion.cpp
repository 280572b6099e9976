// q_sample and the reverse step on the CPU, one pass over memory, noise drawn in registers.
//
//   p_step:   x_{t-1}[b, j] = step(x_t[b, j], out[b, j] (, out[b, C + ...]), z[b, j]; coefs[t_b])
//   q_sample: x_t[b, j] = sqrt(abar) x0[b, j] + sqrt(1 - abar) eps[b, j]  (eps written only if asked)
// j runs over one sample in NCHW order (the noise contract's element index).
// Work split: at::parallel_for over (sample, chunk of kChunk elements); inside, blocks of 64
// elements: 16 Philox calls + vectorised Box-Muller into a stack buffer, then the step.
// Bytes: p_step reads x_t and the model output (2C channels for learned_range) and writes
// x_{t-1}: 3 * N * sizeof(T) (+ N * sizeof(T) when noise is passed in); q_sample 2 * N * sizeof(T)
// (+ N * sizeof(T) for eps).  channels_last tensors are walked in NCHW order (strided).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "ddpm_fast/launch.h"
#include "ddpm_fast/step.h"
#include "normals.h"

namespace ddpm_fast {
namespace {

constexpr int64_t kChunk = 4096;  // elements per task: a multiple of the 64-element block

struct Geometry {
  int64_t B, N, C, HW;
  bool channels_last;
  // Offset of NCHW element j within one sample's storage.
  int64_t offset(int64_t j) const { return channels_last ? (j % HW) * C + j / HW : j; }
};

Geometry geometry(const at::Tensor& x, bool channels_last, const char* name) {
  check_layout(x, channels_last, name);
  check_kernel_dtype(x, name);
  Geometry g{x.size(0), x.size(0) ? x.numel() / x.size(0) : 0, x.size(1), 0, channels_last};
  g.HW = g.C ? g.N / g.C : 0;
  return g;
}

// The Philox seed and first sample index: rng's values when given (on the CPU, read here).
struct Key {
  uint64_t seed;
  int64_t sample_offset;
};

Key philox_key(int64_t seed, int64_t sample_offset, const std::optional<at::Tensor>& rng, const at::Tensor& x) {
  const int64_t* r = rng_ptr(rng, x);
  return r ? Key{static_cast<uint64_t>(r[0]), r[1]} : Key{static_cast<uint64_t>(seed), sample_offset};
}

// Calls body(b, j_begin, j_end) for every chunk, in parallel.
template <typename F>
void for_chunks(const Geometry& g, F body) {
  const int64_t chunks = (g.N + kChunk - 1) / kChunk;
  at::parallel_for(0, g.B * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, j0 = (task % chunks) * kChunk;
      body(b, j0, std::min(g.N, j0 + kChunk));
    }
  });
}

// The step on one block of floats, each option's branch hoisted out of its loop so every loop
// is straight-line and vectorises.  x0 doubles as the output.
inline void p_step_block(int n, const float* x, const float* o, const float* v, const float* z, float* x0,
                         const StepCoefs& k, const StepOptions& opt) {
  const float s1 = k.s1, s2 = k.s2;
  if (opt.prediction == kPredictEps) {
    for (int i = 0; i < n; ++i) x0[i] = (x[i] - s2 * o[i]) / s1;
  } else if (opt.prediction == kPredictSample) {
    for (int i = 0; i < n; ++i) x0[i] = o[i];
  } else {
    for (int i = 0; i < n; ++i) x0[i] = s1 * x[i] - s2 * o[i];
  }
  if (opt.clip) {
    const float r = opt.clip_range;
    for (int i = 0; i < n; ++i) x0[i] = x0[i] < -r ? -r : (x0[i] > r ? r : x0[i]);
  }
  if (opt.form == kFormPosterior) {
    for (int i = 0; i < n; ++i) x0[i] = k.c1 * x0[i] + k.c2 * x[i];
  } else if (opt.prediction == kPredictEps && !opt.clip) {
    for (int i = 0; i < n; ++i) x0[i] = k.recip_sqrt_alpha * (x[i] - k.eps_coef * o[i]);
  } else {
    for (int i = 0; i < n; ++i) x0[i] = k.recip_sqrt_alpha * (x[i] - k.eps_coef * ((x[i] - s1 * x0[i]) / s2));
  }
  if (!k.noisy) return;
  if (opt.variance == kLearnedRange) {
    for (int i = 0; i < n; ++i) {
      const float f = (v[i] + 1.0f) * 0.5f;
      x0[i] += cpu::exp_poly(0.5f * (f * k.log_beta + (1.0f - f) * k.log_post)) * z[i];
    }
  } else {
    for (int i = 0; i < n; ++i) x0[i] += k.sigma * z[i];
  }
}

template <typename scalar_t>
void p_step_kernel(const Geometry& g, const scalar_t* x, const scalar_t* out, const scalar_t* noise, scalar_t* y,
                   const int64_t* t, const float* table, int64_t T, uint64_t seed, int64_t sample_offset,
                   const StepOptions& opt) {
  constexpr int kB = cpu::kBlockElems;
  const bool learned = opt.variance == kLearnedRange;
  const int64_t out_stride = learned ? 2 * g.N : g.N;
  for_chunks(g, [&](int64_t b, int64_t j0, int64_t j1) {
    const StepCoefs k = load_coefs(table, T, t[b], opt.variance);
    const scalar_t* xb = x + b * g.N;
    const scalar_t* ob = out + b * out_stride;
    const scalar_t* nb = noise ? noise + b * g.N : nullptr;
    scalar_t* yb = y + b * g.N;
    float xf[kB], of[kB], vf[kB] = {}, zf[kB] = {}, yf[kB];
    for (int64_t jb = j0; jb < j1; jb += kB) {
      const int n = static_cast<int>(std::min<int64_t>(kB, j1 - jb));
      if (!g.channels_last) {
        for (int i = 0; i < n; ++i) {
          xf[i] = static_cast<float>(xb[jb + i]);
          of[i] = static_cast<float>(ob[jb + i]);
        }
        if (learned)
          for (int i = 0; i < n; ++i) vf[i] = static_cast<float>(ob[g.N + jb + i]);
        if (nb)
          for (int i = 0; i < n; ++i) zf[i] = static_cast<float>(nb[jb + i]);
      } else {
        for (int i = 0; i < n; ++i) {
          const int64_t j = jb + i, c = j / g.HW, hw = j % g.HW, m = hw * g.C + c;
          xf[i] = static_cast<float>(xb[m]);
          const int64_t mo = learned ? hw * 2 * g.C + c : m;  // out is [B, 2C, H, W] channels_last
          of[i] = static_cast<float>(ob[mo]);
          if (learned) vf[i] = static_cast<float>(ob[mo + g.C]);
          if (nb) zf[i] = static_cast<float>(nb[m]);
        }
      }
      if (!nb && k.noisy) {
        cpu::normal_block(seed, static_cast<uint32_t>(jb / 4), static_cast<uint32_t>(b + sample_offset),
                          static_cast<uint32_t>(clamp_t(t[b], T)), kStreamStep, zf);
      }
      p_step_block(n, xf, of, vf, zf, yf, k, opt);
      if (!g.channels_last) {
        for (int i = 0; i < n; ++i) yb[jb + i] = static_cast<scalar_t>(yf[i]);
      } else {
        for (int i = 0; i < n; ++i) yb[g.offset(jb + i)] = static_cast<scalar_t>(yf[i]);
      }
    }
  });
}

template <typename scalar_t>
void q_sample_kernel(const Geometry& g, const scalar_t* x0, const scalar_t* noise, scalar_t* y, scalar_t* eps_out,
                     const int64_t* t, const float* table, int64_t T, uint64_t seed, int64_t sample_offset) {
  constexpr int kB = cpu::kBlockElems;
  for_chunks(g, [&](int64_t b, int64_t j0, int64_t j1) {
    const int64_t tb = clamp_t(t[b], T);
    const float s1 = table[kSqrtAlphasCumprod * T + tb], s2 = table[kSqrtOneMinusAlphasCumprod * T + tb];
    const int64_t base = b * g.N;
    float xf[kB], zf[kB], yf[kB];
    for (int64_t jb = j0; jb < j1; jb += kB) {
      const int n = static_cast<int>(std::min<int64_t>(kB, j1 - jb));
      if (!g.channels_last) {
        for (int i = 0; i < n; ++i) xf[i] = static_cast<float>(x0[base + jb + i]);
        if (noise)
          for (int i = 0; i < n; ++i) zf[i] = static_cast<float>(noise[base + jb + i]);
      } else {
        for (int i = 0; i < n; ++i) {
          const int64_t m = base + g.offset(jb + i);
          xf[i] = static_cast<float>(x0[m]);
          if (noise) zf[i] = static_cast<float>(noise[m]);
        }
      }
      if (!noise) {
        cpu::normal_block(seed, static_cast<uint32_t>(jb / 4), static_cast<uint32_t>(b + sample_offset),
                          static_cast<uint32_t>(tb), kStreamQSample, zf);
      }
      for (int i = 0; i < n; ++i) yf[i] = q_sample_element(xf[i], zf[i], s1, s2);
      if (!g.channels_last) {
        for (int i = 0; i < n; ++i) y[base + jb + i] = static_cast<scalar_t>(yf[i]);
        if (eps_out)
          for (int i = 0; i < n; ++i) eps_out[base + jb + i] = static_cast<scalar_t>(zf[i]);
      } else {
        for (int i = 0; i < n; ++i) {
          const int64_t m = base + g.offset(jb + i);
          y[m] = static_cast<scalar_t>(yf[i]);
          if (eps_out) eps_out[m] = static_cast<scalar_t>(zf[i]);
        }
      }
    }
  });
}

at::Tensor p_step_cpu(const at::Tensor& x_t, const at::Tensor& model_output, const at::Tensor& t,
                      const at::Tensor& table, const std::optional<at::Tensor>& noise, int64_t seed,
                      int64_t sample_offset, const std::optional<at::Tensor>& rng, int64_t prediction,
                      int64_t variance, int64_t form, bool clip_sample, double clip_range, bool channels_last) {
  const Geometry g = geometry(x_t, channels_last, "x_t");
  const Key key = philox_key(seed, sample_offset, rng, x_t);
  check_schedule(t, table, x_t);
  check_model_output(model_output, x_t, variance, channels_last);
  if (noise) check_like(*noise, x_t, channels_last, "noise");
  at::Tensor y = at::empty_like(x_t, format_of(channels_last));
  if (x_t.numel() == 0) return y;
  const StepOptions opt{static_cast<int>(prediction), static_cast<int>(variance), static_cast<int>(form), clip_sample,
                        static_cast<float>(clip_range)};
  DDPM_FAST_DISPATCH_KERNEL_TYPES(x_t.scalar_type(), "p_step_cpu", [&] {
    p_step_kernel<scalar_t>(g, x_t.data_ptr<scalar_t>(), model_output.data_ptr<scalar_t>(),
                            noise ? noise->data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(),
                            t.data_ptr<int64_t>(), table.data_ptr<float>(), table.size(1), key.seed,
                            key.sample_offset, opt);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> q_sample_cpu(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& table,
                                                const std::optional<at::Tensor>& noise, int64_t seed,
                                                int64_t sample_offset, const std::optional<at::Tensor>& rng,
                                                bool return_noise, bool channels_last) {
  const Geometry g = geometry(x0, channels_last, "x0");
  const Key key = philox_key(seed, sample_offset, rng, x0);
  check_schedule(t, table, x0);
  if (noise) check_like(*noise, x0, channels_last, "noise");
  at::Tensor y = at::empty_like(x0, format_of(channels_last));
  at::Tensor eps = return_noise ? at::empty_like(x0, format_of(channels_last)) : at::empty({0}, x0.options());
  if (x0.numel() == 0) return {y, eps};
  DDPM_FAST_DISPATCH_KERNEL_TYPES(x0.scalar_type(), "q_sample_cpu", [&] {
    q_sample_kernel<scalar_t>(g, x0.data_ptr<scalar_t>(), noise ? noise->data_ptr<scalar_t>() : nullptr,
                              y.data_ptr<scalar_t>(), return_noise ? eps.data_ptr<scalar_t>() : nullptr,
                              t.data_ptr<int64_t>(), table.data_ptr<float>(), table.size(1), key.seed,
                              key.sample_offset);
  });
  return {y, eps};
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, CPU, m) {
  m.impl("p_step", &p_step_cpu);
  m.impl("q_sample", &q_sample_cpu);
}

}  // namespace ddpm_fast
