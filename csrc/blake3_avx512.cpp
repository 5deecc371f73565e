// AVX-512 instantiation of the lane kernels: sixteen chunks per vector and
// native 32-bit rotates. This file alone is compiled with -mavx512f, and is
// only called after a runtime CPU check.
#include "blake3.h"
#define MMCORE_LANES_ISA isa_avx512
#include "blake3_lanes.h"

namespace mmcore::blake3 {

using Lane16 = LaneVec<16>::type;

template <>
MMCORE_INLINE Lane16 rotr<16, Lane16>(Lane16 x) {
  return (Lane16)_mm512_ror_epi32((__m512i)x, 16);
}
template <>
MMCORE_INLINE Lane16 rotr<12, Lane16>(Lane16 x) {
  return (Lane16)_mm512_ror_epi32((__m512i)x, 12);
}
template <>
MMCORE_INLINE Lane16 rotr<8, Lane16>(Lane16 x) {
  return (Lane16)_mm512_ror_epi32((__m512i)x, 8);
}
template <>
MMCORE_INLINE Lane16 rotr<7, Lane16>(Lane16 x) {
  return (Lane16)_mm512_ror_epi32((__m512i)x, 7);
}

inline namespace isa_avx512 {

// Lanes 0-7 and 8-15 are transposed as two 8x8 word blocks per half block,
// then joined: word w of lane l lands in m[w][l].
template <>
inline void load_block_lanes<16>(const uint8_t* const* data, uint32_t offset, Lane16* m) {
  __m256i lo[2][8], hi[2][8];
  for (int h = 0; h < 2; ++h) {
    for (int l = 0; l < 8; ++l) {
      const uint8_t* p = data[8 * h + l] + offset;
      lo[h][l] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      hi[h][l] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32));
    }
    transpose8x8(lo[h]);
    transpose8x8(hi[h]);
  }
  for (int w = 0; w < 8; ++w) {
    m[w] = (Lane16)_mm512_inserti64x4(_mm512_castsi256_si512(lo[0][w]), lo[1][w], 1);
    m[8 + w] = (Lane16)_mm512_inserti64x4(_mm512_castsi256_si512(hi[0][w]), hi[1][w], 1);
  }
}

static void chunks_x16(const uint8_t* const* data, const uint32_t* len, uint32_t blocks,
                       const uint64_t* counter, const uint8_t* root, uint32_t* const* out) {
  chunks_lanes<16>(data, len, blocks, counter, root, out);
}

static void parents_x16(const uint32_t* const* left, const uint32_t* const* right,
                        const uint8_t* root, uint32_t* const* out) {
  parents_lanes<16>(left, right, root, out);
}

}  // namespace isa_avx512

LaneKernels avx512_kernels() { return LaneKernels{16, chunks_x16, parents_x16, "avx512"}; }

}  // namespace mmcore::blake3
