// Many BLAKE3 compressions side by side on the CPU: one compiler-vector lane
// per independent chunk or parent node. Included by one translation unit per
// instruction set (baseline, AVX2, AVX-512), each compiled with its own flags.
// Each defines MMCORE_LANES_ISA first: the non-inlined functions live in a
// namespace of that name, so the linker never swaps one TU's AVX-512 copy of
// a function into a path that runs on a CPU without AVX-512.
#pragma once

#include <cstring>

#include "blake3_math.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#if !defined(MMCORE_LANES_ISA)
#error "define MMCORE_LANES_ISA (a namespace name) before including blake3_lanes.h"
#endif

namespace mmcore::blake3 {

template <int W>
struct LaneVec {
  typedef uint32_t type __attribute__((vector_size(4 * W)));
};

#if defined(__AVX2__)
using Lane8 = LaneVec<8>::type;

// Rotations by whole bytes are one byte shuffle instead of two shifts and an or.
template <>
MMCORE_INLINE Lane8 rotr<16, Lane8>(Lane8 x) {
  const __m256i idx = _mm256_setr_epi8(2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13, 2, 3,
                                       0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  return (Lane8)_mm256_shuffle_epi8((__m256i)x, idx);
}

template <>
MMCORE_INLINE Lane8 rotr<8, Lane8>(Lane8 x) {
  const __m256i idx = _mm256_setr_epi8(1, 2, 3, 0, 5, 6, 7, 4, 9, 10, 11, 8, 13, 14, 15, 12, 1, 2,
                                       3, 0, 5, 6, 7, 4, 9, 10, 11, 8, 13, 14, 15, 12);
  return (Lane8)_mm256_shuffle_epi8((__m256i)x, idx);
}

#endif

inline namespace MMCORE_LANES_ISA {

// m[w][l] = word w of the 64-byte block at data[l] + offset.
template <int W>
static inline void load_block_lanes(const uint8_t* const* data, uint32_t offset,
                                    typename LaneVec<W>::type* m) {
  for (int l = 0; l < W; ++l) {
    uint32_t words[16];
    std::memcpy(words, data[l] + offset, kBlockLen);
    for (int w = 0; w < 16; ++w) m[w][l] = words[w];
  }
}

#if defined(__AVX2__)
// Eight rows of eight words become eight columns.
static MMCORE_INLINE void transpose8x8(__m256i* v) {
  __m256i ab_lo = _mm256_unpacklo_epi32(v[0], v[1]), ab_hi = _mm256_unpackhi_epi32(v[0], v[1]);
  __m256i cd_lo = _mm256_unpacklo_epi32(v[2], v[3]), cd_hi = _mm256_unpackhi_epi32(v[2], v[3]);
  __m256i ef_lo = _mm256_unpacklo_epi32(v[4], v[5]), ef_hi = _mm256_unpackhi_epi32(v[4], v[5]);
  __m256i gh_lo = _mm256_unpacklo_epi32(v[6], v[7]), gh_hi = _mm256_unpackhi_epi32(v[6], v[7]);
  __m256i abcd_0 = _mm256_unpacklo_epi64(ab_lo, cd_lo),
          abcd_1 = _mm256_unpackhi_epi64(ab_lo, cd_lo);
  __m256i abcd_2 = _mm256_unpacklo_epi64(ab_hi, cd_hi),
          abcd_3 = _mm256_unpackhi_epi64(ab_hi, cd_hi);
  __m256i efgh_0 = _mm256_unpacklo_epi64(ef_lo, gh_lo),
          efgh_1 = _mm256_unpackhi_epi64(ef_lo, gh_lo);
  __m256i efgh_2 = _mm256_unpacklo_epi64(ef_hi, gh_hi),
          efgh_3 = _mm256_unpackhi_epi64(ef_hi, gh_hi);
  v[0] = _mm256_permute2x128_si256(abcd_0, efgh_0, 0x20);
  v[4] = _mm256_permute2x128_si256(abcd_0, efgh_0, 0x31);
  v[1] = _mm256_permute2x128_si256(abcd_1, efgh_1, 0x20);
  v[5] = _mm256_permute2x128_si256(abcd_1, efgh_1, 0x31);
  v[2] = _mm256_permute2x128_si256(abcd_2, efgh_2, 0x20);
  v[6] = _mm256_permute2x128_si256(abcd_2, efgh_2, 0x31);
  v[3] = _mm256_permute2x128_si256(abcd_3, efgh_3, 0x20);
  v[7] = _mm256_permute2x128_si256(abcd_3, efgh_3, 0x31);
}

template <>
inline void load_block_lanes<8>(const uint8_t* const* data, uint32_t offset, Lane8* m) {
  __m256i lo[8], hi[8];
  for (int l = 0; l < 8; ++l) {
    lo[l] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(data[l] + offset));
    hi[l] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(data[l] + offset + 32));
  }
  transpose8x8(lo);
  transpose8x8(hi);
  for (int w = 0; w < 8; ++w) {
    m[w] = (Lane8)lo[w];
    m[8 + w] = (Lane8)hi[w];
  }
}
#endif

// Hashes W chunks that all have `blocks` 64-byte blocks (the last one may be
// partial: len[l] bytes in all, 0 < len[l] <= 1024). `root[l]` marks a chunk
// that is a whole message on its own (its last block then carries ROOT).
template <int W>
static inline void chunks_lanes(const uint8_t* const* data, const uint32_t* len, uint32_t blocks,
                                const uint64_t* counter, const uint8_t* root,
                                uint32_t* const* out) {
  using V = typename LaneVec<W>::type;
  V cv[8];
  load_iv(cv);
  V counter_lo, counter_hi, root_flag, last_len;
  const uint32_t last = blocks - 1;
  for (int l = 0; l < W; ++l) {
    counter_lo[l] = uint32_t(counter[l]);
    counter_hi[l] = uint32_t(counter[l] >> 32);
    root_flag[l] = root[l] ? kRoot : 0u;
    last_len[l] = len[l] - last * kBlockLen;
  }
  const V full_len = splat<V>(kBlockLen);
  V m[16];
  for (uint32_t b = 0; b < last; ++b) {
    load_block_lanes<W>(data, b * kBlockLen, m);
    compress_in_place(cv, m, counter_lo, counter_hi, full_len, splat<V>(b == 0 ? kChunkStart : 0u));
  }
  // A partial last block is copied into zero padding, lane by lane.
  bool full = true;
  for (int l = 0; l < W; ++l) full = full && len[l] == blocks * kBlockLen;
  if (full) {
    load_block_lanes<W>(data, last * kBlockLen, m);
  } else {
    alignas(64) uint8_t padded[W][kBlockLen];
    const uint8_t* padded_ptr[W];
    for (int l = 0; l < W; ++l) {
      std::memset(padded[l], 0, kBlockLen);
      std::memcpy(padded[l], data[l] + last * kBlockLen, len[l] - last * kBlockLen);
      padded_ptr[l] = padded[l];
    }
    load_block_lanes<W>(padded_ptr, 0, m);
  }
  V flags = splat<V>(kChunkEnd | (last == 0 ? kChunkStart : 0u)) | root_flag;
  compress_in_place(cv, m, counter_lo, counter_hi, last_len, flags);
  for (int l = 0; l < W; ++l)
    for (int i = 0; i < 8; ++i) out[l][i] = cv[i][l];
}

// W parent nodes: out[l] = parent(left[l], right[l]).
template <int W>
static inline void parents_lanes(const uint32_t* const* left, const uint32_t* const* right,
                                 const uint8_t* root, uint32_t* const* out) {
  using V = typename LaneVec<W>::type;
  V cv[8];
  V m[16];
  V flags;
  load_iv(cv);
  for (int l = 0; l < W; ++l) {
    for (int i = 0; i < 8; ++i) {
      m[i][l] = left[l][i];
      m[8 + i][l] = right[l][i];
    }
    flags[l] = kParent | (root[l] ? kRoot : 0u);
  }
  compress_in_place(cv, m, splat<V>(0), splat<V>(0), splat<V>(kBlockLen), flags);
  for (int l = 0; l < W; ++l)
    for (int i = 0; i < 8; ++i) out[l][i] = cv[i][l];
}

}  // namespace MMCORE_LANES_ISA
}  // namespace mmcore::blake3
