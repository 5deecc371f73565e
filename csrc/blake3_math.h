// The BLAKE3 compression function and its constants, written once for every
// device. `Lane` is uint32_t for one message at a time (CPU scalar path, one
// CUDA thread) or a compiler vector of uint32_t for SIMD lanes on the CPU, so
// the CPU tests exercise exactly the arithmetic the GPU runs.
#pragma once

#include "common.h"

namespace mmcore::blake3 {

constexpr uint32_t kChunkLen = 1024;
constexpr uint32_t kBlockLen = 64;
constexpr uint32_t kChunkStart = 1u << 0;
constexpr uint32_t kChunkEnd = 1u << 1;
constexpr uint32_t kParent = 1u << 2;
constexpr uint32_t kRoot = 1u << 3;

#define MMCORE_BLAKE3_IV0 0x6A09E667u
#define MMCORE_BLAKE3_IV1 0xBB67AE85u
#define MMCORE_BLAKE3_IV2 0x3C6EF372u
#define MMCORE_BLAKE3_IV3 0xA54FF53Au
#define MMCORE_BLAKE3_IV4 0x510E527Fu
#define MMCORE_BLAKE3_IV5 0x9B05688Cu
#define MMCORE_BLAKE3_IV6 0x1F83D9ABu
#define MMCORE_BLAKE3_IV7 0x5BE0CD19u

MMCORE_HD MMCORE_INLINE uint32_t iv(int i) {
  switch (i) {
    case 0: return MMCORE_BLAKE3_IV0;
    case 1: return MMCORE_BLAKE3_IV1;
    case 2: return MMCORE_BLAKE3_IV2;
    case 3: return MMCORE_BLAKE3_IV3;
    case 4: return MMCORE_BLAKE3_IV4;
    case 5: return MMCORE_BLAKE3_IV5;
    case 6: return MMCORE_BLAKE3_IV6;
    default: return MMCORE_BLAKE3_IV7;
  }
}

template <typename Lane>
MMCORE_HD MMCORE_INLINE Lane splat(uint32_t value) {
  return Lane{} + value;  // broadcasts for vector lanes, plain value for scalars
}

template <int N, typename Lane>
MMCORE_HD MMCORE_INLINE Lane rotr(Lane x) {
  return (x >> N) | (x << (32 - N));
}

template <typename Lane>
MMCORE_HD MMCORE_INLINE void g(Lane* s, int a, int b, int c, int d, Lane mx, Lane my) {
  s[a] = s[a] + s[b] + mx;
  s[d] = rotr<16>(s[d] ^ s[a]);
  s[c] = s[c] + s[d];
  s[b] = rotr<12>(s[b] ^ s[c]);
  s[a] = s[a] + s[b] + my;
  s[d] = rotr<8>(s[d] ^ s[a]);
  s[c] = s[c] + s[d];
  s[b] = rotr<7>(s[b] ^ s[c]);
}

// The message word order of each of the 7 rounds (the spec's permutation
// applied r times), so rounds index the message instead of moving it.
#define MMCORE_BLAKE3_SCHEDULE                             \
  {{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, \
   {2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8}, \
   {3, 4, 10, 12, 13, 2, 7, 14, 6, 5, 9, 0, 11, 15, 8, 1}, \
   {10, 7, 12, 9, 14, 3, 13, 15, 4, 0, 11, 2, 5, 8, 1, 6}, \
   {12, 13, 9, 11, 15, 10, 14, 8, 7, 2, 5, 3, 0, 1, 6, 4}, \
   {9, 14, 11, 5, 8, 12, 15, 1, 13, 3, 0, 10, 2, 6, 4, 7}, \
   {11, 15, 5, 0, 1, 9, 8, 6, 14, 10, 2, 12, 3, 4, 7, 13}}

template <int R, typename Lane>
MMCORE_HD MMCORE_INLINE void round_fn(Lane* s, const Lane* m) {
  constexpr uint8_t sched[7][16] = MMCORE_BLAKE3_SCHEDULE;
  g(s, 0, 4, 8, 12, m[sched[R][0]], m[sched[R][1]]);
  g(s, 1, 5, 9, 13, m[sched[R][2]], m[sched[R][3]]);
  g(s, 2, 6, 10, 14, m[sched[R][4]], m[sched[R][5]]);
  g(s, 3, 7, 11, 15, m[sched[R][6]], m[sched[R][7]]);
  g(s, 0, 5, 10, 15, m[sched[R][8]], m[sched[R][9]]);
  g(s, 1, 6, 11, 12, m[sched[R][10]], m[sched[R][11]]);
  g(s, 2, 7, 8, 13, m[sched[R][12]], m[sched[R][13]]);
  g(s, 3, 4, 9, 14, m[sched[R][14]], m[sched[R][15]]);
}

// Compresses one 64-byte block into the chaining value `cv` (in place): the
// first eight output words, which are also the hash when `flags` has kRoot.
template <typename Lane>
MMCORE_HD MMCORE_INLINE void compress_in_place(Lane* cv, const Lane* m, Lane counter_lo,
                                               Lane counter_hi, Lane block_len, Lane flags) {
  Lane s[16];
  for (int i = 0; i < 8; ++i) s[i] = cv[i];
  for (int i = 0; i < 4; ++i) s[8 + i] = splat<Lane>(iv(i));
  s[12] = counter_lo;
  s[13] = counter_hi;
  s[14] = block_len;
  s[15] = flags;
  round_fn<0>(s, m);
  round_fn<1>(s, m);
  round_fn<2>(s, m);
  round_fn<3>(s, m);
  round_fn<4>(s, m);
  round_fn<5>(s, m);
  round_fn<6>(s, m);
  for (int i = 0; i < 8; ++i) cv[i] = s[i] ^ s[i + 8];
}

template <typename Lane>
MMCORE_HD MMCORE_INLINE void load_iv(Lane* cv) {
  for (int i = 0; i < 8; ++i) cv[i] = splat<Lane>(iv(i));
}

MMCORE_HD MMCORE_INLINE uint32_t load_le32(const uint8_t* p) {
  return uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16) | (uint32_t(p[3]) << 24);
}

MMCORE_HD MMCORE_INLINE void store_le32(uint8_t* p, uint32_t v) {
  p[0] = uint8_t(v);
  p[1] = uint8_t(v >> 8);
  p[2] = uint8_t(v >> 16);
  p[3] = uint8_t(v >> 24);
}

// Chaining value of one chunk of `len` <= 1024 bytes (scalar). With `root`
// set, the result is the hash of a message that is this single chunk.
MMCORE_HD MMCORE_INLINE void chunk_cv(const uint8_t* data, uint32_t len, uint64_t chunk_index,
                                      bool root, uint32_t* cv) {
  load_iv(cv);
  uint32_t blocks = len == 0 ? 1 : (len + kBlockLen - 1) / kBlockLen;
  for (uint32_t b = 0; b < blocks; ++b) {
    uint32_t offset = b * kBlockLen;
    uint32_t block_len = len - offset < kBlockLen ? len - offset : kBlockLen;
    uint32_t words[16];
    if (block_len == kBlockLen) {
      for (int w = 0; w < 16; ++w) words[w] = load_le32(data + offset + 4 * w);
    } else {
      uint8_t padded[kBlockLen] = {0};
      for (uint32_t i = 0; i < block_len; ++i) padded[i] = data[offset + i];
      for (int w = 0; w < 16; ++w) words[w] = load_le32(padded + 4 * w);
    }
    uint32_t flags = (b == 0 ? kChunkStart : 0) | (b + 1 == blocks ? kChunkEnd : 0);
    if (root && b + 1 == blocks) flags |= kRoot;
    compress_in_place<uint32_t>(cv, words, uint32_t(chunk_index), uint32_t(chunk_index >> 32),
                                block_len, flags);
  }
}

// Parent node: the chaining value of two children (scalar).
MMCORE_HD MMCORE_INLINE void parent_cv(const uint32_t* left, const uint32_t* right, bool root,
                                       uint32_t* out) {
  uint32_t words[16];
  for (int i = 0; i < 8; ++i) {
    words[i] = left[i];
    words[8 + i] = right[i];
  }
  load_iv(out);
  compress_in_place<uint32_t>(out, words, 0u, 0u, kBlockLen, kParent | (root ? kRoot : 0u));
}

}  // namespace mmcore::blake3
