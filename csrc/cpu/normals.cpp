// Philox normals a block at a time for the CPU kernels (see normals.h).
#include "normals.h"

namespace ddpm_fast {
namespace cpu {

DF_CPU_CLONES void silu_inplace(float* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) v[i] = v[i] / (1.0f + exp_poly(-v[i]));
}

DF_CPU_CLONES void normal_block(uint64_t seed, uint32_t g0, uint32_t sample, uint32_t t, uint32_t stream, float* z) {
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
  // Box-Muller on the pairs (c0, c1) and (c2, c3) as 2 * kGroupsPerBlock independent lanes.
  float u[2 * kGroupsPerBlock], v[2 * kGroupsPerBlock], zc[2 * kGroupsPerBlock], zs[2 * kGroupsPerBlock];
  for (int g = 0; g < kGroupsPerBlock; ++g) {
    u[g] = uint_to_uniform(c0[g]);
    v[g] = uint_to_uniform(c1[g]);
    u[kGroupsPerBlock + g] = uint_to_uniform(c2[g]);
    v[kGroupsPerBlock + g] = uint_to_uniform(c3[g]);
  }
  // Separate loops: GCC if-converts (and so vectorises) the polynomials only in call-free loops.
  for (int i = 0; i < 2 * kGroupsPerBlock; ++i) u[i] = -2.0f * log_poly(u[i] < 1.0e-7f ? 1.0e-7f : u[i]);
  for (int i = 0; i < 2 * kGroupsPerBlock; ++i) u[i] = sqrtf(u[i]);
  for (int i = 0; i < 2 * kGroupsPerBlock; ++i) {
    float sn, cs;
    sincos_poly(kTwoPi * v[i], &sn, &cs);
    zc[i] = u[i] * cs;
    zs[i] = u[i] * sn;
  }
  for (int g = 0; g < kGroupsPerBlock; ++g) {
    z[4 * g] = zc[g];
    z[4 * g + 1] = zs[g];
    z[4 * g + 2] = zc[kGroupsPerBlock + g];
    z[4 * g + 3] = zs[kGroupsPerBlock + g];
  }
}

}  // namespace cpu
}  // namespace ddpm_fast
