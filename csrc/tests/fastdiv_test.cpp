// FastDivmod against the hardware divide: every divisor below 2^12 with the numerators that border
// its multiples, divisors at powers of two and their neighbours up to 2^31 - 1, and random pairs.
// Usage: fastdiv_test
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "ddpm_fast/fastdiv.h"

namespace {

int failures = 0;

void check(uint32_t n, uint32_t d) {
  const ddpm_fast::FastDivmod f(d);
  uint32_t q;
  const uint32_t r = f.divmod(n, &q);
  if (q != n / d || r != n % d) {
    if (++failures <= 10) std::fprintf(stderr, "%u / %u: got %u rem %u, expected %u rem %u\n", n, d, q, r, n / d, n % d);
  }
}

void check_divisor(uint32_t d, std::mt19937& gen) {
  // Numerators around 0, the top of uint32 and the multiples of d where the quotient steps.
  for (uint32_t n : {0u, 1u, d - 1, d, d + 1, 0xffffffffu, 0xfffffffeu, 0x7fffffffu, 0x80000000u}) check(n, d);
  for (uint64_t k : {uint64_t{2}, uint64_t{3}, uint64_t{1000}, uint64_t{0xffffffffu} / d}) {
    for (int64_t delta = -1; delta <= 1; ++delta) {
      const uint64_t n = k * d + delta;
      if (n <= 0xffffffffu) check(static_cast<uint32_t>(n), d);
    }
  }
  for (int i = 0; i < 64; ++i) check(gen(), d);
}

}  // namespace

int main() {
  std::mt19937 gen(std::random_device{}());
  for (uint32_t d = 1; d < 4096; ++d) check_divisor(d, gen);
  for (int l = 12; l < 31; ++l) {
    const uint32_t p = uint32_t{1} << l;
    for (uint32_t d : {p - 1, p, p + 1, p + p / 2, p * 2 - 1}) check_divisor(d, gen);
  }
  std::uniform_int_distribution<uint32_t> divisors(1, 0x7fffffffu);
  for (int i = 0; i < 1000000; ++i) check(gen(), divisors(gen));
  std::printf("fastdiv: %d failures\n", failures);
  return failures ? 1 : 0;
}
