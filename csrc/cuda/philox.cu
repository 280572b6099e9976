// Philox noise on the GPU: z[i, j] under the noise contract, into a [B, n] output.
//
// Launch: one thread per group of 4 elements, grid-stride over B * ceil(n / 4) groups,
// 256 threads per block.  Each thread: one Philox4x32-10 call, two Box-Muller transforms,
// 4 stores.  Moves B * n * sizeof(out) bytes; compute-light (~100 int ops / 4 outputs).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>

#include "ddpm_fast/philox.h"

namespace ddpm_fast {
namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t work) {
  const int64_t b = (work + kThreads - 1) / kThreads;
  return static_cast<int>(std::min<int64_t>(b, 65535 * 8));
}

template <typename scalar_t>
__global__ void philox_randn_kernel(scalar_t* __restrict__ out, const int64_t* __restrict__ t, int64_t B,
                                    int64_t n, uint64_t seed, uint32_t stream, int64_t sample_offset) {
  const int64_t groups = (n + 3) / 4;
  for (int64_t flat = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; flat < B * groups;
       flat += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = flat / groups, g = flat % groups;
    const Normal4 z = normal4(seed, static_cast<uint32_t>(g), static_cast<uint32_t>(i + sample_offset),
                              static_cast<uint32_t>(t[i]), stream);
    scalar_t* dst = out + i * n + 4 * g;
    const int64_t k_end = min(static_cast<int64_t>(4), n - 4 * g);
    for (int64_t k = 0; k < k_end; ++k) dst[k] = static_cast<scalar_t>(z[static_cast<int>(k)]);
  }
}

__global__ void philox4x32_kernel(int64_t* __restrict__ out, const int64_t* __restrict__ c,
                                  const int64_t* __restrict__ k, int64_t N) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= N) return;
  const Words4 w = philox4x32_10(Words4{static_cast<uint32_t>(c[4 * r]), static_cast<uint32_t>(c[4 * r + 1]),
                                        static_cast<uint32_t>(c[4 * r + 2]), static_cast<uint32_t>(c[4 * r + 3])},
                                 static_cast<uint32_t>(k[2 * r]), static_cast<uint32_t>(k[2 * r + 1]));
  out[4 * r] = w.x;
  out[4 * r + 1] = w.y;
  out[4 * r + 2] = w.z;
  out[4 * r + 3] = w.w;
}

at::Tensor philox_randn_cuda(const at::Tensor& t, at::IntArrayRef sample_shape, int64_t seed, int64_t stream,
                             int64_t sample_offset, at::ScalarType dtype) {
  TORCH_CHECK(t.dim() == 1 && t.scalar_type() == at::kLong, "t: expected an int64 tensor [B]");
  const c10::cuda::CUDAGuard guard(t.device());
  std::vector<int64_t> shape{t.size(0)};
  shape.insert(shape.end(), sample_shape.begin(), sample_shape.end());
  at::Tensor out = at::empty(shape, t.options().dtype(dtype));
  const int64_t B = t.size(0), n = B ? out.numel() / B : 0;
  if (out.numel() == 0) return out;
  const at::Tensor tc = t.contiguous();
  const int64_t groups = B * ((n + 3) / 4);
  auto cuda_stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "philox_randn_cuda", [&] {
    philox_randn_kernel<scalar_t><<<blocks_for(groups), kThreads, 0, cuda_stream>>>(
        out.data_ptr<scalar_t>(), tc.data_ptr<int64_t>(), B, n, static_cast<uint64_t>(seed),
        static_cast<uint32_t>(stream), sample_offset);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor philox4x32_cuda(const at::Tensor& counter, const at::Tensor& key) {
  TORCH_CHECK(counter.dim() == 2 && counter.size(1) == 4 && counter.scalar_type() == at::kLong,
              "counter: expected an int64 tensor [N, 4]");
  TORCH_CHECK(key.dim() == 2 && key.size(1) == 2 && key.size(0) == counter.size(0) && key.scalar_type() == at::kLong,
              "key: expected an int64 tensor [N, 2] matching counter");
  const c10::cuda::CUDAGuard guard(counter.device());
  const at::Tensor c = counter.contiguous(), k = key.contiguous();
  at::Tensor out = at::empty_like(c);
  const int64_t N = c.size(0);
  if (N == 0) return out;
  philox4x32_kernel<<<static_cast<int>((N + kThreads - 1) / kThreads), kThreads, 0,
                      c10::cuda::getCurrentCUDAStream()>>>(out.data_ptr<int64_t>(), c.data_ptr<int64_t>(),
                                                           k.data_ptr<int64_t>(), N);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

// The architectures this file was compiled for, as nvcc saw them (__CUDA_ARCH_LIST__).
std::string cuda_arch_list() {
#define DF_STR2(...) #__VA_ARGS__
#define DF_STR(...) DF_STR2(__VA_ARGS__)
#ifdef __CUDA_ARCH_LIST__
  return DF_STR(__CUDA_ARCH_LIST__);
#else
  return "";
#endif
}

int cuda_compiler_version() { return __CUDACC_VER_MAJOR__ * 1000 + __CUDACC_VER_MINOR__ * 10; }

TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) {
  m.impl("philox_randn", &philox_randn_cuda);
  m.impl("philox4x32", &philox4x32_cuda);
}

}  // namespace ddpm_fast
