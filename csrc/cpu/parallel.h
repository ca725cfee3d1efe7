// Work distribution for the CPU kernels.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace t2t_fast {
namespace cpu {

// Runs items [0, n) on the intra-op threads, handed out one at a time from a shared counter, so a thread that
// gets descheduled (a busy machine) does not hold the others up at the end, as a fixed split would.
// f(claim) runs once per worker (set up per-thread buffers there); claim() returns the next item or -1.
// Only for items whose results do not depend on which thread runs them or in what order.
template <typename F>
void parallel_items(int64_t n, const F& f) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const auto claim = [&next, n]() -> int64_t {
    const int64_t i = next.fetch_add(1, std::memory_order_relaxed);
    return i < n ? i : -1;
  };
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), n), 1, [&](int64_t begin, int64_t end) {
    for (int64_t worker = begin; worker < end; ++worker) f(claim);
  });
}

}  // namespace cpu
}  // namespace t2t_fast
