// Host-side checks shared by the CPU and CUDA launchers.  ddpm_fast/ops.py validates every user
// argument with clear Python errors first; these guard the op schema itself (a direct
// torch.ops.ddpm_fast call) so a kernel never reads out of bounds.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <optional>

#include "ddpm_fast/step.h"

namespace ddpm_fast {

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

inline at::MemoryFormat format_of(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// x: [B, C, ...] laid out as the kernels walk it (contiguous NCHW, or channels_last [B, C, H, W]).
inline void check_layout(const at::Tensor& x, bool channels_last, const char* name) {
  TORCH_CHECK(x.dim() >= 2 && x.is_contiguous(format_of(channels_last)) && (!channels_last || x.dim() == 4), name,
              ": expected a ", channels_last ? "channels_last [B, C, H, W]" : "contiguous [B, C, ...]", " tensor");
}

// The dtypes the q_sample, p_step and GroupNorm kernels implement (float64 runs on the reference:
// a kernel dispatched for it would compute in float32, or, with fewer than 4 values in 16 bytes,
// leave the output unwritten).
inline void check_kernel_dtype(const at::Tensor& x, const char* name) {
  const at::ScalarType s = x.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, name,
              ": expected float32, float16 or bfloat16, got ", s, " (use backend='reference' for other dtypes)");
}

// AT_DISPATCH over exactly the dtypes check_kernel_dtype admits.
#define DDPM_FAST_DISPATCH_KERNEL_TYPES(TYPE, NAME, ...)                                   \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                 \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)              \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// other: like x (shape, dtype, layout, device); used for passed-in noise.
inline void check_like(const at::Tensor& other, const at::Tensor& x, bool channels_last, const char* name) {
  TORCH_CHECK(other.sizes() == x.sizes() && other.dtype() == x.dtype() && other.device() == x.device() &&
                  other.is_contiguous(format_of(channels_last)),
              name, ": expected the shape, dtype, layout and device of the samples");
}

// model_output: x's layout, dtype and device, with 2C channels for learned_range.
inline void check_model_output(const at::Tensor& out, const at::Tensor& x, int64_t variance, bool channels_last) {
  const int64_t channels = variance == kLearnedRange ? 2 * x.size(1) : x.size(1);
  TORCH_CHECK(out.dim() == x.dim() && out.size(0) == x.size(0) && out.size(1) == channels &&
                  out.sizes().slice(2) == x.sizes().slice(2) && out.dtype() == x.dtype() &&
                  out.device() == x.device() && out.is_contiguous(format_of(channels_last)),
              "model_output: expected ", channels, " channels in the samples' layout, dtype and device");
}

// table: the schedule's float32 [kTableRows, T] rows, T >= 1 (the kernels clamp t into [0, T)).
inline void check_table(const at::Tensor& table, const at::Tensor& x) {
  TORCH_CHECK(table.dim() == 2 && table.size(0) == kTableRows && table.size(1) >= 1 &&
                  table.scalar_type() == at::kFloat && table.is_contiguous() && table.device() == x.device(),
              "table: expected the schedule's float32 [", int(kTableRows), ", T >= 1] table on ", x.device());
}

// t: contiguous int64 [B] (the kernels read t[b]); table as check_table; both on x's device.
inline void check_schedule(const at::Tensor& t, const at::Tensor& table, const at::Tensor& x) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(0) && t.scalar_type() == at::kLong && t.is_contiguous() &&
                  t.device() == x.device(),
              "t: expected contiguous int64 [B] on the samples' device");
  check_table(table, x);
}

// rng: int64 [2] (seed bits, sample_offset) on x's device, read in place of the int arguments.
inline const int64_t* rng_ptr(const std::optional<at::Tensor>& rng, const at::Tensor& x) {
  if (!rng) return nullptr;
  TORCH_CHECK(rng->dim() == 1 && rng->size(0) == 2 && rng->scalar_type() == at::kLong && rng->is_contiguous() &&
                  rng->device() == x.device(),
              "rng: expected a contiguous int64 tensor [2] (seed, sample_offset) on the samples' device");
  return rng->data_ptr<int64_t>();
}

// picard_step: x [A, P + 1, C, ...] window states, model_output [A, P, C (2C for learned_range), ...]
// in x's dtype, t int64 [A, P], sample int64 [A], all contiguous on x's device; returns P.
inline int64_t check_picard(const at::Tensor& x, const at::Tensor& out, const at::Tensor& t, const at::Tensor& sample,
                            const at::Tensor& table, int64_t variance) {
  TORCH_CHECK(x.dim() >= 3 && x.size(1) >= 2 && x.is_contiguous(), "x: expected contiguous [A, P + 1, C, ...] states");
  check_kernel_dtype(x, "x");
  const int64_t A = x.size(0), P = x.size(1) - 1, C = x.size(2);
  const int64_t channels = variance == kLearnedRange ? 2 * C : C;
  TORCH_CHECK(out.dim() == x.dim() && out.size(0) == A && out.size(1) == P && out.size(2) == channels &&
                  out.sizes().slice(3) == x.sizes().slice(3) && out.dtype() == x.dtype() &&
                  out.device() == x.device() && out.is_contiguous(),
              "model_output: expected contiguous [A, P, ", channels, ", ...] in the states' dtype and device");
  TORCH_CHECK(t.dim() == 2 && t.size(0) == A && t.size(1) == P && t.scalar_type() == at::kLong && t.is_contiguous() &&
                  t.device() == x.device(),
              "t: expected contiguous int64 [A, P] on the states' device");
  TORCH_CHECK(sample.dim() == 1 && sample.size(0) == A && sample.scalar_type() == at::kLong && sample.is_contiguous() &&
                  sample.device() == x.device(),
              "sample: expected contiguous int64 [A] on the states' device");
  check_table(table, x);
  return P;
}

}  // namespace ddpm_fast
