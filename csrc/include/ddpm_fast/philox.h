// Philox4x32-10 and Box-Muller: the noise contract (DESIGN.md section 2), shared by the CPU
// and CUDA backends so the two cannot drift.
//
//   z[sample i, element j] at (seed, t, stream) =
//     box_muller4(philox4x32_10(counter = {j / 4, i, t, stream},
//                               key = {seed & 0xffffffff, seed >> 32}))[j % 4]
//
// One Philox call (10 rounds: 20 32x32->64 multiplies, ~60 xor/add) yields 4 normals.
#pragma once

#include <cmath>
#include <cstdint>

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

DF_HD void box_muller(float u1, float u2, float* n1, float* n2) {
  u1 = fmaxf(u1, 1.0e-7f);
  const float r = sqrtf(-2.0f * logf(u1));
  const float theta = kTwoPi * u2;
  *n1 = r * cosf(theta);
  *n2 = r * sinf(theta);
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
