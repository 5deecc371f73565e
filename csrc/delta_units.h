// The elementwise GPU kernels' work, one "unit" at a time: kUnit consecutive
// words (xor-planes), 16 bytes of elements (quantized) or of a copy, read and written
// with 16-byte vector accesses where the addresses allow, byte by byte where
// they do not (a segment's tail, or a buffer that does not start on 16 bytes).
// Written once for the device and for the CPU emulation that the CPU tests run
// (delta_emulate.cpp), so the planes built in registers, every alignment case
// and every tail are checked against the CPU kernels without a GPU.
//
// A launch covers a table of segments in tiles of kTileThreads units of one
// segment: tile_base[s] is segment s's first tile and tile_segment[i] tile i's
// segment, so a CTA finds its segment with one load per tile; the grid strides
// over the tiles. The *_thread functions are one thread's part of a tile.
#pragma once

#include <cstdint>

#include "delta_math.h"

#if !defined(__CUDA_ARCH__)
#include <stdexcept>
#endif

namespace mmcore::delta::units {

constexpr uint32_t kUnit = 16;          // words per xor-planes unit
constexpr uint32_t kTileThreads = 256;  // units per tile (threads per CTA)

struct alignas(16) Vec16 {
  uint32_t w[4];
};

MMCORE_HD MMCORE_INLINE bool aligned(const void* p, uintptr_t to) {
  return (reinterpret_cast<uintptr_t>(p) & (to - 1)) == 0;
}

MMCORE_HD MMCORE_INLINE uint32_t le32(const uint8_t* p) {
  return uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16) | (uint32_t(p[3]) << 24);
}

// Vector accesses. On the device a misaligned one faults; the emulation checks
// the address instead, so a wrong alignment decision fails the CPU tests too.
#if defined(__CUDA_ARCH__)
#define MMCORE_UNITS_ALIGNED(p, to) ((void)0)
#else
#define MMCORE_UNITS_ALIGNED(p, to) \
  (aligned(p, to) ? (void)0 : throw std::logic_error("emulated kernel: misaligned vector access"))
#endif

// 16 bytes at a 16-byte aligned address: one vector access on the device.
MMCORE_HD MMCORE_INLINE Vec16 load16(const uint8_t* p) {
  MMCORE_UNITS_ALIGNED(p, 16);
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const Vec16*>(p);
#else
  Vec16 v;
  memcpy(&v, p, 16);
  return v;
#endif
}

MMCORE_HD MMCORE_INLINE void store16(uint8_t* p, const Vec16& v) {
  MMCORE_UNITS_ALIGNED(p, 16);
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<Vec16*>(p) = v;
#else
  memcpy(p, &v, 16);
#endif
}

MMCORE_HD MMCORE_INLINE void store32(uint8_t* p, uint32_t v) {
  MMCORE_UNITS_ALIGNED(p, 4);
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<uint32_t*>(p) = v;
#else
  memcpy(p, &v, 4);
#endif
}

// Reads N bytes (a multiple of 16) into words: 16 bytes at a time when p is
// 16-byte aligned, else byte by byte.
template <uint32_t N>
MMCORE_HD MMCORE_INLINE void read(const uint8_t* p, uint32_t* words) {
  if (aligned(p, 16)) {
    MMCORE_UNROLL
    for (uint32_t k = 0; k < N / 16; ++k) {
      const Vec16 v = load16(p + 16 * k);
      for (int i = 0; i < 4; ++i) words[4 * k + i] = v.w[i];
    }
  } else {
    MMCORE_UNROLL
    for (uint32_t k = 0; k < N / 4; ++k) words[k] = le32(p + 4 * k);
  }
}

// The first `valid` <= N bytes at p into words ((N + 3) / 4 of them), the rest
// zero: through read<N> (16 bytes at a time where aligned) when all N are
// there, else byte by byte (a tail). Loops run to N, so words stays in registers.
template <uint32_t N>
MMCORE_HD MMCORE_INLINE void read_partial(const uint8_t* p, uint32_t valid, uint32_t* words) {
  if constexpr (N % 16 == 0) {
    if (valid == N) {
      read<N>(p, words);
      return;
    }
  }
  MMCORE_UNROLL
  for (uint32_t k = 0; k < (N + 3) / 4; ++k) {
    uint32_t v = 0;
    MMCORE_UNROLL
    for (uint32_t i = 0; i < 4; ++i)
      if (4 * k + i < valid) v |= uint32_t(p[4 * k + i]) << (8 * i);
    words[k] = v;
  }
}

// Writes the first len <= N bytes of words, as wide as p's alignment and len
// allow. Loops run to N, so words stays in registers.
template <uint32_t N>
MMCORE_HD MMCORE_INLINE void write(uint8_t* p, uint32_t len, const uint32_t* words) {
  if constexpr (N % 16 == 0) {
    if (len == N && aligned(p, 16)) {
      MMCORE_UNROLL
      for (uint32_t k = 0; k < N / 16; ++k) {
        Vec16 v;
        for (int i = 0; i < 4; ++i) v.w[i] = words[4 * k + i];
        store16(p + 16 * k, v);
      }
      return;
    }
  }
  if constexpr (N >= 4) {
    if (len % 4 == 0 && aligned(p, 4)) {
      MMCORE_UNROLL
      for (uint32_t k = 0; k < N / 4; ++k)
        if (4 * k < len) store32(p + 4 * k, words[k]);
      return;
    }
  }
  MMCORE_UNROLL
  for (uint32_t i = 0; i < N; ++i)
    if (i < len) p[i] = uint8_t(words[i / 4] >> (8 * (i % 4)));
}

// CUDA's __byte_perm: byte i of the result is byte (s >> 4i) & 7 of the pair (y:x).
MMCORE_HD MMCORE_INLINE uint32_t byte_perm(uint32_t x, uint32_t y, uint32_t s) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(x, y, s);
#else
  const uint64_t v = (uint64_t(y) << 32) | x;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) r |= uint32_t((v >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
  return r;
#endif
}

// Transposes a 4x4 byte matrix held as four words (row r = word r): its own inverse.
MMCORE_HD MMCORE_INLINE void transpose4(uint32_t& a, uint32_t& b, uint32_t& c, uint32_t& d) {
  const uint32_t t0 = byte_perm(a, b, 0x5140), t1 = byte_perm(c, d, 0x5140);
  const uint32_t t2 = byte_perm(a, b, 0x7362), t3 = byte_perm(c, d, 0x7362);
  a = byte_perm(t0, t1, 0x5410);
  b = byte_perm(t0, t1, 0x7632);
  c = byte_perm(t2, t3, 0x5410);
  d = byte_perm(t2, t3, 0x7632);
}

// x: kUnit words of W bytes as 4W little-endian uint32; planes: W planes of
// kUnit bytes, plane p as planes[4p .. 4p + 3]. Both directions.
template <int W>
MMCORE_HD MMCORE_INLINE void to_planes(const uint32_t* x, uint32_t* planes) {
  if (W == 1) {
    for (int j = 0; j < 4; ++j) planes[j] = x[j];
  } else if (W == 2) {  // each uint32 holds two words
    for (int j = 0; j < 4; ++j) {
      planes[j] = byte_perm(x[2 * j], x[2 * j + 1], 0x6420);
      planes[4 + j] = byte_perm(x[2 * j], x[2 * j + 1], 0x7531);
    }
  } else {  // W / 4 uint32 per word: half h of words 4j..4j+3 gives planes 4h..4h+3
    for (int h = 0; h < W / 4; ++h)
      for (int j = 0; j < 4; ++j) {
        uint32_t a = x[(4 * j) * (W / 4) + h], b = x[(4 * j + 1) * (W / 4) + h],
                 c = x[(4 * j + 2) * (W / 4) + h], d = x[(4 * j + 3) * (W / 4) + h];
        transpose4(a, b, c, d);
        planes[(4 * h) * 4 + j] = a;
        planes[(4 * h + 1) * 4 + j] = b;
        planes[(4 * h + 2) * 4 + j] = c;
        planes[(4 * h + 3) * 4 + j] = d;
      }
  }
}

template <int W>
MMCORE_HD MMCORE_INLINE void from_planes(const uint32_t* planes, uint32_t* x) {
  if (W == 1) {
    for (int j = 0; j < 4; ++j) x[j] = planes[j];
  } else if (W == 2) {
    for (int j = 0; j < 4; ++j) {
      x[2 * j] = byte_perm(planes[j], planes[4 + j], 0x5140);
      x[2 * j + 1] = byte_perm(planes[j], planes[4 + j], 0x7362);
    }
  } else {
    for (int h = 0; h < W / 4; ++h)
      for (int j = 0; j < 4; ++j) {
        uint32_t a = planes[(4 * h) * 4 + j], b = planes[(4 * h + 1) * 4 + j],
                 c = planes[(4 * h + 2) * 4 + j], d = planes[(4 * h + 3) * 4 + j];
        transpose4(a, b, c, d);
        x[(4 * j) * (W / 4) + h] = a;
        x[(4 * j + 1) * (W / 4) + h] = b;
        x[(4 * j + 2) * (W / 4) + h] = c;
        x[(4 * j + 3) * (W / 4) + h] = d;
      }
  }
}

// Non-zero bytes of v (0..4).
MMCORE_HD MMCORE_INLINE uint32_t nonzero_bytes(uint32_t v) {
  v |= v >> 4;
  v |= v >> 2;
  v |= v >> 1;
  v &= 0x01010101u;
  return (v * 0x01010101u) >> 24;
}

// ---- xor-planes ---------------------------------------------------------------------------

// Unit u of a segment of m words of W bytes: writes its words' bytes into the W
// planes at out (plane p at out + p * m) and returns how many of its words changed.
template <int W>
MMCORE_HD MMCORE_INLINE uint32_t xor_encode_unit(const uint8_t* next, const uint8_t* parent,
                                                 uint8_t* out, uint64_t m, uint64_t u) {
  const uint64_t first = u * kUnit;
  if (first >= m) return 0;
  const uint64_t count = m - first < kUnit ? m - first : kUnit;
  uint32_t changed = 0;
  if (count == kUnit) {
    uint32_t a[4 * W], b[4 * W], planes[4 * W];
    read<16 * W>(next + first * W, a);
    read<16 * W>(parent + first * W, b);
    for (int i = 0; i < 4 * W; ++i) a[i] ^= b[i];
    to_planes<W>(a, planes);
    uint32_t any[4] = {0, 0, 0, 0};
    for (int p = 0; p < W; ++p) {
      for (int j = 0; j < 4; ++j) any[j] |= planes[4 * p + j];
      write<kUnit>(out + uint64_t(p) * m + first, kUnit, planes + 4 * p);
    }
    for (int j = 0; j < 4; ++j) changed += nonzero_bytes(any[j]);
    return changed;
  }
  for (uint64_t i = first; i < first + count; ++i) {  // the segment's last, short unit
    uint8_t any = 0;
    for (int p = 0; p < W; ++p) {
      const uint8_t x = next[i * W + p] ^ parent[i * W + p];
      out[uint64_t(p) * m + i] = x;
      any |= x;
    }
    changed += any != 0;
  }
  return changed;
}

// The inverse: out (m words of W bytes) = the planes at enc, regrouped, XOR parent.
template <int W>
MMCORE_HD MMCORE_INLINE void xor_decode_unit(const uint8_t* enc, const uint8_t* parent,
                                             uint8_t* out, uint64_t m, uint64_t u) {
  const uint64_t first = u * kUnit;
  if (first >= m) return;
  const uint64_t count = m - first < kUnit ? m - first : kUnit;
  if (count == kUnit) {
    uint32_t planes[4 * W], x[4 * W], b[4 * W];
    for (int p = 0; p < W; ++p) read<kUnit>(enc + uint64_t(p) * m + first, planes + 4 * p);
    from_planes<W>(planes, x);
    read<16 * W>(parent + first * W, b);
    for (int i = 0; i < 4 * W; ++i) x[i] ^= b[i];
    write<16 * W>(out + first * W, 16 * W, x);
    return;
  }
  for (uint64_t i = first; i < first + count; ++i)
    xor_planes_decode_word<W>(enc, parent, out, i, m);
}

// ---- quantized ----------------------------------------------------------------------------
// A unit is 16 bytes of elements (8, 4 or 2 of them): each thread reads one
// vector of the new and one of the parent tensor, lanes side by side.

constexpr uint32_t kQuantBytes = 16;

// Element i of a unit read as four uint32 words: its bits.
template <int S>
MMCORE_HD MMCORE_INLINE uint64_t element(const uint32_t* w, int i) {
  if (S == 2) return (w[i / 2] >> (16 * (i % 2))) & 0xffffu;
  if (S == 4) return w[i];
  return uint64_t(w[2 * i]) | (uint64_t(w[2 * i + 1]) << 32);
}

// Reads unit u's elements (of numel) into w; returns how many there are (all
// 16 / S but in a segment's last unit, whose missing bytes read as zero).
template <int S>
MMCORE_HD MMCORE_INLINE uint32_t read_elements(const uint8_t* p, uint64_t numel, uint64_t u,
                                               uint32_t* w) {
  constexpr uint32_t kPer = kQuantBytes / S;
  const uint64_t first = u * kPer;
  const uint32_t count = uint32_t(numel - first < kPer ? numel - first : kPer);
  read_partial<kQuantBytes>(p + first * S, count * S, w);
  return count;
}

struct QuantStats {  // one unit's (or one thread's) part of quantize_plan's results
  uint64_t max_q, max_delta_bits;
  uint32_t escapes, changed;
};

template <int S>
MMCORE_HD MMCORE_INLINE QuantStats quantize_plan_unit(const uint8_t* next, const uint8_t* parent,
                                                      uint64_t numel, uint32_t kind, double tol,
                                                      uint64_t u) {
  constexpr uint32_t kPer = kQuantBytes / S;
  QuantStats st{0, 0, 0, 0};
  if (u * kPer >= numel) return st;
  uint32_t a[4], b[4];
  const uint32_t count = read_elements<S>(next, numel, u, a);
  read_elements<S>(parent, numel, u, b);
  MMCORE_UNROLL
  for (uint32_t i = 0; i < kPer; ++i) {
    if (i >= count) break;
    const uint64_t nb = element<S>(a, int(i)), pb = element<S>(b, int(i));
    st.changed += nb != pb;
    const double x = to_double(nb, kind), p = to_double(pb, kind);
    if (is_finite(x) && is_finite(p)) {
      const uint64_t d = double_bits(fabs(x - p));
      if (d > st.max_delta_bits) st.max_delta_bits = d;
    }
    int32_t q;
    if (quantize_one(nb, pb, kind, 2.0 * tol, tol, &q)) {
      const uint64_t mag = uint64_t(q < 0 ? -int64_t(q) : int64_t(q));
      if (mag > st.max_q) st.max_q = mag;
    } else {
      ++st.escapes;
    }
  }
  return st;
}

// Unit u's q values, qw bytes each (escapes hold 0), at q_out, and one flag
// byte per element at flags (1: escaped).
template <int S, uint32_t QW>
MMCORE_HD MMCORE_INLINE void quantize_write_unit(const uint8_t* next, const uint8_t* parent,
                                                 uint64_t numel, uint32_t kind, double tol,
                                                 uint8_t* q_out, uint8_t* flags, uint64_t u) {
  constexpr uint32_t kPer = kQuantBytes / S;
  const uint64_t first = u * kPer;
  if (first >= numel) return;
  uint32_t a[4], b[4];
  const uint32_t count = read_elements<S>(next, numel, u, a);
  read_elements<S>(parent, numel, u, b);
  uint32_t qs[(kPer * QW + 3) / 4] = {}, fl[(kPer + 3) / 4] = {};
  MMCORE_UNROLL
  for (uint32_t i = 0; i < kPer; ++i) {
    if (i >= count) break;
    int32_t q = 0;
    const bool ok =
        quantize_one(element<S>(a, int(i)), element<S>(b, int(i)), kind, 2.0 * tol, tol, &q);
    if (!ok) fl[i / 4] |= 1u << (8 * (i % 4));
    const uint32_t v = ok ? uint32_t(q) : 0u;  // little-endian, QW bytes
    if (QW == 4) {
      qs[i] = v;
    } else if (QW == 2) {
      qs[i / 2] |= (v & 0xffffu) << (16 * (i % 2));
    } else {
      qs[i / 4] |= (v & 0xffu) << (8 * (i % 4));
    }
  }
  write<kPer * QW>(q_out + first * QW, count * QW, qs);
  write<(kPer + 3) / 4 * 4>(flags + first, count, fl);
}

template <int S, uint32_t QW>
MMCORE_HD MMCORE_INLINE void quantize_decode_unit(const uint8_t* parent, uint64_t numel,
                                                  uint32_t kind, double tol, const uint8_t* q_in,
                                                  uint8_t* out, uint64_t u) {
  constexpr uint32_t kPer = kQuantBytes / S;
  const uint64_t first = u * kPer;
  if (first >= numel) return;
  constexpr uint32_t kQBytes = kPer * QW;
  uint32_t b[4], qs[(kQBytes + 3) / 4], x[4] = {0, 0, 0, 0};
  const uint32_t count = read_elements<S>(parent, numel, u, b);
  read_partial<kQBytes>(q_in + first * QW, count * QW, qs);
  MMCORE_UNROLL
  for (uint32_t i = 0; i < kPer; ++i) {
    if (i >= count) break;
    int32_t q;
    if (QW == 4) {
      q = int32_t(qs[i]);
    } else if (QW == 2) {
      q = int16_t(uint16_t(qs[i / 2] >> (16 * (i % 2))));
    } else {
      q = int8_t(uint8_t(qs[i / 4] >> (8 * (i % 4))));
    }
    const uint64_t bits = dequantize_one(element<S>(b, int(i)), q, kind, 2.0 * tol);
    if (S == 2) {
      x[i / 2] |= uint32_t(bits & 0xffffu) << (16 * (i % 2));
    } else if (S == 4) {
      x[i] = uint32_t(bits);
    } else {
      x[2 * i] = uint32_t(bits);
      x[2 * i + 1] = uint32_t(bits >> 32);
    }
  }
  write<kQuantBytes>(out + first * S, count * S, x);
}

// ---- copies -------------------------------------------------------------------------------
// A tile of a copy is kCopyTile bytes; thread t copies its 16-byte pieces t,
// t + kTileThreads, ... of it (a warp's access covers 512 contiguous bytes).
// Pieces are counted from the first 16-byte aligned source byte, so a segment
// whose source and destination are equally misaligned still copies 16 bytes at
// a time; its head (before that byte) and tail go byte by byte.

constexpr uint32_t kCopyPieces = 4;  // pieces per thread and tile
constexpr uint64_t kCopyTile = uint64_t(kTileThreads) * kCopyPieces * 16;

MMCORE_HD MMCORE_INLINE void copy_tile(uint8_t* dst, const uint8_t* src, uint64_t len,
                                       uint64_t tile, uint32_t t) {
  const bool together =
      ((reinterpret_cast<uintptr_t>(dst) ^ reinterpret_cast<uintptr_t>(src)) & 15) == 0;
  if (!together) {  // no common alignment: bytes, in the same pieces
    for (uint32_t k = 0; k < kCopyPieces; ++k) {
      const uint64_t at = tile * kCopyTile + (uint64_t(k) * kTileThreads + t) * 16;
      for (uint64_t i = at; i < at + 16 && i < len; ++i) dst[i] = src[i];
    }
    return;
  }
  const uint64_t lead = (16 - (reinterpret_cast<uintptr_t>(src) & 15)) & 15;
  if (tile == 0 && t == 0)
    for (uint64_t i = 0; i < lead && i < len; ++i) dst[i] = src[i];
  Vec16 v[kCopyPieces];
  uint64_t at[kCopyPieces];
  for (uint32_t k = 0; k < kCopyPieces; ++k) {  // every load first: four in flight per thread
    at[k] = lead + tile * kCopyTile + (uint64_t(k) * kTileThreads + t) * 16;
    if (at[k] + 16 <= len) v[k] = load16(src + at[k]);
  }
  for (uint32_t k = 0; k < kCopyPieces; ++k) {
    if (at[k] + 16 <= len) {
      store16(dst + at[k], v[k]);
    } else {
      for (uint64_t i = at[k]; i < len; ++i) dst[i] = src[i];  // the tail (at most one piece)
    }
  }
}

// ---- one thread's part of a launch --------------------------------------------------------

MMCORE_HD MMCORE_INLINE uint32_t xor_encode_thread(const uint8_t* const* news,
                                                   const uint8_t* const* parents,
                                                   const uint64_t* words, const uint32_t* widths,
                                                   uint8_t* const* outs, size_t s, uint64_t u) {
  switch (widths[s]) {
    case 1: return xor_encode_unit<1>(news[s], parents[s], outs[s], words[s], u);
    case 2: return xor_encode_unit<2>(news[s], parents[s], outs[s], words[s], u);
    case 4: return xor_encode_unit<4>(news[s], parents[s], outs[s], words[s], u);
    default: return xor_encode_unit<8>(news[s], parents[s], outs[s], words[s], u);
  }
}

MMCORE_HD MMCORE_INLINE void xor_decode_thread(const uint8_t* const* encs,
                                               const uint8_t* const* parents, const uint64_t* words,
                                               const uint32_t* widths, uint8_t* const* outs,
                                               size_t s, uint64_t u) {
  switch (widths[s]) {
    case 1: return xor_decode_unit<1>(encs[s], parents[s], outs[s], words[s], u);
    case 2: return xor_decode_unit<2>(encs[s], parents[s], outs[s], words[s], u);
    case 4: return xor_decode_unit<4>(encs[s], parents[s], outs[s], words[s], u);
    default: return xor_decode_unit<8>(encs[s], parents[s], outs[s], words[s], u);
  }
}

MMCORE_HD MMCORE_INLINE QuantStats quantize_plan_thread(const uint8_t* const* news,
                                                        const uint8_t* const* parents,
                                                        const uint64_t* numels,
                                                        const uint32_t* kinds, const double* tols,
                                                        size_t s, uint64_t u) {
  const uint32_t kind = kinds[s];
  switch (kind_size(kind)) {
    case 2: return quantize_plan_unit<2>(news[s], parents[s], numels[s], kind, tols[s], u);
    case 4: return quantize_plan_unit<4>(news[s], parents[s], numels[s], kind, tols[s], u);
    default: return quantize_plan_unit<8>(news[s], parents[s], numels[s], kind, tols[s], u);
  }
}

template <int S>
MMCORE_HD MMCORE_INLINE void quantize_write_sized(const uint8_t* next, const uint8_t* parent,
                                                  uint64_t numel, uint32_t kind, double tol,
                                                  uint32_t qw, uint8_t* q_out, uint8_t* flags,
                                                  uint64_t u) {
  if (qw == 1) return quantize_write_unit<S, 1>(next, parent, numel, kind, tol, q_out, flags, u);
  if (qw == 2) return quantize_write_unit<S, 2>(next, parent, numel, kind, tol, q_out, flags, u);
  return quantize_write_unit<S, 4>(next, parent, numel, kind, tol, q_out, flags, u);
}

MMCORE_HD MMCORE_INLINE void quantize_write_thread(
    const uint8_t* const* news, const uint8_t* const* parents, const uint64_t* numels,
    const uint32_t* kinds, const double* tols, const uint32_t* qwidths, uint8_t* const* q_outs,
    uint8_t* flags, const uint64_t* flag_base, size_t s, uint64_t u) {
  const uint32_t kind = kinds[s];
  uint8_t* f = flags + flag_base[s];
  switch (kind_size(kind)) {
    case 2:
      return quantize_write_sized<2>(news[s], parents[s], numels[s], kind, tols[s], qwidths[s],
                                     q_outs[s], f, u);
    case 4:
      return quantize_write_sized<4>(news[s], parents[s], numels[s], kind, tols[s], qwidths[s],
                                     q_outs[s], f, u);
    default:
      return quantize_write_sized<8>(news[s], parents[s], numels[s], kind, tols[s], qwidths[s],
                                     q_outs[s], f, u);
  }
}

template <int S>
MMCORE_HD MMCORE_INLINE void quantize_decode_sized(const uint8_t* parent, uint64_t numel,
                                                   uint32_t kind, double tol, uint32_t qw,
                                                   const uint8_t* q_in, uint8_t* out, uint64_t u) {
  if (qw == 1) return quantize_decode_unit<S, 1>(parent, numel, kind, tol, q_in, out, u);
  if (qw == 2) return quantize_decode_unit<S, 2>(parent, numel, kind, tol, q_in, out, u);
  return quantize_decode_unit<S, 4>(parent, numel, kind, tol, q_in, out, u);
}

MMCORE_HD MMCORE_INLINE void quantize_decode_thread(const uint8_t* const* parents,
                                                    const uint64_t* numels, const uint32_t* kinds,
                                                    const double* tols, const uint32_t* qwidths,
                                                    const uint8_t* const* qs, uint8_t* const* outs,
                                                    size_t s, uint64_t u) {
  const uint32_t kind = kinds[s];
  switch (kind_size(kind)) {
    case 2:
      return quantize_decode_sized<2>(parents[s], numels[s], kind, tols[s], qwidths[s], qs[s],
                                      outs[s], u);
    case 4:
      return quantize_decode_sized<4>(parents[s], numels[s], kind, tols[s], qwidths[s], qs[s],
                                      outs[s], u);
    default:
      return quantize_decode_sized<8>(parents[s], numels[s], kind, tols[s], qwidths[s], qs[s],
                                      outs[s], u);
  }
}

}  // namespace mmcore::delta::units
