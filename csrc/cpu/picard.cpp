// One Picard iteration over windows of reverse steps on the CPU (ddpm_fast/reference/picard.py).
//
//   S_j = step(x[a, j], out[a, j] (, v), z(seed, sample[a], t[a, j]); coefs[t[a, j]])   (step.h)
//         (t < 0, past the last step: S_j = x[a, j] and err[a, j] = 0)
//   x'[a, 0] = x[a, 0],   x'[a, j+1] = S_j + (x'[a, j] - x[a, j]),   err[a, j] = sum_n (x'[a, j+1] - x[a, j+1])^2
// n runs over one image in NCHW order (the noise contract's element index).
// Work split: at::parallel_for over (image, chunk of kChunk elements); a task walks its chunk 64
// elements at a time and, for each block, the P positions in order (the scan runs along them):
// Philox normals into a stack buffer, the step, the carry x' - x in registers, and the squared
// change summed into the task's own partial[a, chunk, j]; err sums the partials in chunk order,
// so the result does not depend on the thread count.
// Bytes per image: reads x ((P + 1) N) and the model output (P N, 2 P N for learned_range), writes
// x' ((P + 1) N): ~(3P + 2) N sizeof(T).  ~20 FLOPs and a quarter of a Philox call per element and position.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "ddpm_fast/launch.h"
#include "ddpm_fast/step.h"
#include "normals.h"

namespace ddpm_fast {
namespace {

constexpr int64_t kChunk = 4096;  // elements per task: a multiple of the 64-element block

template <typename scalar_t>
void picard_kernel(const scalar_t* x, const scalar_t* out, scalar_t* y, float* partial, const int64_t* t,
                   const int64_t* sample, const float* table, int64_t T, uint64_t seed, int64_t A, int64_t P,
                   int64_t N, const StepOptions& opt) {
  constexpr int kB = cpu::kBlockElems;
  const bool learned = opt.variance == kLearnedRange;
  const int64_t out_stride = learned ? 2 * N : N;  // per window position
  const int64_t chunks = (N + kChunk - 1) / kChunk;
  at::parallel_for(0, A * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t a = task / chunks, j0 = (task % chunks) * kChunk, j1 = std::min(N, j0 + kChunk);
      const scalar_t* xa = x + a * (P + 1) * N;
      const scalar_t* oa = out + a * P * out_stride;
      scalar_t* ya = y + a * (P + 1) * N;
      const int64_t* ta = t + a * P;
      float* part = partial + task * P;
      std::fill(part, part + P, 0.0f);
      float xf[kB], xn[kB], of[kB], vf[kB] = {}, zf[kB] = {}, carry[kB];
      for (int64_t jb = j0; jb < j1; jb += kB) {
        const int n = static_cast<int>(std::min<int64_t>(kB, j1 - jb));
        for (int i = 0; i < n; ++i) {
          xf[i] = static_cast<float>(xa[jb + i]);
          ya[jb + i] = xa[jb + i];
          carry[i] = 0.0f;
        }
        for (int64_t p = 0; p < P; ++p) {
          const scalar_t* xp = xa + (p + 1) * N;
          for (int i = 0; i < n; ++i) xn[i] = static_cast<float>(xp[jb + i]);
          if (ta[p] >= 0) {
            const StepCoefs k = load_coefs(table, T, ta[p], opt.variance);
            const scalar_t* op = oa + p * out_stride;
            for (int i = 0; i < n; ++i) of[i] = static_cast<float>(op[jb + i]);
            if (learned)
              for (int i = 0; i < n; ++i) vf[i] = static_cast<float>(op[N + jb + i]);
            if (k.noisy) {
              cpu::normal_block(seed, static_cast<uint32_t>(jb / 4), static_cast<uint32_t>(sample[a]),
                                static_cast<uint32_t>(clamp_t(ta[p], T)), kStreamStep, zf);
            }
            // The mean from step.h, then the noise term as diffusion.cpp's p_step adds it (its learned
            // sigma through cpu::exp_poly), so a window of one gives p_step's bits.
            StepCoefs mean_only = k;
            mean_only.noisy = false;
            for (int i = 0; i < n; ++i) xf[i] = p_step_element(xf[i], of[i], vf[i], zf[i], mean_only, opt);
            if (k.noisy && learned) {
              for (int i = 0; i < n; ++i) {
                const float f = (vf[i] + 1.0f) * 0.5f;
                xf[i] += cpu::exp_poly(0.5f * (f * k.log_beta + (1.0f - f) * k.log_post)) * zf[i];
              }
            } else if (k.noisy) {
              for (int i = 0; i < n; ++i) xf[i] += k.sigma * zf[i];
            }
          }
          double sum = 0.0;
          scalar_t* yp = ya + (p + 1) * N;
          for (int i = 0; i < n; ++i) {
            const float v = xf[i] + carry[i];
            const float d = v - xn[i];
            sum += static_cast<double>(d) * d;
            carry[i] = d;
            yp[jb + i] = static_cast<scalar_t>(v);
            xf[i] = xn[i];
          }
          if (ta[p] >= 0) part[p] += static_cast<float>(sum);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> picard_step_cpu(const at::Tensor& x, const at::Tensor& model_output,
                                                   const at::Tensor& t, const at::Tensor& table,
                                                   const at::Tensor& sample, int64_t seed, int64_t prediction,
                                                   int64_t variance, int64_t form, bool clip_sample,
                                                   double clip_range) {
  const int64_t P = check_picard(x, model_output, t, sample, table, variance);
  const int64_t A = x.size(0), N = x.numel() / std::max<int64_t>(1, A * (P + 1));
  at::Tensor y = at::empty_like(x);
  const int64_t chunks = (N + kChunk - 1) / kChunk;
  at::Tensor partial = at::empty({A, chunks, P}, x.options().dtype(at::kFloat));
  if (x.numel() == 0) return {y, at::zeros({A, P}, x.options().dtype(at::kFloat))};
  const StepOptions opt{static_cast<int>(prediction), static_cast<int>(variance), static_cast<int>(form), clip_sample,
                        static_cast<float>(clip_range)};
  DDPM_FAST_DISPATCH_KERNEL_TYPES(x.scalar_type(), "picard_step_cpu", [&] {
    picard_kernel<scalar_t>(x.data_ptr<scalar_t>(), model_output.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                            partial.data_ptr<float>(), t.data_ptr<int64_t>(), sample.data_ptr<int64_t>(),
                            table.data_ptr<float>(), table.size(1), static_cast<uint64_t>(seed), A, P, N, opt);
  });
  return {y, partial.sum(1)};
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, CPU, m) { m.impl("picard_step", &picard_step_cpu); }

}  // namespace ddpm_fast
