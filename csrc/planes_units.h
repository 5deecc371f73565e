// The byte-plane decoder of the GPU (planes_cuda.cu), written once for the device and
// for the CPU emulation the CPU tests run (planes.cpp, planes_emulate), so that table
// building, every plane mode, every damage check and every tail are tested without a
// GPU. The stream is docs/FORMAT.md's "Byte planes"; the host parses each stream's
// header and block table (planes_blocks) into a table of Blocks.
//
// Two launches over that table:
//  1. decode: one CTA of kLanes threads per block. Lane 0 parses the block's planes and
//     their tables (parse); every lane fills the decode tables (fill_tables); then each
//     coded plane's streams are decoded by a lane each (a Huffman plane's four
//     quarters, or a rANS plane's one stream), into the block's scratch planes; a raw
//     plane is read where it is stored. The planes' addresses go to the block's row of
//     `planes` (null where the block is damaged).
//  2. join: the block's elements, each gathered from its planes and rotated back,
//     written to the block's destination.
// A damaged block sets the launch's error pair (the first error code, the block), and
// no lane reads or writes outside the block's coded bytes, its scratch or its output.
#pragma once

#include <cstdint>

#include "common.h"

namespace mmcore::planes_units {

constexpr uint32_t kLanes = 32;  // threads of a decode CTA (one warp)
constexpr uint32_t kJoinThreads = 256;
constexpr int kMaxWidth = 8;
constexpr int kHuffBits = 11;
constexpr uint32_t kHuffSize = 1u << kHuffBits;
constexpr uint32_t kProbBits = 12;
constexpr uint32_t kProbScale = 1u << kProbBits;
constexpr uint32_t kLow = 1u << 23;

// One block of a byte-plane stream, built by the host: 40 bytes.
struct Block {
  uint64_t src;      // address of the block's coded bytes (after the stream's block table)
  uint64_t dst;      // where its m elements of `width` bytes go
  uint64_t scratch;  // width * m bytes for the planes it decodes
  uint32_t len;      // coded bytes
  uint32_t m;        // elements (1 to 2^20)
  uint32_t width;    // 1, 2, 4 or 8
  uint32_t pad;
};

enum Error : uint32_t {
  kOk = 0,
  kBadBlock = 1,   // planes that do not add up to the block
  kBadTable = 2,   // a table that is no code
  kEndsEarly = 3,  // a stream needs more bytes than it holds
  kBadLength = 4,  // a stream longer than its symbols
  kNoCode = 5,     // a Huffman pattern of no code
  kBadState = 6,   // a rANS state out of range (first or last)
  kBadMode = 7,    // a plane of unknown mode
};

// One plane as parse() found it.
struct Plane {
  uint32_t mode;     // 0 raw, 1 rANS, 2 and 3 Huffman (its table as pairs, or a range)
  uint32_t at;       // raw: its bytes; rANS: its payload (states first); Huffman: stream 0
  uint32_t size[4];  // rANS: payload length in size[0]; Huffman: the four streams' lengths
};

// A coded plane's decode tables (in shared memory on the device).
struct Tables {
  union {
    struct {
      uint16_t entry[kHuffSize];  // by the next 11 bits, most significant first:
                                  // symbol | length << 8 (0: no code)
      uint16_t first[kHuffBits + 1], count[kHuffBits + 1], offset[kHuffBits + 1];
      uint8_t sorted[256];  // the symbols, by code
    } huff;
    struct {
      uint8_t symbol[kProbScale];  // by slot
      uint16_t freq[256], cum[256];
      uint8_t order[256];  // the table's symbols, in table (cumulative) order
      uint32_t nsym;
    } rans;
  };
};

struct Shared {  // a decode CTA's shared memory
  Plane plane[kMaxWidth];
  Tables table[kMaxWidth];
  uint32_t error;
};

MMCORE_HD MMCORE_INLINE uint32_t u32_at(const uint8_t* p) {
  return uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16) | (uint32_t(p[3]) << 24);
}

MMCORE_HD MMCORE_INLINE uint32_t reverse11(uint32_t x) {
#if defined(__CUDA_ARCH__)
  return __brev(x) >> (32 - kHuffBits);
#else
  uint32_t r = 0;
  for (int b = 0; b < kHuffBits; ++b) r |= ((x >> b) & 1u) << (kHuffBits - 1 - b);
  return r;
#endif
}

// Lane 0: the block's planes and their tables' contents, checked as planes.cpp's decoder
// checks them. Returns an Error.
MMCORE_HD inline uint32_t parse(const Block& b, Shared& sh) {
  const uint8_t* in = reinterpret_cast<const uint8_t*>(b.src);
  const uint64_t len = b.len, m = b.m;
  uint64_t at = 0;
  for (uint32_t p = 0; p < b.width; ++p) {
    Plane& pl = sh.plane[p];
    if (at >= len) return kBadBlock;
    pl.mode = in[at++];
    if (pl.mode == 0) {
      if (len - at < m) return kBadBlock;
      pl.at = uint32_t(at);
      at += m;
    } else if (pl.mode == 1) {
      auto& t = sh.table[p].rans;
      if (len - at < 1) return kBadTable;
      uint32_t nsym = uint32_t(in[at]) + 1;
      uint64_t table = 1 + 3 * uint64_t(nsym);
      if (len - at < table + 4) return kBadTable;
      for (int s = 0; s < 256; ++s) t.freq[s] = 0;
      uint32_t cum = 0;
      for (uint32_t k = 0; k < nsym; ++k) {
        const uint8_t* e = in + at + 1 + 3 * k;
        uint32_t f = uint32_t(e[1]) | (uint32_t(e[2]) << 8);
        if (!f || t.freq[e[0]] || cum + f > kProbScale) return kBadTable;
        t.freq[e[0]] = uint16_t(f);
        t.cum[e[0]] = uint16_t(cum);
        t.order[k] = e[0];
        cum += f;
      }
      if (cum != kProbScale) return kBadTable;
      t.nsym = nsym;
      uint64_t payload = u32_at(in + at + table);
      if (payload > len - at - table - 4 || payload < 16) return kBadLength;
      pl.at = uint32_t(at + table + 4);
      pl.size[0] = uint32_t(payload);
      at += table + 4 + payload;
    } else if (pl.mode == 2 || pl.mode == 3) {
      auto& t = sh.table[p].huff;
      if (len - at < 2) return kBadTable;
      // code lengths by symbol, in the entry table's bytes until fill_tables
      uint8_t* lens = reinterpret_cast<uint8_t*>(t.entry);
      for (int s = 0; s < 256; ++s) lens[s] = 0;
      for (int l = 0; l <= kHuffBits; ++l) t.count[l] = 0;
      uint64_t table;
      if (pl.mode == 3) {  // nibbles of symbols in[at] .. in[at] + in[at + 1]
        const uint32_t lo = in[at], n = uint32_t(in[at + 1]) + 1;
        table = 2 + (n + 1) / 2;
        if (lo + n > 256 || len - at < table + 16) return kBadTable;
        uint32_t present = 0;
        for (uint32_t k = 0; k < n; ++k) {
          uint8_t l = uint8_t((in[at + 2 + k / 2] >> (4 * (k & 1))) & 0xF);
          if (l > kHuffBits) return kBadTable;
          lens[lo + k] = l;
          if (l) ++t.count[l], ++present;
        }
        if (!present || ((n & 1) && (in[at + table - 1] >> 4))) return kBadTable;
      } else {
        uint32_t nsym = uint32_t(in[at]) + 1;
        table = 1 + 2 * uint64_t(nsym);
        if (len - at < table + 16) return kBadTable;
        for (uint32_t k = 0; k < nsym; ++k) {
          uint8_t sym = in[at + 1 + 2 * k], l = in[at + 2 + 2 * k];
          if (!l || l > kHuffBits || lens[sym]) return kBadTable;
          lens[sym] = l;
          ++t.count[l];
        }
      }
      // canonical codes: the first of each length, where its symbols start in `sorted`
      uint32_t code = 0, offset = 0;
      for (int l = 1; l <= kHuffBits; ++l) {
        code <<= 1;
        t.first[l] = uint16_t(code);
        t.offset[l] = uint16_t(offset);
        code += t.count[l];
        offset += t.count[l];
        if (code > (1u << l)) return kBadTable;  // no prefix code
      }
      uint16_t next[kHuffBits + 1];
      for (int l = 1; l <= kHuffBits; ++l) next[l] = t.offset[l];
      for (int s = 0; s < 256; ++s)
        if (lens[s]) t.sorted[next[lens[s]]++] = uint8_t(s);
      uint64_t total = table + 16;
      for (int k = 0; k < 4; ++k) {
        pl.size[k] = u32_at(in + at + table + 4 * k);
        total += pl.size[k];
      }
      if (total > len - at) return kBadBlock;
      pl.at = uint32_t(at + table + 16);
      at += total;
    } else {
      return kBadMode;
    }
  }
  return at == len ? kOk : kBadBlock;
}

// Every lane: fills the coded planes' lookup tables (lane `lane` of `lanes`).
MMCORE_HD inline void fill_tables(const Block& b, Shared& sh, uint32_t lane, uint32_t lanes) {
  for (uint32_t p = 0; p < b.width; ++p) {
    if (sh.plane[p].mode >= 2) {
      auto& t = sh.table[p].huff;
      for (uint32_t v = lane; v < kHuffSize; v += lanes) {
        uint16_t e = 0;
        for (int l = 1; l <= kHuffBits; ++l) {
          uint32_t c = (v >> (kHuffBits - l)) - t.first[l];  // (wraps when below)
          if (c < t.count[l]) {
            e = uint16_t(t.sorted[t.offset[l] + c] | (uint32_t(l) << 8));
            break;
          }
        }
        t.entry[v] = e;
      }
    } else if (sh.plane[p].mode == 1) {
      auto& t = sh.table[p].rans;
      for (uint32_t slot = lane; slot < kProbScale; slot += lanes) {
        uint32_t lo = 0, hi = t.nsym;  // the last symbol whose range starts at or before slot
        while (hi - lo > 1) {
          uint32_t mid = (lo + hi) / 2;
          if (t.cum[t.order[mid]] <= slot)
            lo = mid;
          else
            hi = mid;
        }
        t.symbol[slot] = t.order[lo];
      }
    }
  }
}

// The decode jobs of a block: a Huffman plane's four streams, a rANS plane's one.
MMCORE_HD MMCORE_INLINE uint32_t jobs(const Block& b, const Shared& sh) {
  uint32_t n = 0;
  for (uint32_t p = 0; p < b.width; ++p) n += sh.plane[p].mode >= 2 ? 4 : sh.plane[p].mode == 1;
  return n;
}

// One lane's job `job` (< jobs()): decodes it into the block's scratch planes.
MMCORE_HD inline uint32_t decode_job(const Block& b, const Shared& sh, uint32_t job) {
  const uint8_t* in = reinterpret_cast<const uint8_t*>(b.src);
  uint8_t* scratch = reinterpret_cast<uint8_t*>(b.scratch);
  const uint32_t m = b.m;
  for (uint32_t p = 0; p < b.width; ++p) {
    const Plane& pl = sh.plane[p];
    uint32_t n = pl.mode >= 2 ? 4 : pl.mode == 1;
    if (job >= n) {
      job -= n;
      continue;
    }
    uint8_t* out = scratch + uint64_t(p) * m;
    if (pl.mode >= 2) {
      const auto& t = sh.table[p].huff;
      const uint32_t q = (m + 3) / 4;
      uint32_t begin = job * q < m ? job * q : m, end = (job + 1) * q < m ? (job + 1) * q : m;
      uint32_t start = pl.at;
      for (uint32_t k = 0; k < job; ++k) start += pl.size[k];
      const uint8_t* s = in + start;
      const uint32_t size = pl.size[job];
      uint64_t bits = 0;
      int cnt = 0;
      uint32_t pos = 0;
      for (uint32_t i = begin; i < end; ++i) {
        while (cnt <= 56 && pos < size) {
          bits |= uint64_t(s[pos++]) << cnt;
          cnt += 8;
        }
        uint16_t e = t.entry[reverse11(uint32_t(bits) & (kHuffSize - 1))];
        int l = e >> 8;
        if (!l) return kNoCode;
        if (l > cnt) return kEndsEarly;
        out[i] = uint8_t(e);
        bits >>= l;
        cnt -= l;
      }
      uint64_t used = 8 * uint64_t(pos) - uint64_t(cnt);
      return (used + 7) / 8 == size ? kOk : kBadLength;
    }
    // rANS: four states over one byte stream
    const auto& t = sh.table[p].rans;
    const uint8_t* s = in + pl.at;
    const uint32_t size = pl.size[0];
    uint32_t x[4];
    for (int k = 0; k < 4; ++k) {
      x[k] = u32_at(s + 4 * k);
      if (x[k] < kLow || x[k] >= (kLow << 8)) return kBadState;
    }
    uint32_t pos = 16;
    for (uint32_t i = 0; i < m; ++i) {
      uint32_t& st = x[i & 3];
      uint32_t slot = st & (kProbScale - 1);
      uint8_t sym = t.symbol[slot];
      out[i] = sym;
      st = uint32_t(t.freq[sym]) * (st >> kProbBits) + slot - t.cum[sym];
      while (st < kLow) {
        if (pos == size) return kEndsEarly;
        st = (st << 8) | s[pos++];
      }
    }
    if (pos != size) return kBadLength;
    for (int k = 0; k < 4; ++k)
      if (x[k] != kLow) return kBadState;
    return kOk;
  }
  return kOk;
}

// Lane 0, last: the block's planes' addresses (its row of `planes`).
MMCORE_HD MMCORE_INLINE void plane_addresses(const Block& b, const Shared& sh, uint64_t* row) {
  for (uint32_t p = 0; p < b.width; ++p)
    row[p] = sh.plane[p].mode == 0 ? b.src + sh.plane[p].at : b.scratch + uint64_t(p) * b.m;
}

// The join: element i of the block from its planes, rotated back (the sign bit from
// bit 0 to the top), written to its destination.
template <typename U>
MMCORE_HD MMCORE_INLINE void join_element(const uint64_t* row, uint8_t* dst, uint32_t i) {
  constexpr int w = sizeof(U);
  U v = 0;
  MMCORE_UNROLL
  for (int p = 0; p < w; ++p) v |= U(U(reinterpret_cast<const uint8_t*>(row[p])[i]) << (8 * p));
  if (w > 1) v = U(U(v >> 1) | U(v << (8 * w - 1)));
#if defined(__CUDA_ARCH__)
  if ((reinterpret_cast<uintptr_t>(dst) & (w - 1)) == 0) {  // one store (the usual case)
    reinterpret_cast<U*>(dst)[i] = v;
    return;
  }
#endif
  MMCORE_UNROLL
  for (int p = 0; p < w; ++p) dst[uint64_t(i) * w + p] = uint8_t(v >> (8 * p));
}

MMCORE_HD MMCORE_INLINE void join(const Block& b, const uint64_t* row, uint32_t i) {
  uint8_t* dst = reinterpret_cast<uint8_t*>(b.dst);
  switch (b.width) {
    case 1: join_element<uint8_t>(row, dst, i); break;
    case 2: join_element<uint16_t>(row, dst, i); break;
    case 4: join_element<uint32_t>(row, dst, i); break;
    default: join_element<uint64_t>(row, dst, i); break;
  }
}

}  // namespace mmcore::planes_units
