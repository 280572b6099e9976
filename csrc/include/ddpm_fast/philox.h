// Philox4x32-10 and Box-Muller: the noise contract (DESIGN.md section 2), shared by the CPU
// and CUDA backends so the two cannot drift.
//
//   z[sample i, element j] at (seed, t, stream) =
//     box_muller4(philox4x32_10(counter = {j / 4, i, t, stream},
//                               key = {seed & 0xffffffff, seed >> 32}))[j % 4]
//
// One Philox call (10 rounds: 20 32x32->64 multiplies, ~60 xor/add) yields 4 normals.
// box_muller evaluates the contract's log, cos and sin of float32 arguments with polynomials in
// explicit fmaf (below), not libm/libdevice: the GPU's sinf/cosf carry a Payne-Hanek path for huge
// arguments (a loop over a 32-byte stack array) that theta in [0, 2 pi] never takes, and with every
// rounding spelled out (and nvcc's default IEEE sqrtf) the host computes the bits the GPU does: what lets
// csrc/tests/box_muller_test.cpp measure the device's error on the CPU: over 2^24 Philox draws and
// the edge cases (u1 at the 1e-7 clamp and near 1, theta at the quadrant boundaries) the normals are
// within 2.5 float32 eps of max(|z|, 1) of the exact Box-Muller of the same float u1 and theta
// (measured 1.97; libm's logf, cosf and sinf 1.63), inside the contract's 8 (tests' normal_bound).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define DF_HD __host__ __device__ __forceinline__
#else
#define DF_HD inline
#endif

namespace ddpm_fast {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr float kUniformScale = 4.6566127342e-10f;  // 2^-31, Triton's uint_to_uniform_float
constexpr float kTwoPi = 6.2831855f;

enum Stream : uint32_t { kStreamStep = 0, kStreamQSample = 1, kStreamInit = 2 };

struct Words4 {
  uint32_t x, y, z, w;
};

struct Normal4 {
  float x, y, z, w;
  DF_HD float operator[](int k) const { return k == 0 ? x : k == 1 ? y : k == 2 ? z : w; }
};

DF_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
  return a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
#endif
}

DF_HD Words4 philox4x32_10(Words4 c, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    if (round) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(kPhiloxM0, c.x, &hi0);
    const uint32_t lo1 = mulhilo32(kPhiloxM1, c.z, &hi1);
    c = Words4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
  }
  return c;
}

// Bitcast to int32 and fold negatives (~s == -s - 1 without signed overflow), then scale.
DF_HD float uint_to_uniform(uint32_t x) {
  int32_t s = static_cast<int32_t>(x);
  s = s < 0 ? ~s : s;
  return static_cast<float>(s) * kUniformScale;
}

// a * b rounded once: a product the CUDA compiler may not fuse into a following add, so the GPU
// rounds where the host does.
DF_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

DF_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}

DF_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
#endif
}

// ln x for normal x in (0, 1]: x = 2^e m with m in [sqrt(1/2), sqrt(2)), ln(m) from Cephes' logf
// polynomial in m - 1 (exact), e ln 2 in two parts.
DF_HD float log_unit(float x) {
  const uint32_t bits = float_bits(x);
  const bool low = (bits & 0x7fffffu) < 0x3504f3u;  // mantissa below sqrt(2) / 2 * 2
  const float fe = static_cast<float>(static_cast<int>(bits >> 23) - (low ? 127 : 126));
  const float m = bits_float((bits & 0x7fffffu) | (low ? 0x3f800000u : 0x3f000000u)) - 1.0f;
  const float z = mul_rn(m, m);
  float y = 7.0376836292e-2f;
  y = fmaf(y, m, -1.1514610310e-1f);
  y = fmaf(y, m, 1.1676998740e-1f);
  y = fmaf(y, m, -1.2420140846e-1f);
  y = fmaf(y, m, 1.4249322787e-1f);
  y = fmaf(y, m, -1.6668057665e-1f);
  y = fmaf(y, m, 2.0000714765e-1f);
  y = fmaf(y, m, -2.4999993993e-1f);
  y = fmaf(y, m, 3.3333331174e-1f);
  y = mul_rn(mul_rn(y, m), z);
  y = fmaf(fe, -2.12194440e-4f, y);
  y = fmaf(-0.5f, z, y);
  return fmaf(fe, 0.693359375f, m + y);
}

// sin and cos of theta in [0, 2 pi + 1e-6]: k = round(theta / (pi / 2)), x = theta - k pi / 2 in
// [-pi / 4, pi / 4] by a three-part Cody-Waite reduction, Cephes' sinf and cosf polynomials in x,
// and the quadrant k swaps and negates them.
DF_HD void sincos_unit(float theta, float* s, float* c) {
  const float k = rintf(mul_rn(theta, 0.636619772f));
  float x = fmaf(k, -1.57079601e+00f, theta);
  x = fmaf(k, -3.13916473e-07f, x);
  x = fmaf(k, -5.39030253e-15f, x);
  const float z = mul_rn(x, x);
  float sp = fmaf(-1.9515295891e-4f, z, 8.3321608736e-3f);
  sp = fmaf(sp, z, -1.6666654611e-1f);
  sp = fmaf(sp, mul_rn(z, x), x);
  float cp = fmaf(2.443315711809948e-5f, z, -1.388731625493765e-3f);
  cp = fmaf(cp, z, 4.166664568298827e-2f);
  cp = fmaf(cp, z, -0.5f);
  cp = fmaf(cp, z, 1.0f);
  const uint32_t q = static_cast<uint32_t>(static_cast<int>(k));
  const float sq = (q & 1u) ? cp : sp, cq = (q & 1u) ? sp : cp;
  *s = bits_float(float_bits(sq) ^ ((q & 2u) << 30));
  *c = bits_float(float_bits(cq) ^ (((q + 1u) & 2u) << 30));
}

DF_HD void box_muller(float u1, float u2, float* n1, float* n2) {
  u1 = fmaxf(u1, 1.0e-7f);
  const float r = sqrtf(mul_rn(-2.0f, log_unit(u1)));
  float s, c;
  sincos_unit(mul_rn(kTwoPi, u2), &s, &c);
  *n1 = mul_rn(r, c);
  *n2 = mul_rn(r, s);
}

DF_HD Normal4 normal4(uint64_t seed, uint32_t group, uint32_t sample, uint32_t t, uint32_t stream) {
  const Words4 r = philox4x32_10(Words4{group, sample, t, stream}, static_cast<uint32_t>(seed),
                                 static_cast<uint32_t>(seed >> 32));
  Normal4 z;
  box_muller(uint_to_uniform(r.x), uint_to_uniform(r.y), &z.x, &z.y);
  box_muller(uint_to_uniform(r.z), uint_to_uniform(r.w), &z.z, &z.w);
  return z;
}

}  // namespace ddpm_fast
