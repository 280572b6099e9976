// GroupNorm arguments and per-element backward math shared by the CPU and CUDA kernels:
// y = act(GN(x + add) * (1 + scale) + shift).
// A group is n = Cg * HW values; element e of group g of sample b sits at (b*C + g*Cg)*HW + e in
// NCHW (the group is contiguous) and at b*HW*C + (e / Cg)*C + g*Cg + e % Cg in channels_last.
//
// Every kernel takes a group's values relative to its pivot (px, pa), the x and add of one of its
// values (gn_pivot): d = (x - px) + (add - pa), exact for a large mean with a small spread, where
// sums of x itself would lose the spread's digits.  Its statistics are the moments of d (GnMoments).
//
// Backward, from the forward's saved statistics (fp32 [B, G]): rstd, and the mean taken relative to
// the pivot, md = mean(x + add) - (px + pa).  Per channel c of sample b, W = w (1 + scale)
// and Bc = bias (1 + scale) + shift, so that z = xhat W + Bc and y = act(z):
//   xhat = ((x - px) + centre) rstd, centre = (add - pa) - md          recomputed, never saved
//   gz   = dy act'(z)                                   act' = sigmoid (1 + z (1 - sigmoid)) for SiLU
//   per (b, c): S1 = sum gz, S2 = sum gz xhat, S3 = sum xhat over the channel's positions
//   per (b, g): m1 = sum_c W S1 / n, m2 = sum_c W S2 / n
//   dx   = rstd (W gz - m1 - xhat m2)
// The op's `sums` output [4, B, C] holds S1..S3 and dadd = rstd (W S1 - HW m1 - m2 S3) (gn_dadd);
// ddpm_fast/ops.py forms the rest: dshift = S1, dscale = w S2 + bias S1, dbias = sum_b (1 + scale) S1,
// dweight = sum_b (1 + scale) S2.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "ddpm_fast/launch.h"

namespace ddpm_fast {

// A weight, bias, add, scale or shift: float32 or x's own dtype (a bf16 model's norms, the temb add
// of a projection under autocast), read as float32.  The forward reads each once a channel (into a
// block's or a sample's table), so a run-time switch costs nothing a value and saves the caller a
// cast; the CUDA backward, which reads them in its hot loop, takes float32 alone (at<true>).
struct GnParam {
  const void* data = nullptr;  // nullptr when absent
  c10::ScalarType dtype = c10::ScalarType::Float;
  DF_HD explicit operator bool() const { return data != nullptr; }
  DF_HD float operator[](int64_t i) const {
    if (dtype == c10::ScalarType::BFloat16) return static_cast<float>(static_cast<const c10::BFloat16*>(data)[i]);
    if (dtype == c10::ScalarType::Half) return static_cast<float>(static_cast<const c10::Half*>(data)[i]);
    return static_cast<const float*>(data)[i];
  }
  // kFloat: the caller has checked that the parameter is float32 (the CUDA backward, which reads
  // parameters in its hot loop, where the switch would cost instructions and registers).
  template <bool kFloat>
  DF_HD float at(int64_t i) const {
    if constexpr (kFloat) {
      return static_cast<const float*>(data)[i];
    } else {
      return (*this)[i];
    }
  }
};

struct GroupNormParams {
  int64_t B, C, G, HW, CG, n;  // n = CG * HW
  bool channels_last;
  float eps;
  GnParam weight, bias, add, scale, shift;
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

template <bool kFloatParams = false>
DF_HD GnChannel gn_channel(const GroupNormParams& p, int64_t b, int64_t c) {
  const int64_t bc = b * p.C + c;
  const float s = 1.0f + (p.scale ? p.scale.at<kFloatParams>(bc) : 0.0f);
  return GnChannel{p.add ? p.add.at<kFloatParams>(bc) : 0.0f, (p.weight ? p.weight.at<kFloatParams>(c) : 1.0f) * s,
                   (p.bias ? p.bias.at<kFloatParams>(c) : 0.0f) * s + (p.shift ? p.shift.at<kFloatParams>(bc) : 0.0f)};
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

// The input add's gradient for one (sample, channel), from its S1, S3 and its group's m1, m2.
DF_HD float gn_dadd(float rstd, float W, float S1, float S3, float HW, float m1, float m2) {
  return rstd * ((W * S1 - HW * m1) - m2 * S3);
}

// Statistics of a set of values d: their count, mean and sum of squared deviations M2.  Partial
// moments merge without cancellation (Chan et al.): every term is non-negative, so the variance
// keeps its digits whatever the values' distance from the pivot, unlike sum d^2 / n - mean^2,
// which loses them all when one value (the pivot, say) lies far from the rest.
struct GnMoments {
  float n, mean, m2;
};

DF_HD GnMoments gn_merge(GnMoments a, GnMoments b) {
  const float n = a.n + b.n;
  if (n == 0.0f) return a;
  const float delta = b.mean - a.mean, r = b.n / n;
  return GnMoments{n, a.mean + delta * r, a.m2 + b.m2 + delta * delta * a.n * r};
}

// The group's pivot: of its values v = x + add at (channel 0, position 0), (CG / 2, HW / 2) and
// (CG - 1, HW - 1), the median's x and add.  Centring rounds each value at |pivot - mean| 2^-24, so
// the pivot must not be an outlier: the median of three leaves one out, wherever it lies.
struct GnPivot {
  float px, pa;
};

template <typename T>
DF_HD GnPivot gn_pivot(const T* x, const GroupNormParams& p, int64_t b, int64_t g) {
  const int64_t ks[3] = {0, p.CG / 2, p.CG - 1}, qs[3] = {0, p.HW / 2, p.HW - 1};
  float xs[3], as[3], v[3];
  for (int i = 0; i < 3; ++i) {
    const int64_t c = g * p.CG + ks[i];
    xs[i] = static_cast<float>(x[p.channels_last ? (b * p.HW + qs[i]) * p.C + c : (b * p.C + c) * p.HW + qs[i]]);
    as[i] = p.add ? p.add[b * p.C + c] : 0.0f;
    v[i] = xs[i] + as[i];
  }
  const int m = (v[0] <= v[1]) == (v[1] <= v[2]) ? 1 : (v[1] < v[0]) == (v[0] < v[2]) ? 0 : 2;
  return GnPivot{xs[m], as[m]};
}

// An optional parameter of numel elements, contiguous on x's device, in float32 or x's dtype.
inline GnParam gn_param(const std::optional<at::Tensor>& p, int64_t numel, const char* name, const at::Tensor& x) {
  if (!p) return {};
  const at::ScalarType s = p->scalar_type();
  TORCH_CHECK((s == at::kFloat || s == x.scalar_type()) && p->is_contiguous() && p->numel() == numel &&
                  p->device() == x.device(),
              name, ": expected a contiguous float32", x.scalar_type() == at::kFloat ? "" : " or x's dtype",
              " tensor of ", numel, " elements on ", x.device(), ", got ", s);
  return GnParam{p->data_ptr(), s};
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
  p.weight = gn_param(weight, p.C, "weight", x);
  p.bias = gn_param(bias, p.C, "bias", x);
  p.add = gn_param(add, p.B * p.C, "add", x);
  p.scale = gn_param(scale, p.B * p.C, "scale", x);
  p.shift = gn_param(shift, p.B * p.C, "shift", x);
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
