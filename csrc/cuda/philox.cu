// Philox noise on the GPU: z[i, j] under the noise contract, into a [B, n] output.
//
// Launch: blockIdx.y walks the samples i (stride gridDim.y, so any B), x the groups of 4 elements of
// one sample (grid-stride; 32-bit, n < 2^31 checked), 256 threads per block.  Each thread: one
// Philox4x32-10 call, two Box-Muller transforms (philox.h), one 4-element vector store when n % 4 == 0
// (16 bytes for float32, 8 for float16 / bfloat16, 2 x 16 for float64), else up to 4 scalar stores.
// Moves B * n * sizeof(out) bytes; compute-light (~200 instructions per 4 outputs on sm_90: the
// loop's ~250 static, less the two never-taken sqrt slow paths).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "ddpm_fast/philox.h"

namespace ddpm_fast {
namespace {

constexpr int kThreads = 256;

// A group's 4 values as one store of 8 or 16 bytes (two of 16 for double), by the st.global.v2/v4
// intrinsics: nvcc split plain vector stores through this pointer into per-element ones.
template <typename scalar_t>
__device__ __forceinline__ void store_group(scalar_t* dst, const Normal4& z) {
  if constexpr (sizeof(scalar_t) == 8) {
    __stwb(reinterpret_cast<double2*>(dst), make_double2(z.x, z.y));
    __stwb(reinterpret_cast<double2*>(dst) + 1, make_double2(z.z, z.w));
  } else if constexpr (sizeof(scalar_t) == 4) {
    __stwb(reinterpret_cast<float4*>(dst), make_float4(z.x, z.y, z.z, z.w));
  } else {
    const scalar_t v[4] = {static_cast<scalar_t>(z.x), static_cast<scalar_t>(z.y), static_cast<scalar_t>(z.z),
                           static_cast<scalar_t>(z.w)};
    __stwb(reinterpret_cast<uint2*>(dst), make_uint2(static_cast<uint32_t>(v[0].x) | uint32_t{v[1].x} << 16,
                                                      static_cast<uint32_t>(v[2].x) | uint32_t{v[3].x} << 16));
  }
}

// The alignment store_group needs.
template <typename scalar_t>
constexpr size_t kGroupAlign = sizeof(scalar_t) == 2 ? 8 : 16;

// kVector: n % 4 == 0 and the output aligned, so every group is whole and stored at once.
template <typename scalar_t, bool kVector>
__global__ void philox_randn_kernel(scalar_t* __restrict__ out, const int64_t* __restrict__ t, int64_t B,
                                    uint32_t n, uint64_t seed, uint32_t stream, int64_t sample_offset) {
  const uint32_t groups = (n + 3) / 4;
  for (int64_t i = blockIdx.y; i < B; i += gridDim.y) {
    const uint32_t sample = static_cast<uint32_t>(i + sample_offset), ti = static_cast<uint32_t>(t[i]);
    scalar_t* row = out + i * n;
    for (uint32_t g = blockIdx.x * blockDim.x + threadIdx.x; g < groups; g += gridDim.x * blockDim.x) {
      const Normal4 z = normal4(seed, g, sample, ti, stream);
      if (kVector) {
        store_group(row + 4 * g, z);
      } else {
#pragma unroll
        for (uint32_t k = 0; k < 4; ++k)
          if (4 * g + k < n) row[4 * g + k] = static_cast<scalar_t>(z[static_cast<int>(k)]);
      }
    }
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
  TORCH_CHECK(n <= INT32_MAX, "sample_shape: the CUDA kernel takes at most 2^31 - 1 elements per sample, got ", n);
  const at::Tensor tc = t.contiguous();
  const int64_t groups = (n + 3) / 4;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>((groups + kThreads - 1) / kThreads, 1 << 20)),
                  static_cast<unsigned>(std::min<int64_t>(B, 65535)));
  auto cuda_stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "philox_randn_cuda", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    const bool vec = n % 4 == 0 && reinterpret_cast<uintptr_t>(op) % kGroupAlign<scalar_t> == 0;
    const auto kernel = vec ? philox_randn_kernel<scalar_t, true> : philox_randn_kernel<scalar_t, false>;
    kernel<<<grid, kThreads, 0, cuda_stream>>>(op, tc.data_ptr<int64_t>(), B, static_cast<uint32_t>(n),
                                               static_cast<uint64_t>(seed), static_cast<uint32_t>(stream),
                                               sample_offset);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor philox4x32_cuda(const at::Tensor& counter, const at::Tensor& key) {
  TORCH_CHECK(counter.dim() == 2 && counter.size(1) == 4 && counter.scalar_type() == at::kLong,
              "counter: expected an int64 tensor [N, 4]");
  TORCH_CHECK(key.dim() == 2 && key.size(1) == 2 && key.size(0) == counter.size(0) && key.scalar_type() == at::kLong,
              "key: expected an int64 tensor [N, 2] matching counter");
  TORCH_CHECK(counter.is_cuda() && key.device() == counter.device(), "counter, key: expected both on one device, got ",
              counter.device(), " and ", key.device());
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
