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
// Every path works on d = (x - x_first) + (add - add_first) (see Pivot); the group's mean of d and
// rstd go out (float32 [B, G]) for the backward.
// ~10 FLOPs per element (+ expf for SiLU).
//
// Backward (formula in csrc/include/ddpm_fast/group_norm.h), grid (B*G, S) like the split path:
// - gnb_sums: a block recomputes xhat and dz = dy act'(z) over its slice of n / S values, keeps a
//   running per-channel S1, S2, S3 in registers while its channel stays the same (always, for
//   channels_last with Cg dividing 256; a run of HW values for NCHW), flushes them into shared
//   memory [3][Cg] with atomics, and stores the slice's partials.
// - gnb_dx: a block reduces the S partials of its group (slice 0 stores the totals, the op's sums
//   [3, B, C]), forms m1 and m2, and writes dx over its slice.
// x and dy are read twice (the second time mostly from L2), dx written once: 5 * N * sizeof(T)
// bytes at worst, ~15 FLOPs per element per pass (+ expf with SiLU).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>
#include <utility>

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
__global__ void __launch_bounds__(kThreads) gn_onchip(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                                                      float* __restrict__ mean_out, float* __restrict__ rstd_out,
                                                      Gn p) {
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
  if (threadIdx.x == 0) {
    mean_out[blockIdx.x] = mean;
    rstd_out[blockIdx.x] = rstd;
  }
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
                                                    const float2* __restrict__ part, float* __restrict__ mean_out,
                                                    float* __restrict__ rstd_out, Gn p, int64_t chunk) {
  const int64_t bg = blockIdx.x, b = bg / p.G, g = bg % p.G, s = blockIdx.y;
  float s1 = 0.f, s2 = 0.f;
  for (int k = threadIdx.x; k < static_cast<int>(gridDim.y); k += kThreads) {
    s1 += part[bg * gridDim.y + k].x;
    s2 += part[bg * gridDim.y + k].y;
  }
  const float2 r = block_sum2(s1, s2);
  const float n = static_cast<float>(p.n), md = r.x / n;
  const float rstd = rsqrtf(fmaxf(r.y / n - md * md, 0.f) + p.eps);
  if (s == 0 && threadIdx.x == 0) {
    mean_out[bg] = md;
    rstd_out[bg] = rstd;
  }
  const Pivot pv = pivot_of(x, p, b, g);
  const int64_t end = min(p.n, (s + 1) * chunk);
  for (int64_t e = s * chunk + threadIdx.x; e < end; e += kThreads) {
    store_value(y, p, b, g, e, load_value(x, p, b, g, e, pv), md, rstd);
  }
}

// The split paths' slices: (S, values per slice), S enough to give the GPU ~4 blocks per SM.
std::pair<int64_t, int64_t> split_of(const Gn& p, int64_t groups, int sms) {
  const int64_t want = std::max<int64_t>(1, (4 * sms + groups - 1) / groups);
  const int64_t S = std::min<int64_t>({want, (p.n + kThreads - 1) / kThreads, 1024});
  const int64_t chunk = (p.n + S - 1) / S;
  return {(p.n + chunk - 1) / chunk, chunk};
}

int sm_count(const at::Tensor& x) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.device().index()));
  return sms;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_cuda(
    const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, const std::optional<at::Tensor>& add,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, bool silu, bool channels_last) {
  const Gn p = group_norm_params(x, num_groups, weight, bias, eps, add, scale, shift, silu, channels_last);
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
    if (p.n <= static_cast<int64_t>(kThreads) * kCache && groups >= 2 * sms) {
      gn_onchip<scalar_t><<<static_cast<unsigned>(groups), kThreads, 0, stream>>>(x.data_ptr<scalar_t>(),
                                                                                  y.data_ptr<scalar_t>(), mp, rp, p);
    } else {
      const auto [slices, chunk] = split_of(p, groups, sms);
      at::Tensor part = at::empty({groups * slices * 2}, x.options().dtype(at::kFloat));
      const dim3 grid(static_cast<unsigned>(groups), static_cast<unsigned>(slices));
      auto* pp = reinterpret_cast<float2*>(part.data_ptr<float>());
      gn_stats<scalar_t><<<grid, kThreads, 0, stream>>>(x.data_ptr<scalar_t>(), pp, p, chunk);
      gn_norm<scalar_t><<<grid, kThreads, 0, stream>>>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), pp, mp, rp, p,
                                                       chunk);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, mean, rstd};
}

// ------------------------------------------------------------------------------ backward
constexpr int64_t kMaxBackwardCg = 4096;  // 3 * Cg floats of shared memory: at most 48 KiB

__device__ float grad_z(float dy, float xh, const GnChannel& ch, bool silu) {
  if (!silu) return dy;
  const float z = xh * ch.W + ch.Bc;
  return gn_silu_grad(dy, z, 1.0f / (1.0f + expf(-z)));
}

__device__ void flush_sums(float* sh, int64_t k, int64_t CG, float a1, float a2, float a3) {
  atomicAdd(sh + k, a1);
  atomicAdd(sh + CG + k, a2);
  atomicAdd(sh + 2 * CG + k, a3);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) gnb_sums(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                                     const float* __restrict__ mean, const float* __restrict__ rstd,
                                                     float* __restrict__ part, Gn p, int64_t chunk) {
  extern __shared__ float sh[];  // [3][Cg]: this slice's S1, S2, S3 per channel
  const int64_t bg = blockIdx.x, b = bg / p.G, g = bg % p.G, s = blockIdx.y, c0 = g * p.CG;
  for (int64_t k = threadIdx.x; k < 3 * p.CG; k += kThreads) sh[k] = 0.f;
  __syncthreads();
  const Pivot pv = pivot_of(x, p, b, g);
  const float r = rstd[bg], md = mean[bg];
  int64_t cur = -1;
  GnChannel ch{0.f, 1.f, 0.f};
  float centre = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
  const int64_t end = min(p.n, (s + 1) * chunk);
  for (int64_t e = s * chunk + threadIdx.x; e < end; e += kThreads) {
    const int64_t c = p.channel(g, e);
    if (c != cur) {
      if (cur >= 0) flush_sums(sh, cur - c0, p.CG, a1, a2, a3);
      cur = c;
      ch = gn_channel(p, b, c);
      centre = gn_centre(ch.add, pv.a, md);
      a1 = a2 = a3 = 0.f;
    }
    const int64_t o = p.offset(b, g, e);
    const float xh = gn_xhat(static_cast<float>(x[o]), pv.x, centre, r);
    const float gz = grad_z(static_cast<float>(dy[o]), xh, ch, p.silu);
    a1 += gz;
    a2 += gz * xh;
    a3 += xh;
  }
  if (cur >= 0) flush_sums(sh, cur - c0, p.CG, a1, a2, a3);
  __syncthreads();
  float* out = part + (bg * gridDim.y + s) * 3 * p.CG;
  for (int64_t k = threadIdx.x; k < 3 * p.CG; k += kThreads) out[k] = sh[k];
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) gnb_dx(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                                   scalar_t* __restrict__ dx, const float* __restrict__ mean,
                                                   const float* __restrict__ rstd, const float* __restrict__ part,
                                                   float* __restrict__ sums, Gn p, int64_t chunk) {
  const int64_t bg = blockIdx.x, b = bg / p.G, g = bg % p.G, s = blockIdx.y, S = gridDim.y;
  float m1 = 0.f, m2 = 0.f;
  for (int64_t k = threadIdx.x; k < p.CG; k += kThreads) {
    float t1 = 0.f, t2 = 0.f, t3 = 0.f;
    for (int64_t q = 0; q < S; ++q) {
      const float* pp = part + (bg * S + q) * 3 * p.CG;
      t1 += pp[k];
      t2 += pp[p.CG + k];
      t3 += pp[2 * p.CG + k];
    }
    const int64_t c = g * p.CG + k;
    const float W = gn_channel(p, b, c).W;
    m1 += W * t1;
    m2 += W * t2;
    if (s == 0) {
      sums[b * p.C + c] = t1;
      sums[(p.B + b) * p.C + c] = t2;
      sums[(2 * p.B + b) * p.C + c] = t3;
    }
  }
  const float2 m = block_sum2(m1, m2);
  m1 = m.x / static_cast<float>(p.n);
  m2 = m.y / static_cast<float>(p.n);
  const Pivot pv = pivot_of(x, p, b, g);
  const float r = rstd[bg], md = mean[bg];
  int64_t cur = -1;
  GnChannel ch{0.f, 1.f, 0.f};
  float centre = 0.f;
  const int64_t end = min(p.n, (s + 1) * chunk);
  for (int64_t e = s * chunk + threadIdx.x; e < end; e += kThreads) {
    const int64_t c = p.channel(g, e);
    if (c != cur) {
      cur = c;
      ch = gn_channel(p, b, c);
      centre = gn_centre(ch.add, pv.a, md);
    }
    const int64_t o = p.offset(b, g, e);
    const float xh = gn_xhat(static_cast<float>(x[o]), pv.x, centre, r);
    dx[o] = static_cast<scalar_t>(gn_dx(grad_z(static_cast<float>(dy[o]), xh, ch, p.silu), xh, ch.W, r, m1, m2));
  }
}

std::tuple<at::Tensor, at::Tensor> group_norm_backward_cuda(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd, int64_t num_groups,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& add, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& shift, bool silu, bool channels_last) {
  const Gn p = group_norm_params(x, num_groups, weight, bias, 1.0, add, scale, shift, silu, channels_last);
  check_group_norm_backward(dy, x, mean, rstd, num_groups, channels_last);
  TORCH_CHECK(p.CG <= kMaxBackwardCg, "num_groups: the CUDA backward takes at most ", kMaxBackwardCg,
              " channels a group, got ", p.CG);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty_like(x, format_of(channels_last));
  at::Tensor sums = at::empty({3, p.B, p.C}, x.options().dtype(at::kFloat));
  if (x.numel() == 0) return {dx, sums.zero_()};
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t groups = p.B * p.G;
  const std::pair<int64_t, int64_t> split = split_of(p, groups, sm_count(x));
  const int64_t slices = split.first, chunk = split.second;
  at::Tensor part = at::empty({groups * slices * 3 * p.CG}, x.options().dtype(at::kFloat));
  const dim3 grid(static_cast<unsigned>(groups), static_cast<unsigned>(slices));
  const size_t shared = 3 * p.CG * sizeof(float);
  const float *mp = mean.data_ptr<float>(), *rp = rstd.data_ptr<float>();
  DDPM_FAST_DISPATCH_KERNEL_TYPES(x.scalar_type(), "group_norm_backward_cuda", [&] {
    gnb_sums<scalar_t><<<grid, kThreads, shared, stream>>>(dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), mp, rp,
                                                           part.data_ptr<float>(), p, chunk);
    gnb_dx<scalar_t><<<grid, kThreads, 0, stream>>>(dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                                                    dx.data_ptr<scalar_t>(), mp, rp, part.data_ptr<float>(),
                                                    sums.data_ptr<float>(), p, chunk);
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
