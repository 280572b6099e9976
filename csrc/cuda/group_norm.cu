// GroupNorm with fused input add, scale-shift and SiLU on the GPU:
//   y = act(GN(x + add) * (1 + scale) + shift), statistics in fp32.
//
// A group is n = Cg * HW values; element e of a group sits at (b*C + g*Cg)*HW + e in NCHW (the
// group is contiguous) and at b*HW*C + (e / Cg)*C + g*Cg + e % Cg in channels_last.
// - gn_onchip: one 256-thread block per (sample, group) when n <= 256 * kCache and there are
//   enough groups to fill the GPU; each thread caches up to kCache values in registers, the block
//   reduces the mean, then the centred variance, and writes y.  One read + one write.
// - gn_stats + gn_norm: grid (B*G, S) for large groups or small batches (batch 1 must not leave
//   SMs idle); gn_stats sums d and d^2 over a slice of n / S values, gn_norm reduces the S partials
//   and normalises its slice.  Two reads + one write.
// Every path works on d = (x - x_first) + (add - add_first) (see Pivot).
// ~10 FLOPs per element (+ expf for SiLU).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ddpm_fast/group_norm.h"

namespace ddpm_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kCache = 16;  // values per thread in gn_onchip: groups up to 4096 values

using Gn = GroupNormParams;

// Sum of v over the block, returned to every thread (two values at once).
__device__ float2 block_sum2(float a, float b) {
  __shared__ float2 partial[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, o);
    b += __shfl_xor_sync(0xffffffffu, b, o);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // partial[] may still be read from a previous call
  if (lane == 0) partial[warp] = make_float2(a, b);
  __syncthreads();
  float2 r = make_float2(0.f, 0.f);
  for (int w = 0; w < kThreads / 32; ++w) {
    r.x += partial[w].x;
    r.y += partial[w].y;
  }
  return r;
}

// Values are taken relative to the group's first x and add, d = (x - px) + (add - pa): exact for a
// large mean with a small spread, so nothing rounds at the scale of the mean.
struct Pivot {
  float x, a;
};

template <typename scalar_t>
__device__ Pivot pivot_of(const scalar_t* x, const Gn& p, int64_t b, int64_t g) {
  return Pivot{static_cast<float>(x[p.offset(b, g, 0)]), p.add ? p.add[b * p.C + g * p.CG] : 0.f};
}

template <typename scalar_t>
__device__ float load_value(const scalar_t* x, const Gn& p, int64_t b, int64_t g, int64_t e, Pivot pv) {
  float d = static_cast<float>(x[p.offset(b, g, e)]) - pv.x;
  if (p.add) d += p.add[b * p.C + p.channel(g, e)] - pv.a;
  return d;
}

template <typename scalar_t>
__device__ void store_value(scalar_t* y, const Gn& p, int64_t b, int64_t g, int64_t e, float v, float mean,
                            float rstd) {
  const int64_t c = p.channel(g, e);
  float r = (v - mean) * rstd;
  if (p.weight) r *= p.weight[c];
  if (p.bias) r += p.bias[c];
  if (p.scale) r *= 1.0f + p.scale[b * p.C + c];
  if (p.shift) r += p.shift[b * p.C + c];
  if (p.silu) r = r / (1.0f + expf(-r));
  y[p.offset(b, g, e)] = static_cast<scalar_t>(r);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) gn_onchip(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, Gn p) {
  const int64_t b = blockIdx.x / p.G, g = blockIdx.x % p.G;
  const Pivot pv = pivot_of(x, p, b, g);
  float v[kCache];
  float sum = 0.f;
#pragma unroll
  for (int k = 0; k < kCache; ++k) {
    const int64_t e = threadIdx.x + static_cast<int64_t>(k) * kThreads;
    v[k] = e < p.n ? load_value(x, p, b, g, e, pv) : 0.f;
    sum += v[k];
  }
  const float mean = block_sum2(sum, 0.f).x / static_cast<float>(p.n);
  float m2 = 0.f;
#pragma unroll
  for (int k = 0; k < kCache; ++k) {
    const int64_t e = threadIdx.x + static_cast<int64_t>(k) * kThreads;
    const float d = e < p.n ? v[k] - mean : 0.f;
    m2 += d * d;
  }
  const float rstd = rsqrtf(block_sum2(m2, 0.f).x / static_cast<float>(p.n) + p.eps);
#pragma unroll
  for (int k = 0; k < kCache; ++k) {
    const int64_t e = threadIdx.x + static_cast<int64_t>(k) * kThreads;
    if (e < p.n) store_value(y, p, b, g, e, v[k], mean, rstd);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) gn_stats(const scalar_t* __restrict__ x, float2* __restrict__ part, Gn p,
                                                     int64_t chunk) {
  const int64_t bg = blockIdx.x, b = bg / p.G, g = bg % p.G, s = blockIdx.y;
  const Pivot pv = pivot_of(x, p, b, g);
  float s1 = 0.f, s2 = 0.f;
  const int64_t end = min(p.n, (s + 1) * chunk);
  for (int64_t e = s * chunk + threadIdx.x; e < end; e += kThreads) {
    const float d = load_value(x, p, b, g, e, pv);
    s1 += d;
    s2 += d * d;
  }
  const float2 r = block_sum2(s1, s2);
  if (threadIdx.x == 0) part[bg * gridDim.y + s] = r;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) gn_norm(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                                                    const float2* __restrict__ part, Gn p, int64_t chunk) {
  const int64_t bg = blockIdx.x, b = bg / p.G, g = bg % p.G, s = blockIdx.y;
  float s1 = 0.f, s2 = 0.f;
  for (int k = threadIdx.x; k < static_cast<int>(gridDim.y); k += kThreads) {
    s1 += part[bg * gridDim.y + k].x;
    s2 += part[bg * gridDim.y + k].y;
  }
  const float2 r = block_sum2(s1, s2);
  const float n = static_cast<float>(p.n), md = r.x / n;
  const float rstd = rsqrtf(fmaxf(r.y / n - md * md, 0.f) + p.eps);
  const Pivot pv = pivot_of(x, p, b, g);
  const int64_t end = min(p.n, (s + 1) * chunk);
  for (int64_t e = s * chunk + threadIdx.x; e < end; e += kThreads) {
    store_value(y, p, b, g, e, load_value(x, p, b, g, e, pv), md, rstd);
  }
}

at::Tensor group_norm_cuda(const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias, double eps, const std::optional<at::Tensor>& add,
                           const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, bool silu,
                           bool channels_last) {
  const Gn p = group_norm_params(x, num_groups, weight, bias, eps, add, scale, shift, silu, channels_last);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = p.B;
  at::Tensor y = at::empty_like(x, format_of(channels_last));
  if (x.numel() == 0) return y;
  auto stream = c10::cuda::getCurrentCUDAStream();
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.device().index()));
  const int64_t groups = B * p.G;
  DDPM_FAST_DISPATCH_KERNEL_TYPES(x.scalar_type(), "group_norm_cuda", [&] {
    if (p.n <= static_cast<int64_t>(kThreads) * kCache && groups >= 2 * sms) {
      gn_onchip<scalar_t><<<static_cast<unsigned>(groups), kThreads, 0, stream>>>(x.data_ptr<scalar_t>(),
                                                                                  y.data_ptr<scalar_t>(), p);
    } else {
      const int64_t want = std::max<int64_t>(1, (4 * sms + groups - 1) / groups);
      const int64_t S = std::min<int64_t>({want, (p.n + kThreads - 1) / kThreads, 1024});
      const int64_t chunk = (p.n + S - 1) / S;
      const int64_t slices = (p.n + chunk - 1) / chunk;
      at::Tensor part = at::empty({groups * slices * 2}, x.options().dtype(at::kFloat));
      const dim3 grid(static_cast<unsigned>(groups), static_cast<unsigned>(slices));
      auto* pp = reinterpret_cast<float2*>(part.data_ptr<float>());
      gn_stats<scalar_t><<<grid, kThreads, 0, stream>>>(x.data_ptr<scalar_t>(), pp, p, chunk);
      gn_norm<scalar_t><<<grid, kThreads, 0, stream>>>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), pp, p, chunk);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) { m.impl("group_norm", &group_norm_cuda); }

}  // namespace ddpm_fast
