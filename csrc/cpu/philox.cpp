// Philox noise on the CPU: z[i, j] under the noise contract, into a [B, n] output.
//
// Work split: at::parallel_for over blocks of 64 elements of one sample; each block is 16
// Philox4x32-10 calls and 32 Box-Muller transforms, vectorised (normals.h).
// Moves B * n * sizeof(out) bytes; ~100 integer ops and 6 transcendentals per 4 outputs.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>

#include "ddpm_fast/philox.h"
#include "normals.h"

namespace ddpm_fast {
namespace {

template <typename scalar_t>
void fill_normals(scalar_t* out, const int64_t* t, int64_t B, int64_t n, uint64_t seed, uint32_t stream,
                  int64_t sample_offset) {
  const int64_t blocks = (n + cpu::kBlockElems - 1) / cpu::kBlockElems;
  at::parallel_for(0, B * blocks, 64, [&](int64_t begin, int64_t end) {
    float z[cpu::kBlockElems];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / blocks, j0 = (task % blocks) * cpu::kBlockElems;
      cpu::normal_block(seed, static_cast<uint32_t>(j0 / 4), static_cast<uint32_t>(i + sample_offset),
                        static_cast<uint32_t>(t[i]), stream, z);
      const int64_t k_end = std::min<int64_t>(cpu::kBlockElems, n - j0);
      scalar_t* dst = out + i * n + j0;
      for (int64_t k = 0; k < k_end; ++k) dst[k] = static_cast<scalar_t>(z[k]);
    }
  });
}

at::Tensor philox_randn_cpu(const at::Tensor& t, at::IntArrayRef sample_shape, int64_t seed, int64_t stream,
                            int64_t sample_offset, at::ScalarType dtype) {
  TORCH_CHECK(t.dim() == 1 && t.scalar_type() == at::kLong, "t: expected an int64 tensor [B]");
  std::vector<int64_t> shape{t.size(0)};
  shape.insert(shape.end(), sample_shape.begin(), sample_shape.end());
  at::Tensor out = at::empty(shape, t.options().dtype(dtype));
  const int64_t B = t.size(0), n = B ? out.numel() / B : 0;
  if (out.numel() == 0) return out;
  const at::Tensor tc = t.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "philox_randn_cpu", [&] {
    fill_normals(out.data_ptr<scalar_t>(), tc.data_ptr<int64_t>(), B, n, static_cast<uint64_t>(seed),
                 static_cast<uint32_t>(stream), sample_offset);
  });
  return out;
}

at::Tensor philox4x32_cpu(const at::Tensor& counter, const at::Tensor& key) {
  TORCH_CHECK(counter.dim() == 2 && counter.size(1) == 4 && counter.scalar_type() == at::kLong,
              "counter: expected an int64 tensor [N, 4]");
  TORCH_CHECK(key.dim() == 2 && key.size(1) == 2 && key.size(0) == counter.size(0) && key.scalar_type() == at::kLong,
              "key: expected an int64 tensor [N, 2] matching counter");
  const at::Tensor c = counter.contiguous(), k = key.contiguous();
  at::Tensor out = at::empty_like(c);
  const int64_t* cp = c.data_ptr<int64_t>();
  const int64_t* kp = k.data_ptr<int64_t>();
  int64_t* op = out.data_ptr<int64_t>();
  for (int64_t r = 0; r < c.size(0); ++r) {
    const Words4 w = philox4x32_10(Words4{static_cast<uint32_t>(cp[4 * r]), static_cast<uint32_t>(cp[4 * r + 1]),
                                          static_cast<uint32_t>(cp[4 * r + 2]), static_cast<uint32_t>(cp[4 * r + 3])},
                                   static_cast<uint32_t>(kp[2 * r]), static_cast<uint32_t>(kp[2 * r + 1]));
    op[4 * r] = w.x;
    op[4 * r + 1] = w.y;
    op[4 * r + 2] = w.z;
    op[4 * r + 3] = w.w;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, CPU, m) {
  m.impl("philox_randn", &philox_randn_cpu);
  m.impl("philox4x32", &philox4x32_cpu);
}

}  // namespace ddpm_fast
