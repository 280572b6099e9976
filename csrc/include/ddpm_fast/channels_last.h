// The work items of the CUDA q_sample and p_step kernels on channels_last samples
// (csrc/cuda/diffusion.cu), in a header so csrc/tests/channels_last_test.cpp can check on the host
// that they reach every element exactly once, each with its own Philox group and lane.
//
// A sample [C, H, W] lies in memory as NHWC, while the noise contract numbers its elements in NCHW
// order, j = c HW + hw, and draws them four at a time (group j / 4, lane j % 4).  Item q C + c draws
// group g = floor(c HW / 4) + q and keeps the lanes that fall in channel c, so c runs fastest across
// threads (coalesced along c in NHWC memory) and one Philox call serves up to 4 elements.  A group
// that straddles channels c and c + 1 (HW % 4 != 0) is drawn by an item of each: at most C - 1
// calls more than the ceil(C HW / 4) groups.
#pragma once

#include <algorithm>
#include <cstdint>

#include "ddpm_fast/fastdiv.h"

namespace ddpm_fast {

// Items per channel: the most groups a channel meets.  Channel c starts r = c HW % 4 into a group
// and meets (r + HW - 1) / 4 + 1 of them; r takes all its values at c < 4.
inline int64_t channels_last_groups_per_channel(int64_t C, int64_t HW) {
  int64_t most = 0;
  for (int64_t c = 0; c < std::min<int64_t>(C, 4); ++c) most = std::max(most, (c * HW % 4 + HW - 1) / 4 + 1);
  return most;
}

// Item -> channel c, the group g it draws, and the hw of the group's lane 0 as uint32: lanes before
// the channel's start wrap past HW and fail the same `hw0 + l < HW` test as lanes after its end; an
// item whose hw0 (as int32) is >= HW has no lane in its channel.  C HW < 2^31.
struct ChannelGroup {
  uint32_t c, g, hw0;
};

DF_HD ChannelGroup channel_group(const FastDivmod& by_C, uint32_t HW, uint32_t item) {
  uint32_t q;
  const uint32_t c = by_C.divmod(item, &q);
  const uint32_t jc = c * HW, g = (jc >> 2) + q;
  return {c, g, 4 * g - jc};
}

}  // namespace ddpm_fast
