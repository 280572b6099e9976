// Division and remainder by a divisor fixed at launch, without a divide instruction:
//   n / d = (t + ((n - t) >> s1)) >> s2,   t = umulhi(n, m)
// with l = ceil(log2 d), m = floor(2^32 (2^l - d) / d) + 1, s1 = min(l, 1), s2 = max(l - 1, 0)
// (Granlund and Montgomery, "Division by invariant integers using multiplication", 1994, fig. 4.1),
// exact for every uint32 n and 1 <= d < 2^31.  The GPU has no integer divider: a 32-bit `/` by a
// run-time value is a ~20-instruction sequence and a 64-bit one a call to a ~70-instruction routine,
// while this is IMAD.HI, IADD, two shifts.  The host computes m, l once per launch.
#pragma once

#include <cstdint>

#include "ddpm_fast/philox.h"

namespace ddpm_fast {

struct FastDivmod {
  uint32_t d = 1, m = 1, s1 = 0, s2 = 0;

  FastDivmod() = default;
  // The caller checks 1 <= d < 2^31 (the launchers' size checks).
  explicit FastDivmod(uint32_t divisor) : d(divisor) {
    uint32_t l = 0;
    while ((uint64_t{1} << l) < d) ++l;
    m = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << l) - d)) / d + 1);
    s1 = l < 1 ? l : 1;
    s2 = l > 1 ? l - 1 : 0;
  }

  DF_HD uint32_t div(uint32_t n) const {
    uint32_t t;
    mulhilo32(n, m, &t);
    return (t + ((n - t) >> s1)) >> s2;
  }

  // q = n / d, returns n % d.
  DF_HD uint32_t divmod(uint32_t n, uint32_t* q) const {
    *q = div(n);
    return n - *q * d;
  }
};

}  // namespace ddpm_fast
