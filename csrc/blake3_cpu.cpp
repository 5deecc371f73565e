// CPU path of the segment-table BLAKE3: chunk chaining values for every
// segment in SIMD lanes, then the tree merged level by level (left-complete
// binary tree, as the spec defines), all segments together.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "blake3.h"
#define MMCORE_LANES_ISA isa_generic
#include "blake3_lanes.h"
#include "parallel.h"

namespace mmcore {
namespace {

using blake3::LaneKernels;

constexpr int kMaxLanes = 16;

void chunks_x4(const uint8_t* const* data, const uint32_t* len, uint32_t blocks,
               const uint64_t* counter, const uint8_t* root, uint32_t* const* out) {
  blake3::chunks_lanes<4>(data, len, blocks, counter, root, out);
}

void parents_x4(const uint32_t* const* left, const uint32_t* const* right, const uint8_t* root,
                uint32_t* const* out) {
  blake3::parents_lanes<4>(left, right, root, out);
}

// The widest instruction set the CPU has, capped by MMCORE_BLAKE3_ISA
// ("avx512", "avx2" or "generic") when set: how the tests run every path on
// one machine.
LaneKernels select_kernels() {
  const char* cap = std::getenv("MMCORE_BLAKE3_ISA");
  const std::string limit = cap && *cap ? cap : "avx512";
  if (limit != "avx512" && limit != "avx2" && limit != "generic")
    throw std::invalid_argument("MMCORE_BLAKE3_ISA must be avx512, avx2 or generic, not '" + limit +
                                "'");
  const bool avx512 = limit == "avx512", avx2 = avx512 || limit == "avx2";
  (void)avx2;
#if defined(__x86_64__) && defined(MMCORE_HAVE_AVX2_TU)
  __builtin_cpu_init();
  if (avx512 && __builtin_cpu_supports("avx512f")) return blake3::avx512_kernels();
  if (avx2 && __builtin_cpu_supports("avx2")) return blake3::avx2_kernels();
#endif
  return LaneKernels{4, chunks_x4, parents_x4, "generic"};
}

const LaneKernels& kernels() {
  static const LaneKernels k = select_kernels();
  return k;
}

uint64_t chunk_count(uint64_t len) {
  return len == 0 ? 1 : (len + blake3::kChunkLen - 1) / blake3::kChunkLen;
}

// Collects chunks with the same number of blocks into lane batches and flushes
// them through the SIMD kernel.
struct ChunkBatcher {
  const LaneKernels& k;
  uint32_t blocks;
  const ChunkVisitor* visitor;
  int used = 0;
  size_t segment[kMaxLanes];
  uint64_t offset[kMaxLanes];
  const uint8_t* data[kMaxLanes];
  uint32_t len[kMaxLanes];
  uint64_t counter[kMaxLanes];
  uint8_t root[kMaxLanes];
  uint32_t* out[kMaxLanes];

  ChunkBatcher(const LaneKernels& kernels, uint32_t block_count, const ChunkVisitor* v)
      : k(kernels), blocks(block_count), visitor(v) {}

  void add(size_t s, uint64_t off, const uint8_t* d, uint32_t n, uint64_t c, bool r, uint32_t* o) {
    segment[used] = s;
    offset[used] = off;
    data[used] = d;
    len[used] = n;
    counter[used] = c;
    root[used] = r;
    out[used] = o;
    if (++used == k.width) flush();
  }
  void flush() {
    if (used == 0) return;
    uint32_t scratch[kMaxLanes][8];
    for (int l = used; l < k.width; ++l) {  // pad with copies; results discarded
      data[l] = data[0];
      len[l] = len[0];
      counter[l] = counter[0];
      root[l] = root[0];
      out[l] = scratch[l];
    }
    k.chunks(data, len, blocks, counter, root, out);
    if (visitor)
      for (int l = 0; l < used; ++l) visitor->visit(visitor->ctx, segment[l], offset[l], len[l]);
    used = 0;
  }
};

struct ParentJob {
  const uint32_t* left;
  const uint32_t* right;
  uint32_t* out;
  bool root;
};

void run_parent_jobs(const std::vector<ParentJob>& jobs, int threads) {
  const LaneKernels& k = kernels();
  parallel_ranges(jobs.size(), threads, 4096, [&](size_t begin, size_t end) {
    const uint32_t* left[kMaxLanes];
    const uint32_t* right[kMaxLanes];
    uint8_t root[kMaxLanes];
    uint32_t* out[kMaxLanes];
    uint32_t scratch[kMaxLanes][8];
    size_t i = begin;
    for (; i + size_t(k.width) <= end; i += size_t(k.width)) {
      for (int l = 0; l < k.width; ++l) {
        const ParentJob& j = jobs[i + size_t(l)];
        left[l] = j.left;
        right[l] = j.right;
        root[l] = j.root;
        out[l] = scratch[l];
      }
      k.parents(left, right, root, out);
      // Outputs go to scratch first: a job's output may alias another job's input.
      for (int l = 0; l < k.width; ++l) std::memcpy(jobs[i + size_t(l)].out, scratch[l], 32);
    }
    for (; i < end; ++i) {
      uint32_t cv[8];
      blake3::parent_cv(jobs[i].left, jobs[i].right, jobs[i].root, cv);
      std::memcpy(jobs[i].out, cv, 32);
    }
  });
}

}  // namespace

const char* blake3_cpu_isa() { return kernels().isa; }

void blake3_segments_cpu(const uint8_t* const* ptrs, const uint64_t* lens, size_t n, uint8_t* out,
                         int threads, const ChunkVisitor* visitor) {
  if (n == 0) return;
  std::vector<uint64_t> base(n + 1, 0);
  for (size_t s = 0; s < n; ++s) base[s + 1] = base[s] + chunk_count(lens[s]);
  const uint64_t total = base[n];
  std::unique_ptr<uint32_t[]> cvs(new uint32_t[total * 8]);
  const LaneKernels& k = kernels();

  // Level 0: one chaining value per chunk, across all segments.
  parallel_ranges(size_t(total), threads, 64, [&](size_t begin, size_t end) {
    // One batcher per block count (1..16): chunks of one batch share a length class.
    std::vector<ChunkBatcher> batches;
    batches.reserve(16);
    for (uint32_t b = 1; b <= 16; ++b) batches.emplace_back(k, b, visitor);
    size_t s =
        size_t(std::upper_bound(base.begin(), base.end(), uint64_t(begin)) - base.begin()) - 1;
    for (size_t c = begin; c < end; ++c) {
      while (c >= base[s + 1]) ++s;
      const uint64_t index = c - base[s];
      const uint64_t offset = index * blake3::kChunkLen;
      const uint64_t remaining = lens[s] - offset;
      const uint32_t len =
          uint32_t(remaining < blake3::kChunkLen ? remaining : uint64_t(blake3::kChunkLen));
      const bool root = base[s + 1] - base[s] == 1;
      uint32_t* cv = cvs.get() + c * 8;
      if (len == 0) {
        blake3::chunk_cv(nullptr, 0, index, root, cv);
      } else {
        batches[(len - 1) / blake3::kBlockLen].add(s, offset, ptrs[s] + offset, len, index, root,
                                                   cv);
      }
    }
    for (auto& b : batches) b.flush();
  });

  // Tree levels: pair neighbours left to right, carry an odd last node up.
  std::vector<uint64_t> count(n);
  for (size_t s = 0; s < n; ++s) count[s] = base[s + 1] - base[s];
  std::unique_ptr<uint32_t[]> next(new uint32_t[(total / 2 + n) * 8]);
  std::vector<uint64_t> next_base(n + 1, 0);
  std::vector<ParentJob> jobs;
  uint32_t* cur = cvs.get();
  uint32_t* nxt = next.get();
  std::vector<uint64_t> cur_base = base;
  for (;;) {
    bool pending = false;
    for (size_t s = 0; s < n && !pending; ++s) pending = count[s] > 1;
    if (!pending) break;
    jobs.clear();
    for (size_t s = 0; s < n; ++s) {
      uint64_t parents = count[s] / 2 + count[s] % 2;
      next_base[s + 1] = next_base[s] + (count[s] > 1 ? parents : 1);
    }
    for (size_t s = 0; s < n; ++s) {
      const uint32_t* src = cur + cur_base[s] * 8;
      uint32_t* dst = nxt + next_base[s] * 8;
      if (count[s] == 1) {
        std::memcpy(dst, src, 32);
        continue;
      }
      const bool root = count[s] == 2;
      for (uint64_t i = 0; i + 1 < count[s]; i += 2)
        jobs.push_back(ParentJob{src + i * 8, src + (i + 1) * 8, dst + (i / 2) * 8, root});
      if (count[s] % 2) std::memcpy(dst + (count[s] / 2) * 8, src + (count[s] - 1) * 8, 32);
      count[s] = count[s] / 2 + count[s] % 2;
    }
    run_parent_jobs(jobs, threads);
    std::swap(cur, nxt);
    cur_base = next_base;
  }
  for (size_t s = 0; s < n; ++s) {
    const uint32_t* h = cur + cur_base[s] * 8;
    for (int i = 0; i < 8; ++i) blake3::store_le32(out + 32 * s + 4 * i, h[i]);
  }
}

}  // namespace mmcore
