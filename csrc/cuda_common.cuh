// Helpers shared by the .cu files: segment lookup and launch checks.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace mmcore::cuda {

// The segment s with base[s] <= item < base[s + 1] (base has n + 1 entries).
__device__ __forceinline__ size_t find_segment(const uint64_t* base, size_t n, uint64_t item) {
  size_t lo = 0, hi = n;  // invariant: base[lo] <= item < base[hi]
  while (hi - lo > 1) {
    size_t mid = lo + (hi - lo) / 2;
    if (base[mid] <= item)
      lo = mid;
    else
      hi = mid;
  }
  return lo;
}

inline unsigned grid_for(uint64_t items, unsigned threads) {
  return unsigned((items + threads - 1) / threads);
}

inline cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

}  // namespace mmcore::cuda
