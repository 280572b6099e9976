// Philox normals for the CPU kernels, a block of groups at a time, in loops GCC vectorises:
// the Philox rounds on arrays of counters, then Box-Muller with branch-free float log, sin and
// cos (Cephes' polynomials, ~1 ulp) instead of libm calls, which do not vectorise.
// Bit-for-bit the same Philox words as ddpm_fast/philox.h; normals within ~2 ulp of libm's.
#pragma once

#include <cstdint>

#include "ddpm_fast/philox.h"

// The CPU kernels' hot loops are built for AVX-512, AVX2 and baseline x86-64 and picked at load
// time: the same operations in wider vectors (no FMA contraction), so every build gives the same bits.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DF_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DF_CPU_CLONES
#endif

namespace ddpm_fast {
namespace cpu {

constexpr int kGroupsPerBlock = 16;  // 64 normals per block
constexpr int kBlockElems = 4 * kGroupsPerBlock;

inline float flip_sign(float x, uint32_t flip) {  // flip is 0 or 1
  return __builtin_bit_cast(float, __builtin_bit_cast(uint32_t, x) ^ (flip << 31));
}

inline float log_poly(float x) {  // natural log for normal x > 0
  const uint32_t bits = __builtin_bit_cast(uint32_t, x);
  int e = static_cast<int>((bits >> 23) & 0xff) - 126;
  const uint32_t mbits = (bits & 0x807fffffu) | 0x3f000000u;  // mantissa in [0.5, 1)
  float m = __builtin_bit_cast(float, mbits);
  e -= m < 0.707106781186547524f ? 1 : 0;
  m = (m - 1.0f) + (m < 0.707106781186547524f ? m : 0.0f);  // m - 1 is exact, so this rounds 2m - 1 once
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const float fe = static_cast<float>(e);
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  return (m + y) + 0.693359375f * fe;
}

inline void sincos_poly(float x, float* s, float* c) {  // 0 <= x < 2*pi
  int j = static_cast<int>(x * 1.27323954473516f);  // x * 4 / pi
  j += j & 1;
  const float y = static_cast<float>(j);
  x = ((x - y * 0.78515625f) - y * 2.4187564849853515625e-4f) - y * 3.77489497744594108e-8f;
  const float z = x * x;
  const float sp = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * x + x;
  const float cp = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z -
                   0.5f * z + 1.0f;
  const uint32_t q = static_cast<uint32_t>(j >> 1) & 3u;  // quadrant
  *s = flip_sign((q & 1u) ? cp : sp, q >> 1);
  *c = flip_sign((q & 1u) ? sp : cp, ((q + 1u) >> 1) & 1u);
}

// e^x as Cephes' expf (~1 ulp), saturating outside [-87.3, 88] (at ~1e-38 and ~1.6e38) where libm
// would return 0 or inf: the uses here (SiLU, a learned sigma) only ever see the saturated value
// divided into or multiplied by O(1) numbers.  Branch-free so every loop calling it vectorises.
inline float exp_poly(float x) {
  const float xc = x > 88.0f ? 88.0f : (x < -87.3365447505531f ? -87.3365447505531f : x);
  // round(xc / ln 2) without a rounding instruction: truncate after shifting to positive numbers.
  const float n = static_cast<float>(static_cast<int>(xc * 1.44269504088896341f + 256.5f) - 256);
  const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  const float z = r * r;
  const float p = ((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r +
                   1.6666665459e-1f) * r + 5.0000001201e-1f;
  const float e = (p * z + r) + 1.0f;
  return e * __builtin_bit_cast(float, static_cast<uint32_t>(static_cast<int>(n) + 127) << 23);
}

// z[0 .. 4 * kGroupsPerBlock) = normals of groups g0 .. g0 + kGroupsPerBlock - 1 of one sample
// (normals.cpp).
void normal_block(uint64_t seed, uint32_t g0, uint32_t sample, uint32_t t, uint32_t stream, float* z);

// v[i] = v[i] * sigmoid(v[i]) for i < n (normals.cpp).
void silu_inplace(float* v, int64_t n);

}  // namespace cpu
}  // namespace ddpm_fast
