// q_sample and the reverse step on the GPU: one pass over memory, noise drawn in registers.
//
//   p_step:   x_{t-1}[b, j] = step(x_t[b, j], out[b, j] (, v), z[b, j]; coefs[t_b])  (step.h)
//   q_sample: x_t[b, j] = sqrt(abar) x0[b, j] + sqrt(1 - abar) eps[b, j]
// Grid: blockIdx.y walks the samples b (stride gridDim.y, so any B) and loads t_b's coefficients once
// per sample; blockIdx.x and threadIdx.x walk the work items of one sample (grid-stride, 32-bit: the
// launchers check that a sample, 2C channels of model output included, has < 2^31 elements).  Blocks
// of 256 threads, or the multiple of 32 that covers a sample's items when fewer.
// Contiguous NCHW: one item per 16 bytes of a sample (4 fp32 or 8 fp16/bf16 elements, i.e. one or
//   two Philox groups), 128-bit loads and stores when the sample length is a multiple of that and
//   the pointers are 16-byte aligned, scalar loads otherwise (tails, odd sizes).
// channels_last (NHWC in memory; the noise follows the NCHW index j = c HW + hw): one item per
//   Philox group and channel, item = q C + c with c fastest.  It draws group g = floor(c HW / 4) + q,
//   j = 4g .. 4g + 3, and handles the lanes that fall in channel c (hw = 4g + l - c HW): one Philox
//   call for up to 4 elements.  With HW % 4 == 0 every group lies in one channel; otherwise a group
//   that straddles channels c and c + 1 is drawn by both items, each keeping its own lanes (at most
//   one extra call per channel and sample).  A warp's lanes take consecutive c at (nearly) the same
//   hw, so each of an item's 4 loads and stores is coalesced along c: whole for C >= 32, and for
//   small C the 4 together cover one contiguous span (L1 serves the loads, L2 merges the stores).
//   The items' index math is ddpm_fast/channels_last.h (host-tested by channels_last_test).  With
//   C = 1 or HW = 1 the memory order is NCHW's, and the contiguous kernels run.
// The Philox seed and sample offset come from the int arguments, or from an int64 [2] device tensor
// (rng) read at run time, so one captured CUDA graph serves every batch of a run.
// Bytes: p_step 3 * N * sizeof(T) (+N for learned_range's v, +N when noise is passed in);
// q_sample 2 * N * sizeof(T) (+N when eps is returned).  ~15 FLOPs + 1/4 Philox per element
// (channels_last with HW % 4 != 0: at most 1/4 + 1/HW Philox).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "ddpm_fast/channels_last.h"
#include "ddpm_fast/launch.h"
#include "ddpm_fast/step.h"

namespace ddpm_fast {
namespace {

constexpr int kThreads = 256;

struct Geometry {
  dim3 grid;
  int threads;
};

// B samples of `items` work items each (the grid described above).
Geometry geometry(int64_t B, int64_t items) {
  const int threads = static_cast<int>(std::min<int64_t>(kThreads, (items + 31) / 32 * 32));
  return {dim3(static_cast<unsigned>(std::min<int64_t>((items + threads - 1) / threads, 1 << 20)),
               static_cast<unsigned>(std::min<int64_t>(B, 65535))),
          threads};
}

// The 4 bytes at v: one float32, or two 16-bit values.
template <typename scalar_t>
__device__ __forceinline__ uint32_t bits32(const scalar_t* v) {
  if constexpr (sizeof(scalar_t) == 4) {
    return __float_as_uint(v[0]);
  } else {
    return static_cast<uint32_t>(v[0].x) | static_cast<uint32_t>(v[1].x) << 16;
  }
}

template <typename scalar_t>
struct Pack {  // 16 bytes of elements
  static constexpr int kElems = 16 / sizeof(scalar_t);
  struct alignas(16) Vec {
    scalar_t v[kElems];
  };
  static __device__ __forceinline__ Vec load(const scalar_t* p) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    Vec v;
    memcpy(&v, &u, sizeof v);
    return v;
  }
  // st.global.v4 by intrinsic: nvcc split a plain uint4 store through this pointer into 4 (or 8) stores.
  static __device__ __forceinline__ void store(scalar_t* p, const Vec& v) {
    constexpr int W = 4 / sizeof(scalar_t);
    __stwb(reinterpret_cast<uint4*>(p),
           make_uint4(bits32(v.v), bits32(v.v + W), bits32(v.v + 2 * W), bits32(v.v + 3 * W)));
  }
};

struct Launch {
  int64_t B;
  uint32_t N, C, HW;  // per sample: elements, channels, H * W
  uint32_t items;     // work items per sample
  FastDivmod by_C;    // channels_last: item -> (q, c)
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
__global__ void __launch_bounds__(kThreads)
    p_step_contiguous(const scalar_t* __restrict__ x, const scalar_t* __restrict__ out,
                      const scalar_t* __restrict__ noise, scalar_t* __restrict__ y, Launch L, StepOptions opt) {
  const Key key = philox_key(L);
  using P = Pack<scalar_t>;
  constexpr int E = P::kElems;
  const bool learned = opt.variance == kLearnedRange;
  const uint32_t N = L.N;
  for (int64_t b = blockIdx.y; b < L.B; b += gridDim.y) {
    const StepCoefs k = load_coefs(L.table, L.T, L.t[b], opt.variance);
    const bool draw = !noise && k.noisy;
    const uint32_t sample = static_cast<uint32_t>(b + key.sample_offset);
    const uint32_t tb = static_cast<uint32_t>(clamp_t(L.t[b], L.T));
    const scalar_t* xb = x + b * N;
    const scalar_t* ob = out + b * (learned ? 2 * static_cast<int64_t>(N) : N);
    const scalar_t* nb = noise ? noise + b * N : nullptr;
    scalar_t* yb = y + b * N;
    for (uint32_t item = blockIdx.x * blockDim.x + threadIdx.x; item < L.items; item += gridDim.x * blockDim.x) {
      const uint32_t j0 = item * E;
      typename P::Vec xs, os, vs{}, zs{}, ys;
      if (kVector) {
        xs = P::load(xb + j0);
        os = P::load(ob + j0);
        if (learned) vs = P::load(ob + N + j0);
        if (nb) zs = P::load(nb + j0);
      } else {
#pragma unroll
        for (int e = 0; e < E; ++e) {
          const bool in = j0 + e < N;
          xs.v[e] = in ? xb[j0 + e] : scalar_t(0);
          os.v[e] = in ? ob[j0 + e] : scalar_t(0);
          vs.v[e] = (in && learned) ? ob[N + j0 + e] : scalar_t(0);
          zs.v[e] = (in && nb) ? nb[j0 + e] : scalar_t(0);
        }
      }
#pragma unroll
      for (int g = 0; g < E / 4; ++g) {
        Normal4 z{0.f, 0.f, 0.f, 0.f};
        if (draw) z = normal4(key.seed, j0 / 4 + g, sample, tb, kStreamStep);
#pragma unroll
        for (int l = 0; l < 4; ++l) {
          const int e = 4 * g + l;
          const float zi = nb ? static_cast<float>(zs.v[e]) : z[l];
          ys.v[e] = static_cast<scalar_t>(p_step_element(static_cast<float>(xs.v[e]), static_cast<float>(os.v[e]),
                                                       static_cast<float>(vs.v[e]), zi, k, opt));
        }
      }
      if (kVector) {
        P::store(yb + j0, ys);
      } else {
#pragma unroll
        for (int e = 0; e < E; ++e)
          if (j0 + e < N) yb[j0 + e] = ys.v[e];
      }
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    p_step_channels_last(const scalar_t* __restrict__ x, const scalar_t* __restrict__ out,
                         const scalar_t* __restrict__ noise, scalar_t* __restrict__ y, Launch L, StepOptions opt) {
  const Key key = philox_key(L);
  const bool learned = opt.variance == kLearnedRange;
  const uint32_t N = L.N, C = L.C, HW = L.HW, OC = learned ? 2 * C : C;  // OC: model output channels
  for (int64_t b = blockIdx.y; b < L.B; b += gridDim.y) {
    const StepCoefs k = load_coefs(L.table, L.T, L.t[b], opt.variance);
    const bool draw = !noise && k.noisy;
    const uint32_t sample = static_cast<uint32_t>(b + key.sample_offset);
    const uint32_t tb = static_cast<uint32_t>(clamp_t(L.t[b], L.T));
    const scalar_t* xb = x + b * N;
    const scalar_t* ob = out + b * static_cast<int64_t>(OC) * HW;
    const scalar_t* nb = noise ? noise + b * N : nullptr;
    scalar_t* yb = y + b * N;
    for (uint32_t item = blockIdx.x * blockDim.x + threadIdx.x; item < L.items; item += gridDim.x * blockDim.x) {
      const ChannelGroup cg = channel_group(L.by_C, L.HW, item);
      if (static_cast<int32_t>(cg.hw0) >= static_cast<int32_t>(HW)) continue;  // channel c ends before group g
      float xs[4], os[4], vs[4], zs[4];
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        const uint32_t hw = cg.hw0 + l;
        const bool in = hw < HW;
        const uint32_t m = hw * C + cg.c, mo = hw * OC + cg.c;
        xs[l] = in ? static_cast<float>(xb[m]) : 0.f;
        os[l] = in ? static_cast<float>(ob[mo]) : 0.f;
        vs[l] = (in && learned) ? static_cast<float>(ob[mo + C]) : 0.f;
        zs[l] = (in && nb) ? static_cast<float>(nb[m]) : 0.f;
      }
      Normal4 z{0.f, 0.f, 0.f, 0.f};
      if (draw) z = normal4(key.seed, cg.g, sample, tb, kStreamStep);
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        const uint32_t hw = cg.hw0 + l;
        if (hw < HW) {
          yb[hw * C + cg.c] = static_cast<scalar_t>(p_step_element(xs[l], os[l], vs[l], nb ? zs[l] : z[l], k, opt));
        }
      }
    }
  }
}

// ----------------------------------------------------------------------- q_sample
template <typename scalar_t, bool kVector>
__global__ void __launch_bounds__(kThreads)
    q_sample_contiguous(const scalar_t* __restrict__ x0, const scalar_t* __restrict__ noise,
                        scalar_t* __restrict__ y, scalar_t* __restrict__ eps_out, Launch L) {
  const Key key = philox_key(L);
  using P = Pack<scalar_t>;
  constexpr int E = P::kElems;
  const uint32_t N = L.N;
  for (int64_t b = blockIdx.y; b < L.B; b += gridDim.y) {
    const int64_t tb = clamp_t(L.t[b], L.T);
    const float s1 = L.table[kSqrtAlphasCumprod * L.T + tb], s2 = L.table[kSqrtOneMinusAlphasCumprod * L.T + tb];
    const uint32_t sample = static_cast<uint32_t>(b + key.sample_offset);
    const scalar_t* xb = x0 + b * N;
    const scalar_t* nb = noise ? noise + b * N : nullptr;
    scalar_t* yb = y + b * N;
    scalar_t* eb = eps_out ? eps_out + b * N : nullptr;
    for (uint32_t item = blockIdx.x * blockDim.x + threadIdx.x; item < L.items; item += gridDim.x * blockDim.x) {
      const uint32_t j0 = item * E;
      typename P::Vec xs, zs{}, ys, es;
      if (kVector) {
        xs = P::load(xb + j0);
        if (nb) zs = P::load(nb + j0);
      } else {
#pragma unroll
        for (int e = 0; e < E; ++e) {
          const bool in = j0 + e < N;
          xs.v[e] = in ? xb[j0 + e] : scalar_t(0);
          zs.v[e] = (in && nb) ? nb[j0 + e] : scalar_t(0);
        }
      }
#pragma unroll
      for (int g = 0; g < E / 4; ++g) {
        Normal4 z{0.f, 0.f, 0.f, 0.f};
        if (!nb) z = normal4(key.seed, j0 / 4 + g, sample, static_cast<uint32_t>(tb), kStreamQSample);
#pragma unroll
        for (int l = 0; l < 4; ++l) {
          const int e = 4 * g + l;
          const float ev = nb ? static_cast<float>(zs.v[e]) : z[l];
          ys.v[e] = static_cast<scalar_t>(q_sample_element(static_cast<float>(xs.v[e]), ev, s1, s2));
          es.v[e] = static_cast<scalar_t>(ev);
        }
      }
      if (kVector) {
        P::store(yb + j0, ys);
        if (eb) P::store(eb + j0, es);
      } else {
#pragma unroll
        for (int e = 0; e < E; ++e) {
          if (j0 + e < N) {
            yb[j0 + e] = ys.v[e];
            if (eb) eb[j0 + e] = es.v[e];
          }
        }
      }
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    q_sample_channels_last(const scalar_t* __restrict__ x0, const scalar_t* __restrict__ noise,
                           scalar_t* __restrict__ y, scalar_t* __restrict__ eps_out, Launch L) {
  const Key key = philox_key(L);
  const uint32_t N = L.N, C = L.C, HW = L.HW;
  for (int64_t b = blockIdx.y; b < L.B; b += gridDim.y) {
    const int64_t tb = clamp_t(L.t[b], L.T);
    const float s1 = L.table[kSqrtAlphasCumprod * L.T + tb], s2 = L.table[kSqrtOneMinusAlphasCumprod * L.T + tb];
    const uint32_t sample = static_cast<uint32_t>(b + key.sample_offset);
    const scalar_t* xb = x0 + b * N;
    const scalar_t* nb = noise ? noise + b * N : nullptr;
    scalar_t* yb = y + b * N;
    scalar_t* eb = eps_out ? eps_out + b * N : nullptr;
    for (uint32_t item = blockIdx.x * blockDim.x + threadIdx.x; item < L.items; item += gridDim.x * blockDim.x) {
      const ChannelGroup cg = channel_group(L.by_C, L.HW, item);
      if (static_cast<int32_t>(cg.hw0) >= static_cast<int32_t>(HW)) continue;  // channel c ends before group g
      float xs[4], zs[4];
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        const uint32_t hw = cg.hw0 + l, m = hw * C + cg.c;
        xs[l] = hw < HW ? static_cast<float>(xb[m]) : 0.f;
        zs[l] = (hw < HW && nb) ? static_cast<float>(nb[m]) : 0.f;
      }
      Normal4 z{0.f, 0.f, 0.f, 0.f};
      if (!nb) z = normal4(key.seed, cg.g, sample, static_cast<uint32_t>(tb), kStreamQSample);
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        const uint32_t hw = cg.hw0 + l, m = hw * C + cg.c;
        if (hw < HW) {
          const float e = nb ? zs[l] : z[l];
          yb[m] = static_cast<scalar_t>(q_sample_element(xs[l], e, s1, s2));
          if (eb) eb[m] = static_cast<scalar_t>(e);
        }
      }
    }
  }
}

// ------------------------------------------------------------------------ launchers
// out_channels: the model output's channels per sample (2C for learned_range), bounding its
// per-sample offsets too.
Launch make_launch(const at::Tensor& x, const char* name, const at::Tensor& t, const at::Tensor& table, int64_t seed,
                   int64_t sample_offset, const std::optional<at::Tensor>& rng, bool channels_last,
                   int64_t out_channels) {
  check_layout(x, channels_last, name);
  check_kernel_dtype(x, name);
  check_schedule(t, table, x);
  Launch L{};
  L.B = x.size(0);
  const int64_t N = L.B ? x.numel() / L.B : 0, C = x.size(1), HW = C ? N / C : 0;
  TORCH_CHECK(HW * out_channels <= INT32_MAX, name, ": the CUDA kernels index a sample in 32 bits: at most 2^31 - 1 ",
              "elements per sample (model output included), got ", HW * out_channels);
  L.N = static_cast<uint32_t>(N);
  L.C = static_cast<uint32_t>(C);
  L.HW = static_cast<uint32_t>(HW);
  if (channels_last) {
    const int64_t per_channel = channels_last_groups_per_channel(C, HW);
    L.items = static_cast<uint32_t>(C * per_channel);  // <= N / 4 + 2C, so < 2^31 too
    if (C) L.by_C = FastDivmod(L.C);
  }
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
  const int64_t out_channels = (variance == kLearnedRange ? 2 : 1) * (x_t.dim() >= 2 ? x_t.size(1) : 0);
  Launch L = make_launch(x_t, "x_t", t, table, seed, sample_offset, rng, channels_last, out_channels);
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
    // One channel makes x_t's channels_last layout NCHW's, but not a learned_range output's: its
    // two channels stay interleaved.
    if (channels_last && L.HW > 1 && (L.C > 1 || variance == kLearnedRange)) {
      const Geometry g = geometry(L.B, L.items);
      p_step_channels_last<scalar_t><<<g.grid, g.threads, 0, stream>>>(xp, op, np, yp, L, opt);
    } else {
      constexpr int E = Pack<scalar_t>::kElems;
      L.items = (L.N + E - 1) / E;
      const Geometry g = geometry(L.B, L.items);
      const bool vec = L.N % E == 0 && aligned16(xp) && aligned16(op) && aligned16(yp) && (!np || aligned16(np));
      if (vec) {
        p_step_contiguous<scalar_t, true><<<g.grid, g.threads, 0, stream>>>(xp, op, np, yp, L, opt);
      } else {
        p_step_contiguous<scalar_t, false><<<g.grid, g.threads, 0, stream>>>(xp, op, np, yp, L, opt);
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
  Launch L = make_launch(x0, "x0", t, table, seed, sample_offset, rng, channels_last,
                         x0.dim() >= 2 ? x0.size(1) : 0);
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
    if (channels_last && L.C > 1 && L.HW > 1) {
      const Geometry g = geometry(L.B, L.items);
      q_sample_channels_last<scalar_t><<<g.grid, g.threads, 0, stream>>>(xp, np, yp, ep, L);
    } else {
      constexpr int E = Pack<scalar_t>::kElems;
      L.items = (L.N + E - 1) / E;
      const Geometry g = geometry(L.B, L.items);
      const bool vec =
          L.N % E == 0 && aligned16(xp) && aligned16(yp) && (!np || aligned16(np)) && (!ep || aligned16(ep));
      if (vec) {
        q_sample_contiguous<scalar_t, true><<<g.grid, g.threads, 0, stream>>>(xp, np, yp, ep, L);
      } else {
        q_sample_contiguous<scalar_t, false><<<g.grid, g.threads, 0, stream>>>(xp, np, yp, ep, L);
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
