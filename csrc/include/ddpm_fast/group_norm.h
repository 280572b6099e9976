// GroupNorm arguments and per-element backward math shared by the CPU and CUDA kernels:
// y = act(GN(x + add) * (1 + scale) + shift).
// A group is n = Cg * HW values; element e of group g of sample b sits at (b*C + g*Cg)*HW + e in
// NCHW (the group is contiguous) and at b*HW*C + (e / Cg)*C + g*Cg + e % Cg in channels_last.
//
// Backward, from the forward's saved statistics (fp32 [B, G]): rstd, and mean taken relative to
// the group's first value, md = mean(x + add) - (x + add)[first] (with px, pa that element's x and
// add, exact for a large mean with a small spread).  Per channel c of sample b, W = w (1 + scale)
// and Bc = bias (1 + scale) + shift, so that z = xhat W + Bc and y = act(z):
//   xhat = ((x - px) + centre) rstd, centre = (add - pa) - md          recomputed, never saved
//   gz   = dy act'(z)                                   act' = sigmoid (1 + z (1 - sigmoid)) for SiLU
//   per (b, c): S1 = sum gz, S2 = sum gz xhat, S3 = sum xhat over the channel's positions
//   per (b, g): m1 = sum_c W S1 / n, m2 = sum_c W S2 / n
//   dx   = rstd (W gz - m1 - xhat m2)
// S1..S3 (the op's `sums` output) give every parameter gradient in ddpm_fast/ops.py:
// dshift = S1, dscale = w S2 + bias S1, dbias = sum_b (1 + scale) S1, dweight = sum_b (1 + scale) S2,
// dadd = rstd (W S1 - HW m1 - m2 S3).
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

// Channel c of sample b's coefficients: z = xhat * W + Bc, and its input add.
struct GnChannel {
  float add, W, Bc;
};

DF_HD GnChannel gn_channel(const GroupNormParams& p, int64_t b, int64_t c) {
  const int64_t bc = b * p.C + c;
  const float s = 1.0f + (p.scale ? p.scale[bc] : 0.0f);
  return GnChannel{p.add ? p.add[bc] : 0.0f, (p.weight ? p.weight[c] : 1.0f) * s,
                   (p.bias ? p.bias[c] : 0.0f) * s + (p.shift ? p.shift[bc] : 0.0f)};
}

// x - px first: exact for values near a large mean.
DF_HD float gn_xhat(float x, float px, float centre, float rstd) { return ((x - px) + centre) * rstd; }

// The channel's centre (see above) from its add, the group's pivot add pa and centred mean md.
DF_HD float gn_centre(float add, float pa, float md) { return (add - pa) - md; }

// dy * SiLU'(z), given sig = sigmoid(z) (each backend has its own exp).
DF_HD float gn_silu_grad(float dy, float z, float sig) { return dy * sig * (1.0f + z * (1.0f - sig)); }

DF_HD float gn_dx(float gz, float xhat, float W, float rstd, float m1, float m2) {
  return rstd * ((W * gz - m1) - xhat * m2);
}

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

// The backward's extra arguments: dy like x, mean and rstd float32 [B, G].
inline void check_group_norm_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                                      const at::Tensor& rstd, int64_t num_groups, bool channels_last) {
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.dtype() == x.dtype() && dy.device() == x.device() &&
                  dy.is_contiguous(format_of(channels_last)),
              "dy: expected the shape, dtype, layout and device of x");
  for (const at::Tensor* t : {&mean, &rstd}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == x.size(0) * num_groups &&
                    t->device() == x.device(),
                t == &mean ? "mean" : "rstd", ": expected a contiguous float32 [B, num_groups] tensor on x's device");
  }
}

}  // namespace ddpm_fast
