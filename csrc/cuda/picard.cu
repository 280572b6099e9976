// One Picard iteration over windows of reverse steps on the GPU (ddpm_fast/reference/picard.py).
//
//   S_j = step(x[a, j], out[a, j] (, v), z(seed, sample[a], t[a, j]); coefs[t[a, j]])   (step.h)
//         (t < 0, past the last step: S_j = x[a, j] and err[a, j] = 0)
//   x'[a, 0] = x[a, 0],   x'[a, j+1] = S_j + (x'[a, j] - x[a, j]),   err[a, j] = sum_n (x'[a, j+1] - x[a, j+1])^2
// Grid (cdiv(N, 4 * 256), A), 256 threads: a thread owns one Philox group (4 consecutive NCHW
// elements) of image a and walks the P positions in order, the carry x' - x in registers; per
// position the block sums the squared change (warp shuffles, then shared memory) into
// partial[a, block, j], which the launcher sums in block order: err is the same every run.
// Bytes per image: (P + 1) N reads of x, P N (2 P N for learned_range) of the model output,
// (P + 1) N writes: ~(3P + 2) N sizeof(T).  ~20 FLOPs and a quarter Philox call per element and position.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "ddpm_fast/launch.h"
#include "ddpm_fast/step.h"

namespace ddpm_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    picard_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ out, scalar_t* __restrict__ y,
                  float* __restrict__ partial, const int64_t* __restrict__ t, const int64_t* __restrict__ sample,
                  const float* __restrict__ table, int64_t T, uint64_t seed, int64_t P, int64_t N, StepOptions opt) {
  __shared__ float warp_sums[kWarps];
  const int64_t a = blockIdx.y;
  const int64_t group = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x, j0 = 4 * group;
  const bool learned = opt.variance == kLearnedRange;
  const int64_t ostride = learned ? 2 * N : N;
  const scalar_t* xa = x + a * (P + 1) * N;
  const scalar_t* oa = out + a * P * ostride;
  scalar_t* ya = y + a * (P + 1) * N;
  const uint32_t image = static_cast<uint32_t>(sample[a]);
  float xf[4], carry[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int l = 0; l < 4; ++l) {
    const bool in = j0 + l < N;
    xf[l] = in ? static_cast<float>(xa[j0 + l]) : 0.f;
    if (in) ya[j0 + l] = xa[j0 + l];
  }
  for (int64_t p = 0; p < P; ++p) {
    const int64_t tp = t[a * P + p];
    float s[4] = {xf[0], xf[1], xf[2], xf[3]};
    if (tp >= 0) {
      const StepCoefs k = load_coefs(table, T, tp, opt.variance);
      Normal4 z{0.f, 0.f, 0.f, 0.f};
      if (k.noisy) {
        z = normal4(seed, static_cast<uint32_t>(group), image, static_cast<uint32_t>(clamp_t(tp, T)), kStreamStep);
      }
      const scalar_t* op = oa + p * ostride;
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        const bool in = j0 + l < N;
        const float o = in ? static_cast<float>(op[j0 + l]) : 0.f;
        const float v = (in && learned) ? static_cast<float>(op[N + j0 + l]) : 0.f;
        s[l] = p_step_element(xf[l], o, v, z[l], k, opt);
      }
    }
    float local = 0.f;
    const scalar_t* xp = xa + (p + 1) * N;
    scalar_t* yp = ya + (p + 1) * N;
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const bool in = j0 + l < N;
      const float xn = in ? static_cast<float>(xp[j0 + l]) : 0.f;
      const float nv = s[l] + carry[l];
      const float d = nv - xn;
      if (in) {
        if (tp >= 0) local += d * d;
        yp[j0 + l] = static_cast<scalar_t>(nv);
      }
      carry[l] = d;
      xf[l] = xn;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) local += __shfl_down_sync(0xffffffffu, local, off);
    if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = local;
    __syncthreads();
    if (threadIdx.x == 0) {
      float total = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) total += warp_sums[w];
      partial[(a * gridDim.x + blockIdx.x) * P + p] = total;
    }
    __syncthreads();
  }
}

std::tuple<at::Tensor, at::Tensor> picard_step_cuda(const at::Tensor& x, const at::Tensor& model_output,
                                                    const at::Tensor& t, const at::Tensor& table,
                                                    const at::Tensor& sample, int64_t seed, int64_t prediction,
                                                    int64_t variance, int64_t form, bool clip_sample,
                                                    double clip_range) {
  const int64_t P = check_picard(x, model_output, t, sample, table, variance);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t A = x.size(0), N = x.numel() / std::max<int64_t>(1, A * (P + 1));
  at::Tensor y = at::empty_like(x);
  if (x.numel() == 0) return {y, at::zeros({A, P}, x.options().dtype(at::kFloat))};
  TORCH_CHECK(A <= 65535, "x: at most 65535 images per call, got ", A);
  const int64_t blocks = (N + 4 * kThreads - 1) / (4 * kThreads);
  at::Tensor partial = at::empty({A, blocks, P}, x.options().dtype(at::kFloat));
  const StepOptions opt{static_cast<int>(prediction), static_cast<int>(variance), static_cast<int>(form), clip_sample,
                        static_cast<float>(clip_range)};
  auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(A));
  DDPM_FAST_DISPATCH_KERNEL_TYPES(x.scalar_type(), "picard_step_cuda", [&] {
    picard_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), model_output.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), partial.data_ptr<float>(),
        t.data_ptr<int64_t>(), sample.data_ptr<int64_t>(), table.data_ptr<float>(), table.size(1),
        static_cast<uint64_t>(seed), P, N, opt);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, partial.sum(1)};
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) { m.impl("picard_step", &picard_step_cuda); }

}  // namespace ddpm_fast
