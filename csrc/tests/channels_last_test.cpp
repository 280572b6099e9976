// The channels_last work items (ddpm_fast/channels_last.h) reach every element of a sample exactly
// once, each with the Philox group and lane of its NCHW index, and draw at most ceil(C HW / 4) + C - 1
// groups: every C < 40 with every HW < 80 and HW around 1024 (32 x 32).
// Usage: channels_last_test
#include <cstdint>
#include <cstdio>
#include <vector>

#include "ddpm_fast/channels_last.h"

namespace {

int failures = 0;

void fail(const char* what, uint32_t C, uint32_t HW) {
  if (++failures <= 10) std::fprintf(stderr, "C = %u, HW = %u: %s\n", C, HW, what);
}

void check(uint32_t C, uint32_t HW) {
  const ddpm_fast::FastDivmod by_C(C);
  const int64_t items = C * ddpm_fast::channels_last_groups_per_channel(C, HW);
  std::vector<int> seen(static_cast<size_t>(C) * HW, 0);
  int64_t calls = 0;
  for (uint32_t item = 0; item < items; ++item) {
    const ddpm_fast::ChannelGroup cg = ddpm_fast::channel_group(by_C, HW, item);
    if (static_cast<int32_t>(cg.hw0) >= static_cast<int32_t>(HW)) continue;
    ++calls;
    for (uint32_t l = 0; l < 4; ++l) {
      const uint32_t hw = cg.hw0 + l;
      if (hw >= HW) continue;
      const uint32_t j = cg.c * HW + hw;
      if (j / 4 != cg.g || j % 4 != l) fail("an element drew another group or lane", C, HW);
      ++seen[j];
    }
  }
  for (int n : seen) {
    if (n != 1) {
      fail("an element was reached other than once", C, HW);
      break;
    }
  }
  if (calls > (int64_t{C} * HW + 3) / 4 + C - 1) fail("more Philox calls than groups + C - 1", C, HW);
}

}  // namespace

int main() {
  for (uint32_t C = 1; C < 40; ++C) {
    for (uint32_t HW = 1; HW < 80; ++HW) check(C, HW);
    for (uint32_t HW = 1020; HW < 1030; ++HW) check(C, HW);
  }
  if (failures) std::fprintf(stderr, "%d failures\n", failures);
  return failures ? 1 : 0;
}
