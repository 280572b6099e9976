// q_sample and the reverse step on the GPU: one pass over memory, noise drawn in registers.
//
//   p_step:   x_{t-1}[b, j] = step(x_t[b, j], out[b, j] (, v), z[b, j]; coefs[t_b])  (step.h)
//   q_sample: x_t[b, j] = sqrt(abar) x0[b, j] + sqrt(1 - abar) eps[b, j]
// Contiguous NCHW: one thread per 16 bytes of a sample (4 fp32 or 8 fp16/bf16 elements, i.e. one
//   or two Philox groups), 128-bit loads and stores when the sample length is a multiple of that
//   and the pointers are 16-byte aligned, scalar loads otherwise (tails, odd sizes).
// channels_last: one thread per element in memory order (coalesced); each element runs its own
//   Philox call and keeps the lane it needs (4x the RNG work, still far under the memory time).
// Grid-stride loops, 256 threads per block.  The Philox seed and sample offset come from the int
// arguments, or from an int64 [2] device tensor (rng) read at run time, so one captured CUDA graph
// serves every batch of a run.
// Bytes: p_step 3 * N * sizeof(T) (+N for learned_range's v, +N when noise is passed in);
// q_sample 2 * N * sizeof(T) (+N when eps is returned).  ~15 FLOPs + 1/4 Philox per element.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "ddpm_fast/launch.h"
#include "ddpm_fast/step.h"

namespace ddpm_fast {
namespace {

constexpr int kThreads = 256;

int grid_for(int64_t items) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((items + kThreads - 1) / kThreads, 65535 * 16)));
}

template <typename scalar_t>
struct Pack {  // 16 bytes of elements
  static constexpr int kElems = 16 / sizeof(scalar_t);
  struct alignas(16) Vec {
    scalar_t v[kElems];
  };
};

struct Launch {
  int64_t B, N, C, HW;
  const int64_t* t;
  const float* table;
  int64_t T;
  uint64_t seed;
  int64_t sample_offset;
  const int64_t* rng;  // (seed, sample_offset) in device memory, read in place of the two above when set
};

// The Philox seed and first sample index of this launch.  Read from device memory when rng is
// set, so a captured CUDA graph replays with the values of the moment.
struct Key {
  uint64_t seed;
  int64_t sample_offset;
};

__device__ __forceinline__ Key philox_key(const Launch& L) {
  return L.rng ? Key{static_cast<uint64_t>(L.rng[0]), L.rng[1]} : Key{L.seed, L.sample_offset};
}

// ------------------------------------------------------------------------- p_step
template <typename scalar_t, bool kVector>
__global__ void p_step_contiguous(const scalar_t* __restrict__ x, const scalar_t* __restrict__ out,
                                  const scalar_t* __restrict__ noise, scalar_t* __restrict__ y, Launch L,
                                  StepOptions opt) {
  const Key key = philox_key(L);
  using P = Pack<scalar_t>;
  constexpr int E = P::kElems;
  const bool learned = opt.variance == kLearnedRange;
  const int64_t per_sample = (L.N + E - 1) / E;
  for (int64_t item = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; item < L.B * per_sample;
       item += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = item / per_sample, j0 = (item % per_sample) * E;
    const StepCoefs k = load_coefs(L.table, L.T, L.t[b], opt.variance);
    const int64_t xo = b * L.N + j0, oo = b * (learned ? 2 * L.N : L.N) + j0;
    typename P::Vec xs, os, vs{}, zs{}, ys;
    if (kVector) {
      xs = *reinterpret_cast<const typename P::Vec*>(x + xo);
      os = *reinterpret_cast<const typename P::Vec*>(out + oo);
      if (learned) vs = *reinterpret_cast<const typename P::Vec*>(out + oo + L.N);
      if (noise) zs = *reinterpret_cast<const typename P::Vec*>(noise + xo);
    } else {
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const bool in = j0 + e < L.N;
        xs.v[e] = in ? x[xo + e] : scalar_t(0);
        os.v[e] = in ? out[oo + e] : scalar_t(0);
        vs.v[e] = (in && learned) ? out[oo + L.N + e] : scalar_t(0);
        zs.v[e] = (in && noise) ? noise[xo + e] : scalar_t(0);
      }
    }
#pragma unroll
    for (int g = 0; g < E / 4; ++g) {
      Normal4 z{0.f, 0.f, 0.f, 0.f};
      if (!noise && k.noisy) {
        z = normal4(key.seed, static_cast<uint32_t>((j0 + 4 * g) / 4), static_cast<uint32_t>(b + key.sample_offset),
                    static_cast<uint32_t>(clamp_t(L.t[b], L.T)), kStreamStep);
      }
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        const int e = 4 * g + l;
        const float zi = noise ? static_cast<float>(zs.v[e]) : z[l];
        ys.v[e] = static_cast<scalar_t>(p_step_element(static_cast<float>(xs.v[e]), static_cast<float>(os.v[e]),
                                                     static_cast<float>(vs.v[e]), zi, k, opt));
      }
    }
    if (kVector) {
      *reinterpret_cast<typename P::Vec*>(y + xo) = ys;
    } else {
#pragma unroll
      for (int e = 0; e < E; ++e)
        if (j0 + e < L.N) y[xo + e] = ys.v[e];
    }
  }
}

template <typename scalar_t>
__global__ void p_step_channels_last(const scalar_t* __restrict__ x, const scalar_t* __restrict__ out,
                                     const scalar_t* __restrict__ noise, scalar_t* __restrict__ y, Launch L,
                                     StepOptions opt) {
  const Key key = philox_key(L);
  const bool learned = opt.variance == kLearnedRange;
  for (int64_t m = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; m < L.B * L.N;
       m += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = m / L.N, r = m % L.N, hw = r / L.C, c = r % L.C, j = c * L.HW + hw;
    const StepCoefs k = load_coefs(L.table, L.T, L.t[b], opt.variance);
    const int64_t mo = learned ? b * 2 * L.N + hw * 2 * L.C + c : m;
    float z = 0.f;
    if (noise) {
      z = static_cast<float>(noise[m]);
    } else if (k.noisy) {
      z = normal4(key.seed, static_cast<uint32_t>(j / 4), static_cast<uint32_t>(b + key.sample_offset),
                  static_cast<uint32_t>(clamp_t(L.t[b], L.T)), kStreamStep)[static_cast<int>(j % 4)];
    }
    const float v = learned ? static_cast<float>(out[mo + L.C]) : 0.f;
    y[m] = static_cast<scalar_t>(p_step_element(static_cast<float>(x[m]), static_cast<float>(out[mo]), v, z, k, opt));
  }
}

// ----------------------------------------------------------------------- q_sample
template <typename scalar_t, bool kVector>
__global__ void q_sample_contiguous(const scalar_t* __restrict__ x0, const scalar_t* __restrict__ noise,
                                    scalar_t* __restrict__ y, scalar_t* __restrict__ eps_out, Launch L) {
  const Key key = philox_key(L);
  using P = Pack<scalar_t>;
  constexpr int E = P::kElems;
  const int64_t per_sample = (L.N + E - 1) / E;
  for (int64_t item = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; item < L.B * per_sample;
       item += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = item / per_sample, j0 = (item % per_sample) * E, o = b * L.N + j0;
    const int64_t tb = clamp_t(L.t[b], L.T);
    const float s1 = L.table[kSqrtAlphasCumprod * L.T + tb], s2 = L.table[kSqrtOneMinusAlphasCumprod * L.T + tb];
    typename P::Vec xs, zs{}, ys, es;
    if (kVector) {
      xs = *reinterpret_cast<const typename P::Vec*>(x0 + o);
      if (noise) zs = *reinterpret_cast<const typename P::Vec*>(noise + o);
    } else {
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const bool in = j0 + e < L.N;
        xs.v[e] = in ? x0[o + e] : scalar_t(0);
        zs.v[e] = (in && noise) ? noise[o + e] : scalar_t(0);
      }
    }
#pragma unroll
    for (int g = 0; g < E / 4; ++g) {
      Normal4 z{0.f, 0.f, 0.f, 0.f};
      if (!noise) {
        z = normal4(key.seed, static_cast<uint32_t>((j0 + 4 * g) / 4), static_cast<uint32_t>(b + key.sample_offset),
                    static_cast<uint32_t>(tb), kStreamQSample);
      }
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        const int e = 4 * g + l;
        const float ev = noise ? static_cast<float>(zs.v[e]) : z[l];
        ys.v[e] = static_cast<scalar_t>(q_sample_element(static_cast<float>(xs.v[e]), ev, s1, s2));
        es.v[e] = static_cast<scalar_t>(ev);
      }
    }
    if (kVector) {
      *reinterpret_cast<typename P::Vec*>(y + o) = ys;
      if (eps_out) *reinterpret_cast<typename P::Vec*>(eps_out + o) = es;
    } else {
#pragma unroll
      for (int e = 0; e < E; ++e) {
        if (j0 + e < L.N) {
          y[o + e] = ys.v[e];
          if (eps_out) eps_out[o + e] = es.v[e];
        }
      }
    }
  }
}

template <typename scalar_t>
__global__ void q_sample_channels_last(const scalar_t* __restrict__ x0, const scalar_t* __restrict__ noise,
                                       scalar_t* __restrict__ y, scalar_t* __restrict__ eps_out, Launch L) {
  const Key key = philox_key(L);
  for (int64_t m = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; m < L.B * L.N;
       m += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = m / L.N, r = m % L.N, hw = r / L.C, c = r % L.C, j = c * L.HW + hw;
    const int64_t tb = clamp_t(L.t[b], L.T);
    const float e = noise ? static_cast<float>(noise[m])
                          : normal4(key.seed, static_cast<uint32_t>(j / 4), static_cast<uint32_t>(b + key.sample_offset),
                                    static_cast<uint32_t>(tb), kStreamQSample)[static_cast<int>(j % 4)];
    y[m] = static_cast<scalar_t>(q_sample_element(static_cast<float>(x0[m]), e, L.table[kSqrtAlphasCumprod * L.T + tb],
                                                  L.table[kSqrtOneMinusAlphasCumprod * L.T + tb]));
    if (eps_out) eps_out[m] = static_cast<scalar_t>(e);
  }
}

// ------------------------------------------------------------------------ launchers
Launch make_launch(const at::Tensor& x, const char* name, const at::Tensor& t, const at::Tensor& table, int64_t seed,
                   int64_t sample_offset, const std::optional<at::Tensor>& rng, bool channels_last) {
  check_layout(x, channels_last, name);
  check_kernel_dtype(x, name);
  check_schedule(t, table, x);
  Launch L;
  L.B = x.size(0);
  L.N = L.B ? x.numel() / L.B : 0;
  L.C = x.size(1);
  L.HW = L.C ? L.N / L.C : 0;
  L.t = t.data_ptr<int64_t>();
  L.table = table.data_ptr<float>();
  L.T = table.size(1);
  L.seed = static_cast<uint64_t>(seed);
  L.sample_offset = sample_offset;
  L.rng = rng_ptr(rng, x);
  return L;
}

at::Tensor p_step_cuda(const at::Tensor& x_t, const at::Tensor& model_output, const at::Tensor& t,
                       const at::Tensor& table, const std::optional<at::Tensor>& noise, int64_t seed,
                       int64_t sample_offset, const std::optional<at::Tensor>& rng, int64_t prediction,
                       int64_t variance, int64_t form, bool clip_sample, double clip_range, bool channels_last) {
  // The checks first: a CUDA rng beside CPU samples lands here, and the guard needs a CUDA device.
  const Launch L = make_launch(x_t, "x_t", t, table, seed, sample_offset, rng, channels_last);
  const c10::cuda::CUDAGuard guard(x_t.device());
  check_model_output(model_output, x_t, variance, channels_last);
  if (noise) check_like(*noise, x_t, channels_last, "noise");
  at::Tensor y = at::empty_like(x_t, format_of(channels_last));
  if (x_t.numel() == 0) return y;
  const StepOptions opt{static_cast<int>(prediction), static_cast<int>(variance), static_cast<int>(form), clip_sample,
                        static_cast<float>(clip_range)};
  auto stream = c10::cuda::getCurrentCUDAStream();
  DDPM_FAST_DISPATCH_KERNEL_TYPES(x_t.scalar_type(), "p_step_cuda", [&] {
    const scalar_t* xp = x_t.data_ptr<scalar_t>();
    const scalar_t* op = model_output.data_ptr<scalar_t>();
    const scalar_t* np = noise ? noise->data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    if (channels_last) {
      p_step_channels_last<scalar_t><<<grid_for(L.B * L.N), kThreads, 0, stream>>>(xp, op, np, yp, L, opt);
    } else {
      constexpr int E = Pack<scalar_t>::kElems;
      const int64_t items = L.B * ((L.N + E - 1) / E);
      const bool vec = L.N % E == 0 && aligned16(xp) && aligned16(op) && aligned16(yp) && (!np || aligned16(np));
      if (vec) {
        p_step_contiguous<scalar_t, true><<<grid_for(items), kThreads, 0, stream>>>(xp, op, np, yp, L, opt);
      } else {
        p_step_contiguous<scalar_t, false><<<grid_for(items), kThreads, 0, stream>>>(xp, op, np, yp, L, opt);
      }
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

std::tuple<at::Tensor, at::Tensor> q_sample_cuda(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& table,
                                                 const std::optional<at::Tensor>& noise, int64_t seed,
                                                 int64_t sample_offset, const std::optional<at::Tensor>& rng,
                                                 bool return_noise, bool channels_last) {
  // The checks first: a CUDA rng beside CPU samples lands here, and the guard needs a CUDA device.
  const Launch L = make_launch(x0, "x0", t, table, seed, sample_offset, rng, channels_last);
  const c10::cuda::CUDAGuard guard(x0.device());
  if (noise) check_like(*noise, x0, channels_last, "noise");
  at::Tensor y = at::empty_like(x0, format_of(channels_last));
  at::Tensor eps = return_noise ? at::empty_like(x0, format_of(channels_last)) : at::empty({0}, x0.options());
  if (x0.numel() == 0) return {y, eps};
  auto stream = c10::cuda::getCurrentCUDAStream();
  DDPM_FAST_DISPATCH_KERNEL_TYPES(x0.scalar_type(), "q_sample_cuda", [&] {
    const scalar_t* xp = x0.data_ptr<scalar_t>();
    const scalar_t* np = noise ? noise->data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    scalar_t* ep = return_noise ? eps.data_ptr<scalar_t>() : nullptr;
    if (channels_last) {
      q_sample_channels_last<scalar_t><<<grid_for(L.B * L.N), kThreads, 0, stream>>>(xp, np, yp, ep, L);
    } else {
      constexpr int E = Pack<scalar_t>::kElems;
      const int64_t items = L.B * ((L.N + E - 1) / E);
      const bool vec = L.N % E == 0 && aligned16(xp) && aligned16(yp) && (!np || aligned16(np)) && (!ep || aligned16(ep));
      if (vec) {
        q_sample_contiguous<scalar_t, true><<<grid_for(items), kThreads, 0, stream>>>(xp, np, yp, ep, L);
      } else {
        q_sample_contiguous<scalar_t, false><<<grid_for(items), kThreads, 0, stream>>>(xp, np, yp, ep, L);
      }
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, eps};
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) {
  m.impl("p_step", &p_step_cuda);
  m.impl("q_sample", &q_sample_cuda);
}

}  // namespace ddpm_fast
