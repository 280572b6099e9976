// Philox normals for the CPU kernels, a block of groups at a time, in loops GCC vectorises:
// the Philox rounds on arrays of counters, then Box-Muller with branch-free float log, sin and
// cos (Cephes' polynomials, ~1 ulp) instead of libm calls, which do not vectorise.
// Bit-for-bit the same Philox words as ddpm_fast/philox.h; normals within ~2 ulp of libm's.
#pragma once

#include <cstdint>
#include <cstring>

#include "ddpm_fast/philox.h"

namespace ddpm_fast {
namespace cpu {

constexpr int kGroupsPerBlock = 16;  // 64 normals per block
constexpr int kBlockElems = 4 * kGroupsPerBlock;

inline float log_poly(float x) {  // natural log for normal x > 0
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  int e = static_cast<int>((bits >> 23) & 0xff) - 126;
  const uint32_t mbits = (bits & 0x807fffffu) | 0x3f000000u;  // mantissa in [0.5, 1)
  float m;
  std::memcpy(&m, &mbits, 4);
  const bool small = m < 0.707106781186547524f;
  e -= small ? 1 : 0;
  m = small ? m + m - 1.0f : m - 1.0f;
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
  const int q = (j >> 1) & 3;  // quadrant
  const bool swap = q & 1;
  const float sv = swap ? cp : sp, cv = swap ? sp : cp;
  *s = (q & 2) ? -sv : sv;
  *c = (q == 1 || q == 2) ? -cv : cv;
}

// z[0 .. 4 * kGroupsPerBlock) = normals of groups g0 .. g0 + kGroupsPerBlock - 1 of one sample.
inline void normal_block(uint64_t seed, uint32_t g0, uint32_t sample, uint32_t t, uint32_t stream, float* z) {
  uint32_t c0[kGroupsPerBlock], c1[kGroupsPerBlock], c2[kGroupsPerBlock], c3[kGroupsPerBlock];
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma omp simd
  for (int g = 0; g < kGroupsPerBlock; ++g) {
    c0[g] = g0 + g;
    c1[g] = sample;
    c2[g] = t;
    c3[g] = stream;
  }
  for (int round = 0; round < 10; ++round) {
    if (round) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
#pragma omp simd
    for (int g = 0; g < kGroupsPerBlock; ++g) {
      const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0[g];
      const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2[g];
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1[g] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[g] ^ k1;
      c1[g] = static_cast<uint32_t>(p1);
      c3[g] = static_cast<uint32_t>(p0);
      c0[g] = n0;
      c2[g] = n2;
    }
  }
#pragma omp simd
  for (int g = 0; g < kGroupsPerBlock; ++g) {
    const float u0 = fmaxf(uint_to_uniform(c0[g]), 1.0e-7f), u1 = uint_to_uniform(c1[g]);
    const float u2 = fmaxf(uint_to_uniform(c2[g]), 1.0e-7f), u3 = uint_to_uniform(c3[g]);
    const float r01 = sqrtf(-2.0f * log_poly(u0)), r23 = sqrtf(-2.0f * log_poly(u2));
    float s01, co01, s23, co23;
    sincos_poly(kTwoPi * u1, &s01, &co01);
    sincos_poly(kTwoPi * u3, &s23, &co23);
    z[4 * g] = r01 * co01;
    z[4 * g + 1] = r01 * s01;
    z[4 * g + 2] = r23 * co23;
    z[4 * g + 3] = r23 * s23;
  }
}

}  // namespace cpu
}  // namespace ddpm_fast
