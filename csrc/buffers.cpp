// Decode buffers (see buffers.h).
#include "buffers.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <mutex>
#include <new>
#include <utility>
#include <vector>

namespace mmcore {

Region::Region(size_t size) : data_(nullptr), size_(size) {
  void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  data_ = static_cast<uint8_t*>(p);  // (small pages: see buffers.h)
}

Region::~Region() { munmap(data_, size_); }

namespace {

size_t default_limit() {
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  const size_t physical = pages > 0 && page > 0 ? size_t(pages) * size_t(page) : 0;
  return std::min(physical / 8, size_t(1) << 30);
}

// Idle regions, oldest first. One per process, never destroyed (regions handed back
// while the interpreter shuts down still find it).
struct RegionCache {
  std::mutex mu;
  size_t limit = default_limit();
  size_t idle_bytes = 0;
  std::vector<std::unique_ptr<Region>> idle;

  // The idle regions over the limit, taken out (to be unmapped outside the lock).
  std::vector<std::unique_ptr<Region>> over_limit() {
    std::vector<std::unique_ptr<Region>> out;
    size_t drop = 0;
    while (idle_bytes > limit && drop < idle.size()) idle_bytes -= idle[drop++]->size();
    out.insert(out.end(), std::make_move_iterator(idle.begin()),
               std::make_move_iterator(idle.begin() + std::ptrdiff_t(drop)));
    idle.erase(idle.begin(), idle.begin() + std::ptrdiff_t(drop));
    return out;
  }
};

// (Every take and give back from Python runs holding the GIL: decode_buffer is called
// with it, and a tensor's deleter takes it to let go of the buffer. A fork, which
// Python makes holding it too, so never finds the lock held by another thread.)
RegionCache& cache() {
  static RegionCache* c = new RegionCache();
  return *c;
}

}  // namespace

std::unique_ptr<Region> take_region(size_t nbytes) {
  RegionCache& c = cache();
  {
    std::lock_guard<std::mutex> lock(c.mu);
    size_t best = c.idle.size();
    for (size_t i = 0; i < c.idle.size(); ++i) {
      const size_t size = c.idle[i]->size();
      if (size >= nbytes && size / 2 <= nbytes &&
          (best == c.idle.size() || size < c.idle[best]->size()))
        best = i;
    }
    if (best < c.idle.size()) {
      std::unique_ptr<Region> r = std::move(c.idle[best]);
      c.idle.erase(c.idle.begin() + std::ptrdiff_t(best));
      c.idle_bytes -= r->size();
      return r;
    }
  }
  const size_t step = nbytes < kRegionAlign ? size_t(sysconf(_SC_PAGESIZE)) : kRegionAlign;
  const size_t size = (std::max<size_t>(nbytes, 1) + step - 1) / step * step;
  return std::make_unique<Region>(size);
}

void give_back_region(std::unique_ptr<Region> region) {
  if (!region) return;
  RegionCache& c = cache();
  std::vector<std::unique_ptr<Region>> gone;
  {
    std::lock_guard<std::mutex> lock(c.mu);
    if (region->size() > c.limit) {
      gone.push_back(std::move(region));
    } else {
#ifdef MADV_FREE
      madvise(region->data(), region->size(), MADV_FREE);  // (an older kernel: kept as it is)
#endif
      c.idle_bytes += region->size();
      c.idle.push_back(std::move(region));
      gone = c.over_limit();
    }
  }
  // (unmapped here, outside the lock)
}

RegionCacheState region_cache(int64_t limit) {
  RegionCache& c = cache();
  std::vector<std::unique_ptr<Region>> gone;
  std::lock_guard<std::mutex> lock(c.mu);
  if (limit >= 0) {
    c.limit = size_t(limit);
    gone = c.over_limit();
  }
  return {c.limit, c.idle_bytes, c.idle.size()};
}

}  // namespace mmcore
