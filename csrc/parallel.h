// A minimal fork-join loop over index ranges; exceptions are re-thrown on the
// calling thread after every worker has finished.
#pragma once

#include <algorithm>
#include <cstddef>
#include <exception>
#include <thread>
#include <vector>

namespace mmcore {

inline int resolve_threads(int requested) {
  if (requested > 0) return requested;
  unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : int(hw);
}

// Calls fn(begin, end) on up to `threads` disjoint ranges covering [0, n).
// Work below `min_per_thread` items per thread runs on fewer threads.
template <typename Fn>
void parallel_ranges(size_t n, int threads, size_t min_per_thread, Fn&& fn) {
  size_t t = size_t(resolve_threads(threads));
  if (min_per_thread > 0) t = std::min(t, std::max<size_t>(1, n / min_per_thread));
  if (t <= 1 || n == 0) {
    fn(size_t(0), n);
    return;
  }
  std::vector<std::thread> workers;
  std::vector<std::exception_ptr> errors(t);
  workers.reserve(t - 1);
  for (size_t i = 1; i < t; ++i) {
    workers.emplace_back([&, i] {
      try {
        fn(n * i / t, n * (i + 1) / t);
      } catch (...) {
        errors[i] = std::current_exception();
      }
    });
  }
  try {
    fn(size_t(0), n / t);
  } catch (...) {
    errors[0] = std::current_exception();
  }
  for (auto& w : workers) w.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace mmcore
