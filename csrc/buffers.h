// Decode buffers: anonymous mappings, and a cache of the ones released, so that a
// process decoding set after set writes into memory that is already faulted in. A fresh
// mapping's pages are zeroed by the kernel as they are first written: a 200 MB coded
// set's load took 1.5-1.7x the plain load on the project's 2-core machines that way,
// 1.1-1.25x with its buffer lent again. (Small pages, not huge ones: there a process's
// first huge pages cost 5x more, 230-330 ms for 200 MB, the host backing them anew.)
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

namespace mmcore {

// One anonymous mapping of `size` bytes, unmapped when destroyed.
class Region {
 public:
  explicit Region(size_t size);  // throws std::bad_alloc where the mapping fails
  ~Region();
  Region(const Region&) = delete;
  Region& operator=(const Region&) = delete;
  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  uint8_t* data_;
  size_t size_;
};

// Regions are made in steps of 2 MiB (fewer misfits between sets of about one size),
// smaller ones in pages.
constexpr size_t kRegionAlign = size_t(2) << 20;

// A region of at least `nbytes` (> 0): a released one of at most twice that size
// where the cache holds one (the smallest), else a new one. Its bytes are not
// initialised.
std::unique_ptr<Region> take_region(size_t nbytes);

// Hands a region back: kept for a later take_region while the idle regions stay
// within the cache's limit (the oldest go first), its pages marked as free for the
// kernel to reclaim under memory pressure meanwhile (MADV_FREE); else unmapped.
void give_back_region(std::unique_ptr<Region> region);

struct RegionCacheState {
  size_t limit;  // bytes of idle regions kept at most
  size_t idle_bytes;
  size_t idle_regions;
};

// The cache's state; with `limit` >= 0, its new limit first (idle regions over it go).
// The default limit: an eighth of physical memory, at most 1 GiB.
RegionCacheState region_cache(int64_t limit);

}  // namespace mmcore
