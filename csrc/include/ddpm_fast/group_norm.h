// GroupNorm arguments shared by the CPU and CUDA kernels: y = act(GN(x + add) * (1 + scale) + shift).
// A group is n = Cg * HW values; element e of group g of sample b sits at (b*C + g*Cg)*HW + e in
// NCHW (the group is contiguous) and at b*HW*C + (e / Cg)*C + g*Cg + e % Cg in channels_last.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "ddpm_fast/launch.h"

namespace ddpm_fast {

struct GroupNormParams {
  int64_t B, C, G, HW, CG, n;  // n = CG * HW
  bool channels_last;
  float eps;
  const float *weight, *bias, *add, *scale, *shift;  // nullptr when absent
  bool silu;
  DF_HD int64_t offset(int64_t b, int64_t g, int64_t e) const {
    return channels_last ? b * HW * C + (e / CG) * C + g * CG + e % CG : (b * C + g * CG) * HW + e;
  }
  DF_HD int64_t channel(int64_t g, int64_t e) const { return g * CG + (channels_last ? e % CG : e / HW); }
};

// Checks the op's arguments (schema-level guards; ops.py has already validated them) and
// unpacks them for a kernel.
inline GroupNormParams group_norm_params(const at::Tensor& x, int64_t num_groups,
                                         const std::optional<at::Tensor>& weight,
                                         const std::optional<at::Tensor>& bias, double eps,
                                         const std::optional<at::Tensor>& add,
                                         const std::optional<at::Tensor>& scale,
                                         const std::optional<at::Tensor>& shift, bool silu, bool channels_last) {
  check_layout(x, channels_last, "x");
  check_kernel_dtype(x, "x");
  TORCH_CHECK(num_groups > 0 && x.size(1) % num_groups == 0, "num_groups: must divide the ", x.size(1), " channels");
  GroupNormParams p;
  p.B = x.size(0);
  p.C = x.size(1);
  p.G = num_groups;
  p.CG = p.C / p.G;
  p.HW = p.B && p.C ? x.numel() / (p.B * p.C) : 0;
  p.n = p.CG * p.HW;
  p.channels_last = channels_last;
  p.eps = static_cast<float>(eps);
  p.weight = float_param(weight, p.C, "weight", x.device());
  p.bias = float_param(bias, p.C, "bias", x.device());
  p.add = float_param(add, p.B * p.C, "add", x.device());
  p.scale = float_param(scale, p.B * p.C, "scale", x.device());
  p.shift = float_param(shift, p.B * p.C, "shift", x.device());
  p.silu = silu;
  return p;
}

}  // namespace ddpm_fast
