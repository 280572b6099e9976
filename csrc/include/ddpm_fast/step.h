// Per-element math of q_sample and the reverse step, shared by the CPU and CUDA kernels.
//
//   q_sample:  x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
//   p_step:    x0^ from the model output (eps: (x - sqrt(1-abar) e) / sqrt(abar); sample: o;
//              v: sqrt(abar) x - sqrt(1-abar) o), clipped to +-clip_range when asked;
//              mean = c1 x0^ + c2 x                                (form posterior)
//                   = (x - beta / sqrt(1-abar) e') / sqrt(alpha)   (form eps, Algorithm 2;
//                     e' re-derived from the clipped x0^ when clipping)
//              x_{t-1} = mean + sigma_t z, sigma_t = 0 at t = 0,
//              sigma^2 = beta~ | beta | exp(f log beta + (1-f) log beta~_clipped), f = (v+1)/2.
// The schedule is a float32 [kTableRows, T] table; rows follow ddpm_fast/schedule.py TABLE_ROWS.
#pragma once

#include <cmath>
#include <cstdint>

#include "ddpm_fast/philox.h"

namespace ddpm_fast {

enum TableRow : int {
  kBetas = 0,
  kAlphasCumprod,
  kAlphasCumprodPrev,
  kSqrtAlphasCumprod,
  kSqrtOneMinusAlphasCumprod,
  kSqrtRecipAlphas,
  kEpsCoef,
  kPosteriorMeanCoef1,
  kPosteriorMeanCoef2,
  kPosteriorVariance,
  kPosteriorLogVarianceClipped,
  kLogBetas,
  kTableRows
};

enum Prediction : int { kPredictEps = 0, kPredictSample = 1, kPredictV = 2 };
enum Variance : int { kFixedSmall = 0, kFixedLarge = 1, kLearnedRange = 2 };
enum Form : int { kFormPosterior = 0, kFormEps = 1 };

struct StepOptions {
  int prediction, variance, form;
  bool clip;
  float clip_range;
};

// One sample's coefficients, read once per sample from the table at its t.
struct StepCoefs {
  float s1, s2, c1, c2, recip_sqrt_alpha, eps_coef, sigma, log_beta, log_post;
  float recip_s1, recip_s2;  // 1 / s1, 1 / s2 for the GPU (quotient below)
  bool noisy;  // t > 0
};

DF_HD int64_t clamp_t(int64_t t, int64_t T) { return t < 0 ? 0 : (t >= T ? T - 1 : t); }

DF_HD StepCoefs load_coefs(const float* table, int64_t T, int64_t t_raw, int variance) {
  // Validation rejects t outside [0, T) before launch; clamping keeps a bad t read under
  // graph capture or torch.compile (where t is not read on the host) in bounds.
  const int64_t t = clamp_t(t_raw, T);
  StepCoefs k;
  k.s1 = table[kSqrtAlphasCumprod * T + t];
  k.s2 = table[kSqrtOneMinusAlphasCumprod * T + t];
  k.c1 = table[kPosteriorMeanCoef1 * T + t];
  k.c2 = table[kPosteriorMeanCoef2 * T + t];
  k.recip_sqrt_alpha = table[kSqrtRecipAlphas * T + t];
  k.eps_coef = table[kEpsCoef * T + t];
  k.log_beta = table[kLogBetas * T + t];
  k.log_post = table[kPosteriorLogVarianceClipped * T + t];
  k.sigma = sqrtf(table[(variance == kFixedLarge ? kBetas : kPosteriorVariance) * T + t]);
  k.recip_s1 = 1.0f / k.s1;
  k.recip_s2 = 1.0f / k.s2;
  k.noisy = t > 0;
  return k;
}

// a / s for a per-sample coefficient s.  The GPU has no divider: an IEEE divide there is ~10
// instructions with a call to a slow path, per element; the reciprocal, once per sample, costs one
// more rounding (the quotient within 1.5 ulps, not 0.5; s = 0 still gives +-inf or NaN).  The host
// divides, so the CPU kernels' results stay what they were.
DF_HD float div_coef(float a, float s, float recip_s) {
#if defined(__CUDA_ARCH__)
  (void)s;
  return a * recip_s;
#else
  (void)recip_s;
  return a / s;
#endif
}

// x_{t-1} for one element: x = x_t, o = model output, v = the learned-range channel (unused
// otherwise), z = the element's standard normal.
DF_HD float p_step_element(float x, float o, float v, float z, const StepCoefs& k, const StepOptions& opt) {
  float x0 = opt.prediction == kPredictEps ? div_coef(x - k.s2 * o, k.s1, k.recip_s1)
                                          : (opt.prediction == kPredictSample ? o : k.s1 * x - k.s2 * o);
  // Comparisons, not fminf/fmaxf, which would turn a NaN into -clip_range: a NaN from the model
  // stays NaN, as in the reference's torch.clamp.
  if (opt.clip) x0 = x0 < -opt.clip_range ? -opt.clip_range : (x0 > opt.clip_range ? opt.clip_range : x0);
  float mean;
  if (opt.form == kFormPosterior) {
    mean = k.c1 * x0 + k.c2 * x;
  } else {
    const float e = (opt.prediction == kPredictEps && !opt.clip) ? o : div_coef(x - k.s1 * x0, k.s2, k.recip_s2);
    mean = k.recip_sqrt_alpha * (x - k.eps_coef * e);
  }
  if (!k.noisy) return mean;
  float sigma = k.sigma;
  if (opt.variance == kLearnedRange) {
    const float f = (v + 1.0f) * 0.5f;
    sigma = expf(0.5f * (f * k.log_beta + (1.0f - f) * k.log_post));
  }
  return mean + sigma * z;
}

DF_HD float q_sample_element(float x0, float eps, float s1, float s2) { return s1 * x0 + s2 * eps; }

}  // namespace ddpm_fast
