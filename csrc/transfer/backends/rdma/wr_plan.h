// Work-request planning of the `rdma` backend, kept free of verbs types so it is tested on
// machines without RDMA devices (dualpath._C._rdma_plan).
//
// A worker's range of pieces becomes RDMA work requests: a piece longer than the device's
// max message size is cut into several; requests are posted in chains (one ibv_post_send, one
// doorbell, per chain) of at most `max_chain`; only the last request of a chain is signaled
// (selective signaling: one completion to poll per chain) and at most `max_outstanding`
// requests are in flight, so the send queue never overflows.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace dualpath::transfer::rdma {

struct WrPlan {
  uint64_t piece;   // index into the range
  uint64_t offset;  // byte offset within the piece
  uint64_t length;
  bool signaled;    // last request of its chain
};

// Chains of work requests for pieces of the given lengths (zero-length pieces get none).
inline std::vector<std::vector<WrPlan>> plan_wrs(const std::vector<uint64_t>& lengths,
                                                 uint64_t max_msg, uint32_t max_chain) {
  std::vector<std::vector<WrPlan>> chains;
  if (max_msg == 0 || max_chain == 0) return chains;
  std::vector<WrPlan> cur;
  for (uint64_t p = 0; p < lengths.size(); ++p) {
    for (uint64_t off = 0; off < lengths[p]; off += max_msg) {
      cur.push_back({p, off, std::min(max_msg, lengths[p] - off), false});
      if (cur.size() == max_chain) {
        cur.back().signaled = true;
        chains.push_back(std::move(cur));
        cur.clear();
      }
    }
  }
  if (!cur.empty()) {
    cur.back().signaled = true;
    chains.push_back(std::move(cur));
  }
  return chains;
}

// How many chains may be in flight so that at most `max_outstanding` requests are posted.
inline uint32_t chains_in_flight(uint32_t max_chain, uint32_t max_outstanding) {
  return std::max<uint32_t>(1, max_outstanding / std::max<uint32_t>(1, max_chain));
}

}  // namespace dualpath::transfer::rdma
