#include "gather.h"

#include <cstring>

#include "parallel.h"

namespace mmcore {
namespace {

// Below this many bytes per thread, spawning threads costs more than it saves.
constexpr uint64_t kBytesPerThread = 4u << 20;

int threads_for(const uint64_t* lens, size_t n, int threads) {
  uint64_t total = 0;
  for (size_t i = 0; i < n; ++i) total += lens[i];
  int by_size = int(total / kBytesPerThread) + 1;
  int t = resolve_threads(threads);
  return t < by_size ? t : by_size;
}

}  // namespace

void gather_cpu(uint8_t* dst, const uint8_t* const* srcs, const uint64_t* lens,
                const uint64_t* dst_offsets, size_t n, int threads) {
  parallel_ranges(n, threads_for(lens, n, threads), 1, [&](size_t begin, size_t end) {
    for (size_t i = begin; i < end; ++i)
      if (lens[i]) std::memcpy(dst + dst_offsets[i], srcs[i], lens[i]);
  });
}

void scatter_cpu(const uint8_t* src, uint8_t* const* dsts, const uint64_t* lens,
                 const uint64_t* src_offsets, size_t n, int threads) {
  parallel_ranges(n, threads_for(lens, n, threads), 1, [&](size_t begin, size_t end) {
    for (size_t i = begin; i < end; ++i)
      if (lens[i]) std::memcpy(dsts[i], src + src_offsets[i], lens[i]);
  });
}

}  // namespace mmcore
