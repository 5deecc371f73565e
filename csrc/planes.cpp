// Byte planes with an order-0 rANS coder (see planes.h; the stream is in
// docs/FORMAT.md, "Byte planes").
//
// The rANS coder: 32-bit states kept in [kLow, kLow << 8), frequencies quantised to
// 2^kProbBits, bytes out one at a time. Four states take turns (symbol i goes to state
// i % 4) over one byte stream, so four decodes are in flight at once; the encoder walks
// the plane backwards, writing its stream from the end, and the decoder reads it
// forwards.
//
// The Huffman coder (mode 2, chosen where it costs at most kHuffmanSlack more than
// rANS would): codes of at most kHuffBits bits, canonical, written least significant
// bit first; the plane's quarters are four streams, decoded side by side (each table
// lookup giving every whole code among the next kHuffBits bits).
#include "planes.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "blake3.h"
#include "parallel.h"
#include "planes_units.h"

namespace mmcore {
namespace {

constexpr uint32_t kProbBits = 12;
constexpr uint32_t kProbScale = 1u << kProbBits;
constexpr uint32_t kLow = 1u << 23;
constexpr int kStates = 4;
constexpr uint8_t kMagic[4] = {'M', 'M', 'P', 'L'};
constexpr uint8_t kVersion = 2;  // what the writer writes; version 1 (blocks of 2^16) is read
constexpr int kMinBlockLog2 = 16, kMaxBlockLog2 = 20;
constexpr uint64_t kHeader = 16;
constexpr uint8_t kRaw = 0;
constexpr uint8_t kRans = 1;
constexpr uint8_t kHuffman = 2;
constexpr uint8_t kHuffmanRange = 3;  // mode 2 with its code lengths as nibbles over a range
constexpr int kHuffBits = 11;         // longest code: a decode table of 2^11 entries
constexpr int kStreams = 4;
// A plane is Huffman-coded where that costs at most this much more than rANS would
// (about 0.05 bits a symbol on trained weights' exponents, decoded 3-4x faster).
constexpr double kHuffmanSlack = 0.03;

void put_u32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = uint8_t(v >> (8 * i));
}
uint32_t get_u32(const uint8_t* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= uint32_t(p[i]) << (8 * i);
  return v;
}

[[noreturn]] void damaged(const std::string& what) {
  throw std::invalid_argument("byte-plane stream: " + what);
}

// Frequencies summing to kProbScale, every present symbol at least 1.
void normalise(const uint32_t* counts, uint64_t total, uint32_t* freqs) {
  int64_t sum = 0;
  for (int s = 0; s < 256; ++s) {
    freqs[s] = 0;
    if (!counts[s]) continue;
    uint64_t f = (uint64_t(counts[s]) * kProbScale + total / 2) / total;
    freqs[s] = uint32_t(f ? f : 1);
    sum += freqs[s];
  }
  // Take from (or give to) the most frequent symbols first: their cost per unit of
  // frequency is the smallest.
  while (sum != int64_t(kProbScale)) {
    int best = -1;
    for (int s = 0; s < 256; ++s) {
      if (!freqs[s] || (sum > int64_t(kProbScale) && freqs[s] == 1)) continue;
      if (best < 0 || counts[s] > counts[best]) best = s;
    }
    if (best < 0) break;  // cannot happen: 256 symbols of 1 are below kProbScale
    int64_t step = sum > int64_t(kProbScale) ? -1 : 1;
    int64_t room = sum > int64_t(kProbScale) ? int64_t(freqs[best]) - 1 : int64_t(kProbScale) - sum;
    int64_t want = sum > int64_t(kProbScale) ? sum - int64_t(kProbScale) : room;
    int64_t move = std::min(room, std::max<int64_t>(want / 8, 1));
    freqs[best] = uint32_t(int64_t(freqs[best]) + step * move);
    sum += step * move;
  }
}

// Codes `n` symbols with rANS into out[0, cap); returns bytes written, or 0 when the
// coded plane would not fit (then it is stored raw).
uint64_t rans_encode(const uint8_t* in, uint64_t n, const uint32_t* counts, uint8_t* out,
                     uint64_t cap) {
  uint32_t freqs[256], cums[257];
  normalise(counts, n, freqs);
  int nsym = 0;
  cums[0] = 0;
  for (int s = 0; s < 256; ++s) {
    cums[s + 1] = cums[s] + freqs[s];
    nsym += freqs[s] != 0;
  }
  uint64_t table = 1 + 3 * uint64_t(nsym);
  if (cap < table + 4 + 4 * kStates) return 0;
  uint8_t* t = out;
  *t++ = uint8_t(nsym - 1);
  for (int s = 0; s < 256; ++s) {
    if (!freqs[s]) continue;
    *t++ = uint8_t(s);
    *t++ = uint8_t(freqs[s]);
    *t++ = uint8_t(freqs[s] >> 8);
  }
  // s / f as (s * rcp) >> 43: exact for s < 2^31 (states stay below kLow << 8 = 2^31)
  // and f <= 2^12, since the error s * (rcp - 2^43 / f) / 2^43 stays below 1 / f.
  uint64_t rcps[256];
  for (int s = 0; s < 256; ++s) rcps[s] = freqs[s] ? (uint64_t(1) << 43) / freqs[s] + 1 : 0;
  uint8_t* begin = t + 4;  // the payload's length goes before it
  uint8_t* end = out + cap;
  uint8_t* p = end;
  uint32_t x[kStates] = {kLow, kLow, kLow, kLow};
  auto put = [&](uint32_t& s, uint8_t sym) {  // unchecked: the caller leaves room
    uint32_t f = freqs[sym];
    uint32_t limit = ((kLow >> kProbBits) << 8) * f;
    if (s >= limit) {
      *--p = uint8_t(s);
      s >>= 8;
      if (s >= limit) {
        *--p = uint8_t(s);
        s >>= 8;
      }
    }
    uint32_t q = uint32_t((unsigned __int128)s * rcps[sym] >> 43);
    s = (q << kProbBits) + (s - q * f) + cums[sym];
  };
  uint64_t i = n;
  for (; i % kStates; --i) {  // the last symbols (decoded last), one by one
    if (p - begin < 2) return 0;
    put(x[(i - 1) % kStates], in[i - 1]);
  }
  for (; i; i -= kStates) {  // (each symbol puts out at most two bytes)
    if (p - begin < 2 * kStates) return 0;
    for (int k = kStates; k-- > 0;) put(x[k], in[i - kStates + k]);
  }
  if (p - begin < 4 * kStates) return 0;
  for (int k = kStates; k-- > 0;) {
    p -= 4;
    put_u32(p, x[k]);
  }
  uint64_t payload = uint64_t(end - p);
  if (payload > 0xFFFFFFFFu) return 0;
  std::memmove(begin, p, payload);
  put_u32(t, uint32_t(payload));
  return table + 4 + payload;
}

// Decodes a plane of `n` symbols from in[0, len) into out; returns bytes consumed.
uint64_t rans_decode(const uint8_t* in, uint64_t len, uint8_t* out, uint64_t n) {
  if (len < 1) damaged("a coded plane without its table");
  int nsym = int(in[0]) + 1;
  uint64_t table = 1 + 3 * uint64_t(nsym);
  if (len < table + 4) damaged("a coded plane shorter than its table");
  uint32_t freqs[256] = {0};  // (a symbol listed twice is refused)
  // Packed per slot: the symbol, its frequency (4096 as 0) and the slot's offset in its
  // range.
  uint32_t slots[kProbScale];
  uint32_t at = 0;
  for (int k = 0; k < nsym; ++k) {
    const uint8_t* e = in + 1 + 3 * k;
    uint32_t f = uint32_t(e[1]) | (uint32_t(e[2]) << 8);
    if (!f || freqs[e[0]] || at + f > kProbScale) damaged("a bad frequency table");
    freqs[e[0]] = f;
    for (uint32_t j = 0; j < f; ++j)
      slots[at + j] = uint32_t(e[0]) | ((f & 0xFFF) << 8) | (j << 20);
    at += f;
  }
  if (at != kProbScale) damaged("a frequency table that does not add up");
  uint64_t payload = get_u32(in + table);
  if (payload > len - table - 4 || payload < 4 * kStates) damaged("a coded plane's length");
  const uint8_t* p = in + table + 4;
  const uint8_t* end = p + payload;
  uint32_t x[kStates];
  for (int k = 0; k < kStates; ++k) x[k] = get_u32(p + 4 * k);
  p += 4 * kStates;
  for (int k = 0; k < kStates; ++k)
    if (x[k] < kLow || x[k] >= (kLow << 8)) damaged("a coded plane's state");
  auto step = [&](uint32_t& s, uint8_t* o) {
    uint32_t e = slots[s & (kProbScale - 1)];
    *o = uint8_t(e);
    s = ((e >> 8) & 0xFFF ? (e >> 8) & 0xFFF : kProbScale) * (s >> kProbBits) + (e >> 20);
  };
  auto refill = [&](uint32_t& s) {  // unchecked: the loop leaves room
    if (s < kLow) s = (s << 8) | *p++;
    if (s < kLow) s = (s << 8) | *p++;
  };

  uint64_t i = 0;
  // Each symbol takes at most two bytes: unchecked while enough are left.
  for (; i + kStates <= n && end - p >= 2 * kStates; i += kStates) {
    for (int k = 0; k < kStates; ++k) step(x[k], out + i + k);
    for (int k = 0; k < kStates; ++k) refill(x[k]);
  }
  for (; i < n; ++i) {
    uint32_t& s = x[i % kStates];
    step(s, out + i);
    while (s < kLow) {
      if (p == end) damaged("a coded plane ends early");
      s = (s << 8) | *p++;
    }
  }
  if (p != end) damaged("a coded plane is longer than its symbols");
  for (int k = 0; k < kStates; ++k)
    if (x[k] != kLow) damaged("a coded plane does not end where it began");
  return table + 4 + payload;
}

// Code lengths (0: absent) of the shortest code for `counts` whose codes are at most
// kHuffBits long, by package-merge: level d (kHuffBits, the deepest, up to 1) lists the
// symbols (as leaves, lightest first) merged by weight with the packages of level d + 1
// (its items paired in order); the 2n - 2 lightest items of level 1 are taken, and at
// each level below, the lightest items of twice as many as the packages taken above.
// The items taken at a level are a prefix of its list, and its leaves among them are
// the lightest symbols: a symbol's length is the number of levels that take its leaf.
// (Huffman's lengths cut to kHuffBits cost up to 0.2% more on a trained model's
// exponents.)
void huffman_lengths(const uint32_t* counts, uint8_t* len) {
  int sym[256], n = 0;
  for (int s = 0; s < 256; ++s) {
    len[s] = 0;
    if (counts[s]) sym[n++] = s;
  }
  if (n == 0) return;
  if (n == 1) {
    len[sym[0]] = 1;
    return;
  }
  std::stable_sort(sym, sym + n, [&](int a, int b) { return counts[a] < counts[b]; });
  // A level holds at most 2n - 1 items (n leaves and fewer than n packages).
  static thread_local uint64_t weight[kHuffBits + 1][512];
  static thread_local bool leaf[kHuffBits + 1][512];
  int size[kHuffBits + 1] = {0};
  for (int i = 0; i < n; ++i) weight[kHuffBits][i] = counts[sym[i]], leaf[kHuffBits][i] = true;
  size[kHuffBits] = n;
  for (int d = kHuffBits - 1; d >= 1; --d) {
    const uint64_t* below = weight[d + 1];
    const int packages = size[d + 1] / 2;
    int at = 0, next = 0, pkg = 0;
    while (next < n || pkg < packages) {
      const uint64_t pw = pkg < packages ? below[2 * pkg] + below[2 * pkg + 1] : 0;
      const bool take_leaf = pkg >= packages || (next < n && counts[sym[next]] <= pw);
      weight[d][at] = take_leaf ? counts[sym[next]] : pw;
      leaf[d][at++] = take_leaf;
      take_leaf ? ++next : ++pkg;
    }
    size[d] = at;
  }
  int take = 2 * n - 2;
  for (int d = 1; d <= kHuffBits && take; ++d) {
    int leaves = 0;
    for (int i = 0; i < take; ++i) leaves += leaf[d][i];
    for (int i = 0; i < leaves; ++i) ++len[sym[i]];
    take = 2 * (take - leaves);
  }
}

// Canonical codes for `len` (shorter codes first, then by symbol), bit-reversed so
// that a code is read least significant bit first. False where the lengths are not a
// prefix code (a damaged table).
bool huffman_codes(const uint8_t* len, uint16_t* code) {
  uint32_t next = 0;
  int prev = 0;
  for (int l = 1; l <= kHuffBits; ++l) {
    for (int s = 0; s < 256; ++s) {
      if (len[s] != l) continue;
      next <<= (l - prev);
      prev = l;
      if (next >= (1u << l)) return false;
      uint32_t r = 0;
      for (int b = 0; b < l; ++b) r |= ((next >> b) & 1u) << (l - 1 - b);
      code[s] = uint16_t(r);
      ++next;
    }
  }
  return true;
}

// The symbols a Huffman table covers: the first and one past the last.
void huffman_range(const uint8_t* len, int& lo, int& hi) {
  lo = 0, hi = 256;
  while (lo < 256 && !len[lo]) ++lo;
  while (hi > lo && !len[hi - 1]) --hi;
}

// Bytes the table of a Huffman plane takes: as (symbol, length) pairs (mode 2), or as
// 4-bit lengths of every symbol of its range (mode 3).
uint64_t huffman_table_size(const uint8_t* len, int nsym, bool range) {
  if (!range) return 1 + 2 * uint64_t(nsym);
  int lo, hi;
  huffman_range(len, lo, hi);
  return 2 + uint64_t(hi - lo + 1) / 2;
}

// Bytes a Huffman plane of these counts and lengths takes.
uint64_t huffman_size(const uint32_t* counts, const uint8_t* len, int nsym, bool range) {
  uint64_t bits = 0;
  for (int s = 0; s < 256; ++s) bits += uint64_t(counts[s]) * len[s];
  return huffman_table_size(len, nsym, range) + 4 * kStreams + (bits + 7) / 8 + kStreams;
}

// Codes the plane into out (room for huffman_size bytes); returns the bytes written.
// Symbols of stream k of a plane of n: [k * q, min(n, (k + 1) * q)), q = ceil(n / 4).
uint64_t stream_begin(uint64_t n, int k) { return std::min(n, uint64_t(k) * ((n + 3) / 4)); }

// Codes the plane into out (room for huffman_size bytes); returns the bytes written.
uint64_t huffman_encode(const uint8_t* in, uint64_t n, const uint8_t* len, int nsym, bool range,
                        uint8_t* out) {
  uint16_t code[256] = {0};
  huffman_codes(len, code);
  uint8_t* o = out;
  if (range) {  // first symbol, count - 1, then two lengths a byte (low nibble first)
    int lo, hi;
    huffman_range(len, lo, hi);
    *o++ = uint8_t(lo);
    *o++ = uint8_t(hi - lo - 1);
    for (int s = lo; s < hi; s += 2) *o++ = uint8_t(len[s] | (s + 1 < hi ? len[s + 1] << 4 : 0));
  } else {
    *o++ = uint8_t(nsym - 1);
    for (int s = 0; s < 256; ++s) {
      if (!len[s]) continue;
      *o++ = uint8_t(s);
      *o++ = len[s];
    }
  }
  uint8_t* lens = o;
  o += 4 * kStreams;
  for (int k = 0; k < kStreams; ++k) {
    uint8_t* start = o;
    uint64_t buf = 0;
    int cnt = 0;
    uint64_t i = stream_begin(n, k), stop = stream_begin(n, k + 1);
    // Four codes (at most 44 bits, 51 with the 7 left over) between flushes of the
    // whole bytes; a flush stores 8 bytes (the writer leaves room behind the plane).
    for (; i + 4 <= stop; i += 4) {
      for (int j = 0; j < 4; ++j) {
        buf |= uint64_t(code[in[i + j]]) << cnt;
        cnt += len[in[i + j]];
      }
      std::memcpy(o, &buf, 8);
      o += cnt >> 3;
      buf >>= cnt & ~7;
      cnt &= 7;
    }
    for (; i < stop; ++i) {
      buf |= uint64_t(code[in[i]]) << cnt;
      cnt += len[in[i]];
    }
    for (; cnt > 0; cnt -= 8, buf >>= 8) *o++ = uint8_t(buf);
    put_u32(lens + 4 * k, uint32_t(o - start));
  }
  return uint64_t(o - out);
}

uint64_t get_u64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);  // (little-endian hosts: the project's targets)
  return v;
}

// One entry of the decode table: the symbols (up to four) whose codes the next
// kHuffBits bits begin with, how many, and how many bits they take; count 0: a
// pattern no code begins (a damaged stream).
struct HuffEntry {
  uint32_t symbols;
  uint8_t count, bits;
};

// A stream's reader: bits least significant first, refilled 56 bits at a time from
// where its first bits not yet loaded are (`used` = bits consumed so far).
struct BitReader {
  const uint8_t* p;
  uint64_t bits = 0;
  int cnt = 0;
  void refill() {
    bits |= get_u64(p) << cnt;
    p += (63 - cnt) >> 3;
    cnt |= 56;
  }
};

// Decodes a Huffman plane of `n` symbols from in[0, len) into out; returns bytes
// consumed. A table lookup of kHuffBits bits gives every whole code they hold (up
// to four symbols), so a plane of short codes (a trained model's exponents, about 2.5
// bits) takes about one lookup per three symbols. Each stream is copied with 16 zero
// bytes of padding behind it: a refill reads 8 bytes from where its first bits not
// yet loaded are (up to 7 bytes past the stream's end on its last refills), and a
// stream that would read from further on, needing more bits than it holds, is
// refused.
constexpr uint32_t kHuffSize = 1u << kHuffBits, kHuffMask = kHuffSize - 1;

// A thread's decode tables, kept for the next plane: consecutive blocks' planes of one
// kind often have the same code lengths (the tables' only input), and building them
// costs about a fifth of a block's decode.
struct HuffTables {
  bool valid = false;
  uint8_t lens[256];
  uint16_t one[kHuffSize];  // one symbol per pattern: symbol | length << 8 (0: no code)
  std::vector<HuffEntry> tab = std::vector<HuffEntry>(kHuffSize);

  void build(const uint8_t* l, const uint16_t* code) {
    std::memcpy(lens, l, 256);
    std::fill(one, one + kHuffSize, uint16_t(0));
    for (int s = 0; s < 256; ++s) {
      if (!lens[s]) continue;
      for (uint32_t hi = 0; hi < (1u << (kHuffBits - lens[s])); ++hi)
        one[code[s] | (hi << lens[s])] = uint16_t(uint32_t(s) | (uint32_t(lens[s]) << 8));
    }
    for (uint32_t pat = 0; pat < kHuffSize; ++pat) {
      HuffEntry e{0, 0, 0};
      while (e.count < 4) {  // whole codes only: the bits past kHuffBits are not known
        uint16_t x = one[(pat >> e.bits) & kHuffMask];
        int len = x >> 8;
        if (!len || e.bits + len > kHuffBits) break;
        e.symbols |= uint32_t(x & 0xFF) << (8 * e.count);
        ++e.count;
        e.bits = uint8_t(e.bits + len);
      }
      tab[pat] = e;
    }
    valid = true;
  }
};

uint64_t huffman_decode(const uint8_t* in, uint64_t len, uint8_t* out, uint64_t n,
                        std::vector<uint8_t>& scratch, bool range, HuffTables& cache) {
  if (len < 2) damaged("a Huffman plane without its table");
  uint8_t lens[256] = {0};
  uint64_t table;
  if (range) {  // lengths as nibbles of symbols in[0] .. in[0] + in[1]
    int lo = in[0], count = int(in[1]) + 1;
    table = 2 + uint64_t(count + 1) / 2;
    if (lo + count > 256) damaged("a bad Huffman table");
    if (len < table + 4 * kStreams) damaged("a Huffman plane shorter than its table");
    int present = 0;
    for (int k = 0; k < count; ++k) {
      uint8_t l = uint8_t((in[2 + k / 2] >> (4 * (k & 1))) & 0xF);
      if (l > kHuffBits) damaged("a bad Huffman table");
      lens[lo + k] = l;
      present += l != 0;
    }
    if (!present || ((count & 1) && (in[table - 1] >> 4))) damaged("a bad Huffman table");
  } else {
    int nsym = int(in[0]) + 1;
    table = 1 + 2 * uint64_t(nsym);
    if (len < table + 4 * kStreams) damaged("a Huffman plane shorter than its table");
    for (int k = 0; k < nsym; ++k) {
      uint8_t sym = in[1 + 2 * k], l = in[2 + 2 * k];
      if (!l || l > kHuffBits || lens[sym]) damaged("a bad Huffman table");
      lens[sym] = l;
    }
  }
  if (!cache.valid || std::memcmp(cache.lens, lens, 256) != 0) {
    uint16_t code[256] = {0};
    if (!huffman_codes(lens, code)) damaged("Huffman code lengths that are no prefix code");
    cache.build(lens, code);
  }
  constexpr uint32_t kMask = kHuffMask;
  const uint16_t* one = cache.one;
  const HuffEntry* tab = cache.tab.data();
  uint64_t sizes[kStreams], total = table + 4 * kStreams;
  for (int k = 0; k < kStreams; ++k) {
    sizes[k] = get_u32(in + table + 4 * k);
    total += sizes[k];
    if (total > len) damaged("a Huffman stream runs past its plane");
  }
  constexpr uint64_t kPad = 16;
  scratch.resize(total + kPad * kStreams);
  const uint8_t* start[kStreams];
  BitReader r[kStreams];
  uint8_t* o[kStreams];
  uint8_t* end[kStreams];
  uint8_t* s = scratch.data();
  const uint8_t* src = in + table + 4 * kStreams;
  for (int k = 0; k < kStreams; ++k) {
    std::memcpy(s, src, sizes[k]);
    std::memset(s + sizes[k], 0, kPad);
    start[k] = r[k].p = s;
    src += sizes[k];
    s += sizes[k] + kPad;
    o[k] = out + stream_begin(n, k);
    end[k] = out + stream_begin(n, k + 1);
  }
  auto readable = [&](int k) { return r[k].p <= start[k] + sizes[k] + 8; };
  // Four lookups per stream per refill (at most 44 bits), each writing four bytes:
  // while every stream has room for 16 symbols before its end, no check per symbol.
  bool bad = false;
  for (;;) {
    bool room = true;
    for (int k = 0; k < kStreams; ++k) room &= end[k] - o[k] >= 16 && readable(k);
    if (!room) break;
    for (int k = 0; k < kStreams; ++k) r[k].refill();
    for (int j = 0; j < 4; ++j) {
      for (int k = 0; k < kStreams; ++k) {
        const HuffEntry& e = tab[r[k].bits & kMask];
        std::memcpy(o[k], &e.symbols, 4);
        o[k] += e.count;
        r[k].bits >>= e.bits;
        r[k].cnt -= e.bits;
        bad |= e.count == 0;
      }
    }
    if (bad) damaged("a Huffman stream holds a bit pattern of no code");
  }
  for (int k = 0; k < kStreams; ++k) {  // the rest of each stream, symbol by symbol
    while (o[k] < end[k]) {
      if (r[k].cnt < kHuffBits) {
        if (!readable(k)) damaged("a Huffman stream ends early");
        r[k].refill();
      }
      uint16_t x = one[r[k].bits & kMask];
      if (!x) damaged("a Huffman stream holds a bit pattern of no code");
      *o[k]++ = uint8_t(x);
      r[k].bits >>= (x >> 8);
      r[k].cnt -= (x >> 8);
    }
    int64_t used = 8 * int64_t(r[k].p - start[k]) - r[k].cnt;  // every stream used up
    if (used < 0 || uint64_t(used + 7) / 8 != sizes[k]) damaged("a Huffman stream's length");
  }
  return total;
}

template <typename U>
U rotate_in(U v) {
  constexpr int bits = 8 * sizeof(U);
  return U(U(v << 1) | U(v >> (bits - 1)));
}
template <typename U>
U rotate_out(U v) {
  constexpr int bits = 8 * sizeof(U);
  return U(U(v >> 1) | U(v << (bits - 1)));
}

template <typename U>
void split(const uint8_t* src, uint64_t m, uint8_t* planes) {
  constexpr int w = sizeof(U);
  for (uint64_t i = 0; i < m; ++i) {
    U v;
    std::memcpy(&v, src + i * w, w);
    v = rotate_in(v);
    for (int b = 0; b < w; ++b) planes[uint64_t(b) * m + i] = uint8_t(v >> (8 * b));
  }
}

template <typename U>
void join(const uint8_t* const* planes, uint64_t m, uint8_t* dst) {
  constexpr int w = sizeof(U);
  for (uint64_t i = 0; i < m; ++i) {
    U v = 0;
    for (int b = 0; b < w; ++b) v |= U(U(planes[b][i]) << (8 * b));
    v = rotate_out(v);
    std::memcpy(dst + i * w, &v, w);
  }
}

// The common widths written out, so that the compiler vectorises them.
void split4(const uint8_t* __restrict src, uint64_t m, uint8_t* __restrict planes) {
  uint8_t* __restrict p0 = planes;
  uint8_t* __restrict p1 = planes + m;
  uint8_t* __restrict p2 = planes + 2 * m;
  uint8_t* __restrict p3 = planes + 3 * m;
  for (uint64_t i = 0; i < m; ++i) {
    uint32_t v;
    std::memcpy(&v, src + 4 * i, 4);
    v = (v << 1) | (v >> 31);
    p0[i] = uint8_t(v), p1[i] = uint8_t(v >> 8), p2[i] = uint8_t(v >> 16), p3[i] = uint8_t(v >> 24);
  }
}

void join4(const uint8_t* __restrict p0, const uint8_t* __restrict p1, const uint8_t* __restrict p2,
           const uint8_t* __restrict p3, uint64_t m, uint8_t* __restrict dst) {
  for (uint64_t i = 0; i < m; ++i) {
    uint32_t v = uint32_t(p0[i]) | (uint32_t(p1[i]) << 8) | (uint32_t(p2[i]) << 16) |
                 (uint32_t(p3[i]) << 24);
    v = (v >> 1) | (v << 31);
    std::memcpy(dst + 4 * i, &v, 4);
  }
}

void split2(const uint8_t* __restrict src, uint64_t m, uint8_t* __restrict planes) {
  uint8_t* __restrict p0 = planes;
  uint8_t* __restrict p1 = planes + m;
  for (uint64_t i = 0; i < m; ++i) {
    uint16_t v;
    std::memcpy(&v, src + 2 * i, 2);
    v = uint16_t((v << 1) | (v >> 15));
    p0[i] = uint8_t(v), p1[i] = uint8_t(v >> 8);
  }
}

void join2(const uint8_t* __restrict p0, const uint8_t* __restrict p1, uint64_t m,
           uint8_t* __restrict dst) {
  for (uint64_t i = 0; i < m; ++i) {
    uint16_t v = uint16_t(p0[i] | (p1[i] << 8));
    v = uint16_t((v >> 1) | (v << 15));
    std::memcpy(dst + 2 * i, &v, 2);
  }
}

#if defined(__x86_64__)
// The joins with AVX2, 32 elements a step (the tail as above): each plane's 32 bytes
// interleaved by unpacking bytes, then 16-bit pairs (within each 128-bit lane, so the
// halves are put back in order by the stores' lane permutes), the sign rotated back.
__attribute__((target("avx2"))) void join4_avx2(const uint8_t* p0, const uint8_t* p1,
                                                const uint8_t* p2, const uint8_t* p3, uint64_t m,
                                                uint8_t* dst) {
  uint64_t i = 0;
  for (; i + 32 <= m; i += 32) {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p0 + i));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p1 + i));
    const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p2 + i));
    const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p3 + i));
    const __m256i ab_lo = _mm256_unpacklo_epi8(a, b), ab_hi = _mm256_unpackhi_epi8(a, b);
    const __m256i cd_lo = _mm256_unpacklo_epi8(c, d), cd_hi = _mm256_unpackhi_epi8(c, d);
    __m256i w[4] = {_mm256_unpacklo_epi16(ab_lo, cd_lo), _mm256_unpackhi_epi16(ab_lo, cd_lo),
                    _mm256_unpacklo_epi16(ab_hi, cd_hi), _mm256_unpackhi_epi16(ab_hi, cd_hi)};
    for (__m256i& x : w) x = _mm256_or_si256(_mm256_srli_epi32(x, 1), _mm256_slli_epi32(x, 31));
    __m256i* out = reinterpret_cast<__m256i*>(dst + 4 * i);
    _mm256_storeu_si256(out, _mm256_permute2x128_si256(w[0], w[1], 0x20));      // 0-7
    _mm256_storeu_si256(out + 1, _mm256_permute2x128_si256(w[2], w[3], 0x20));  // 8-15
    _mm256_storeu_si256(out + 2, _mm256_permute2x128_si256(w[0], w[1], 0x31));  // 16-23
    _mm256_storeu_si256(out + 3, _mm256_permute2x128_si256(w[2], w[3], 0x31));  // 24-31
  }
  join4(p0 + i, p1 + i, p2 + i, p3 + i, m - i, dst + 4 * i);
}

__attribute__((target("avx2"))) void join2_avx2(const uint8_t* p0, const uint8_t* p1, uint64_t m,
                                                uint8_t* dst) {
  uint64_t i = 0;
  for (; i + 32 <= m; i += 32) {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p0 + i));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p1 + i));
    __m256i w[2] = {_mm256_unpacklo_epi8(a, b), _mm256_unpackhi_epi8(a, b)};
    for (__m256i& x : w) x = _mm256_or_si256(_mm256_srli_epi16(x, 1), _mm256_slli_epi16(x, 15));
    __m256i* out = reinterpret_cast<__m256i*>(dst + 2 * i);
    _mm256_storeu_si256(out, _mm256_permute2x128_si256(w[0], w[1], 0x20));      // 0-15
    _mm256_storeu_si256(out + 1, _mm256_permute2x128_si256(w[0], w[1], 0x31));  // 16-31
  }
  join2(p0 + i, p1 + i, m - i, dst + 2 * i);
}

bool have_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2");
  return yes;
}
#endif

void split_any(int width, const uint8_t* src, uint64_t m, uint8_t* planes) {
  switch (width) {
    case 1: std::memcpy(planes, src, m); break;
    case 2: split2(src, m, planes); break;
    case 4: split4(src, m, planes); break;
    default: split<uint64_t>(src, m, planes); break;
  }
}

void join_any(int width, const uint8_t* const* planes, uint64_t m, uint8_t* dst) {
  switch (width) {
    case 1: std::memcpy(dst, planes[0], m); break;
    case 2:
#if defined(__x86_64__)
      if (have_avx2()) return join2_avx2(planes[0], planes[1], m, dst);
#endif
      join2(planes[0], planes[1], m, dst);
      break;
    case 4:
#if defined(__x86_64__)
      if (have_avx2()) return join4_avx2(planes[0], planes[1], planes[2], planes[3], m, dst);
#endif
      join4(planes[0], planes[1], planes[2], planes[3], m, dst);
      break;
    default: join<uint64_t>(planes, m, dst); break;
  }
}

// counts[v] = how many bytes of plane[0, m) are v (four tables: no store waits on the
// one before it).
void count_bytes(const uint8_t* plane, uint64_t m, uint32_t* counts) {
  uint32_t c[4][256] = {{0}};
  uint64_t i = 0;
  for (; i + 4 <= m; i += 4) {
    c[0][plane[i]]++;
    c[1][plane[i + 1]]++;
    c[2][plane[i + 2]]++;
    c[3][plane[i + 3]]++;
  }
  for (; i < m; ++i) c[0][plane[i]]++;
  for (int s = 0; s < 256; ++s) counts[s] = c[0][s] + c[1][s] + c[2][s] + c[3][s];
}

// Bits per byte of every 16th byte of the plane: a plane near 8 is stored raw
// without counting the rest (the low mantissa bytes of trained weights).
double entropy_of_sample(const uint8_t* plane, uint64_t m) {
  uint32_t counts[256] = {0};
  uint64_t n = 0;
  for (uint64_t i = 0; i < m; i += 16, ++n) counts[plane[i]]++;
  double bits = 0;
  for (int s = 0; s < 256; ++s)
    if (counts[s]) bits += double(counts[s]) * std::log2(double(n) / double(counts[s]));
  return bits / double(n);
}

// Worst case of one block: per plane its mode byte and raw bytes (and room for the
// Huffman writer's last 8-byte store).
uint64_t block_bound(uint64_t m, int width) { return uint64_t(width) * (1 + m) + 8; }

uint64_t encode_block(const uint8_t* src, uint64_t m, int width, uint8_t* out,
                      std::vector<uint8_t>& planes, std::vector<uint8_t>& scratch) {
  planes.resize(uint64_t(width) * m);
  split_any(width, src, m, planes.data());
  scratch.resize(m + 64 + 4 * 256);
  uint8_t* o = out;
  for (int b = 0; b < width; ++b) {
    const uint8_t* plane = planes.data() + uint64_t(b) * m;
    uint32_t counts[256] = {0};
    if (m >= 4096 && entropy_of_sample(plane, m) > 7.9) {  // near-uniform: raw, no count
      *o++ = kRaw;
      std::memcpy(o, plane, m);
      o += m;
      continue;
    }
    count_bytes(plane, m, counts);
    double bits = 0;
    int nsym = 0;
    for (int s = 0; s < 256; ++s) {
      if (!counts[s]) continue;
      ++nsym;
      bits += double(counts[s]) * std::log2(double(m) / double(counts[s]));
    }
    double estimate = bits / 8 + 3.0 * nsym + 5 + 4 * kStates;
    uint8_t lens[256];
    huffman_lengths(counts, lens);
    const bool range = huffman_table_size(lens, nsym, true) < huffman_table_size(lens, nsym, false);
    uint64_t huff = huffman_size(counts, lens, nsym, range);
    if (m && double(huff) <= (1 + kHuffmanSlack) * estimate && huff < m) {
      *o++ = range ? kHuffmanRange : kHuffman;
      o += huffman_encode(plane, m, lens, nsym, range, o);
      continue;
    }
    uint64_t coded = 0;
    if (m && estimate < 0.995 * double(m)) coded = rans_encode(plane, m, counts, scratch.data(), m);
    if (coded) {
      *o++ = kRans;
      std::memcpy(o, scratch.data(), coded);
      o += coded;
    } else {
      *o++ = kRaw;
      std::memcpy(o, plane, m);
      o += m;
    }
  }
  return uint64_t(o - out);
}

void check_width(int width) {
  if (width != 1 && width != 2 && width != 4 && width != 8)
    throw std::invalid_argument("byte planes: element width must be 1, 2, 4 or 8");
}

uint64_t blocks_of(uint64_t elems, uint64_t block) { return (elems + block - 1) / block; }

// A stream's header and block table, checked: its width and elements, and where each
// block starts (starts[k]) and ends (starts[k + 1]) in it.
int stream_blocks(const uint8_t* src, uint64_t src_len, uint64_t nbytes, uint64_t& elems,
                  uint64_t& block, std::vector<uint64_t>& starts) {
  if (src_len < kHeader || std::memcmp(src, kMagic, 4) != 0) damaged("no header");
  if (src[4] != 1 && src[4] != 2) damaged("version " + std::to_string(src[4]) + ", not 1 or 2");
  int log2 = src[4] == 1 ? (src[6] ? -1 : kMinBlockLog2) : src[6];
  if (log2 < kMinBlockLog2 || log2 > kMaxBlockLog2 || src[7]) damaged("a bad block size");
  block = uint64_t(1) << log2;
  int width = src[5];
  if (width != 1 && width != 2 && width != 4 && width != 8) damaged("a bad element width");
  uint64_t held = 0;
  for (int i = 0; i < 8; ++i) held |= uint64_t(src[8 + i]) << (8 * i);
  if (held != nbytes || nbytes % uint64_t(width)) damaged("it holds another number of bytes");
  elems = nbytes / uint64_t(width);
  uint64_t nblocks = blocks_of(elems, block);
  if ((src_len - kHeader) / 4 < nblocks) damaged("its block table is cut short");
  const uint8_t* lens = src + kHeader;
  starts.assign(nblocks + 1, 0);
  starts[0] = kHeader + 4 * nblocks;
  for (uint64_t k = 0; k < nblocks; ++k) {
    starts[k + 1] = starts[k] + get_u32(lens + 4 * k);
    if (starts[k + 1] > src_len) damaged("a block runs past its end");
  }
  if (starts[nblocks] != src_len) damaged("bytes past its last block");
  return width;
}

}  // namespace

uint64_t planes_bound(uint64_t nbytes, int width, int block_log2) {
  check_width(width);
  uint64_t elems = nbytes / uint64_t(width);
  uint64_t nblocks = blocks_of(elems, uint64_t(1) << block_log2);
  return kHeader + 4 * nblocks + nblocks * uint64_t(width) + nbytes;
}

uint64_t planes_encode(const uint8_t* src, uint64_t nbytes, int width, uint8_t* dst,
                       uint64_t dst_cap, int threads, int block_log2) {
  check_width(width);
  if (block_log2 < kMinBlockLog2 || block_log2 > kMaxBlockLog2)
    throw std::invalid_argument("byte planes: blocks of 2^16 to 2^20 elements");
  if (nbytes % uint64_t(width)) throw std::invalid_argument("byte planes: a partial element");
  if (dst_cap < planes_bound(nbytes, width, block_log2))
    throw std::invalid_argument("byte planes: the output is smaller than planes_bound");
  const uint64_t block = uint64_t(1) << block_log2;
  uint64_t elems = nbytes / uint64_t(width);
  uint64_t nblocks = blocks_of(elems, block);
  if (nblocks > 0xFFFFFFFFu) throw std::invalid_argument("byte planes: too many blocks");
  std::memcpy(dst, kMagic, 4);
  dst[4] = kVersion;
  dst[5] = uint8_t(width);
  dst[6] = uint8_t(block_log2);
  dst[7] = 0;
  for (int i = 0; i < 8; ++i) dst[8 + i] = uint8_t(nbytes >> (8 * i));
  uint8_t* lens = dst + kHeader;
  std::vector<std::vector<uint8_t>> coded(nblocks);
  parallel_ranges(nblocks, threads, 1, [&](size_t a, size_t b) {
    std::vector<uint8_t> planes, scratch;
    for (size_t k = a; k < b; ++k) {
      uint64_t m = std::min<uint64_t>(block, elems - k * block);
      coded[k].resize(block_bound(m, width));
      coded[k].resize(
          encode_block(src + k * block * width, m, width, coded[k].data(), planes, scratch));
    }
  });
  uint8_t* o = lens + 4 * nblocks;
  for (uint64_t k = 0; k < nblocks; ++k) {
    put_u32(lens + 4 * k, uint32_t(coded[k].size()));
    std::memcpy(o, coded[k].data(), coded[k].size());
    o += coded[k].size();
  }
  return uint64_t(o - dst);
}

uint64_t planes_blocks(const uint8_t* src, uint64_t src_len, uint64_t nbytes, int width,
                       uint64_t dev_src, uint64_t dst, uint64_t scratch, void* out, uint64_t cap) {
  uint64_t elems = 0, block = 0;
  std::vector<uint64_t> starts;
  if (stream_blocks(src, src_len, nbytes, elems, block, starts) != width)
    damaged("its element width is not its stream's");
  uint64_t nblocks = starts.size() - 1;
  if (nblocks > cap) throw std::invalid_argument("byte planes: more blocks than the table holds");
  auto* rows = static_cast<planes_units::Block*>(out);
  for (uint64_t k = 0; k < nblocks; ++k) {
    uint64_t first = k * block;
    planes_units::Block& b = rows[k];
    b.src = dev_src + starts[k];
    b.dst = dst + first * uint64_t(width);
    b.scratch = scratch + first * uint64_t(width);
    b.len = uint32_t(starts[k + 1] - starts[k]);
    b.m = uint32_t(std::min<uint64_t>(block, elems - first));
    b.width = uint32_t(width);
    b.pad = 0;
  }
  return nblocks;
}

void planes_emulate(const void* blocks, uint64_t n, uint64_t* planes, uint32_t* error) {
  namespace pu = planes_units;
  const auto* rows = static_cast<const pu::Block*>(blocks);
  auto sh = std::make_unique<pu::Shared>();
  auto report = [&](uint32_t code, uint64_t k) {
    if (!error[0]) {
      error[0] = code;
      error[1] = uint32_t(k);
    }
  };
  for (uint64_t k = 0; k < n; ++k) {  // the decode launch, lane by lane per phase
    const pu::Block& b = rows[k];
    uint32_t e = pu::parse(b, *sh);
    uint64_t* row = planes + k * pu::kMaxWidth;
    if (e != pu::kOk) {
      report(e, k);
      row[0] = 0;
      continue;
    }
    for (uint32_t lane = 0; lane < pu::kLanes; ++lane) pu::fill_tables(b, *sh, lane, pu::kLanes);
    for (uint32_t lane = 0; lane < pu::jobs(b, *sh); ++lane) {
      e = pu::decode_job(b, *sh, lane);
      if (e != pu::kOk) report(e, k);
    }
    pu::plane_addresses(b, *sh, row);
  }
  for (uint64_t k = 0; k < n; ++k) {  // the join launch
    const uint64_t* row = planes + k * pu::kMaxWidth;
    if (!row[0]) continue;
    for (uint32_t i = 0; i < rows[k].m; ++i) pu::join(rows[k], row, i);
  }
}

namespace {

// A thread's decoding state, kept from block to block (and from stream to stream):
// its plane buffers and its Huffman tables.
struct BlockDecoder {
  std::vector<uint8_t> decoded, scratch;
  HuffTables tables;

  // Decodes one block (`len` bytes at `in`, `m` elements of `width` bytes) into dst.
  void block(const uint8_t* in, uint64_t len, int width, uint64_t m, uint8_t* dst) {
    decoded.resize(uint64_t(width) * m);
    const uint8_t* planes[8];
    uint64_t at = 0;
    for (int p = 0; p < width; ++p) {
      if (at >= len) damaged("a block ends before its planes");
      uint8_t mode = in[at++];
      if (mode == kRaw) {
        if (len - at < m) damaged("a raw plane runs past its block");
        planes[p] = in + at;
        at += m;
      } else if (mode == kRans) {
        uint8_t* out = decoded.data() + uint64_t(p) * m;
        at += rans_decode(in + at, len - at, out, m);
        planes[p] = out;
      } else if (mode == kHuffman || mode == kHuffmanRange) {
        uint8_t* out = decoded.data() + uint64_t(p) * m;
        at += huffman_decode(in + at, len - at, out, m, scratch, mode == kHuffmanRange, tables);
        planes[p] = out;
      } else {
        damaged("a plane of unknown mode " + std::to_string(mode));
      }
    }
    if (at != len) damaged("a block holds more than its planes");
    join_any(width, planes, m, dst);
  }
};

}  // namespace

void planes_decode(const uint8_t* src, uint64_t src_len, uint8_t* dst, uint64_t nbytes,
                   int threads) {
  uint64_t elems = 0, block = 0;
  std::vector<uint64_t> starts;
  const int width = stream_blocks(src, src_len, nbytes, elems, block, starts);
  const uint64_t nblocks = starts.size() - 1;
  parallel_ranges(nblocks, threads, 1, [&](size_t a, size_t b) {
    auto decoder = std::make_unique<BlockDecoder>();
    for (size_t k = a; k < b; ++k) {
      uint64_t m = std::min<uint64_t>(block, elems - k * block);
      decoder->block(src + starts[k], starts[k + 1] - starts[k], width, m, dst + k * block * width);
    }
  });
}

namespace {

// Decodes one stream into its runs (see planes_decode_chunks).
void decode_into_runs(BlockDecoder& decoder, const uint8_t* src, uint64_t len, uint64_t nbytes,
                      const uint64_t* runs, uint64_t nruns, std::vector<uint64_t>& starts,
                      std::vector<uint8_t>& staging) {
  uint64_t total = 0;
  for (uint64_t r = 0; r < nruns; ++r) total += runs[2 * r + 1];
  if (total != nbytes) throw std::logic_error("runs that do not add up to their stream");
  auto at = [&](uint64_t r) { return reinterpret_cast<uint8_t*>(runs[2 * r]); };
  if (src == nullptr && len == 0) {  // zeros
    for (uint64_t r = 0; r < nruns; ++r) std::memset(at(r), 0, runs[2 * r + 1]);
    return;
  }
  uint64_t elems = 0, block = 0;
  const int width = stream_blocks(src, len, nbytes, elems, block, starts);
  uint64_t r = 0, from = 0;  // the run that holds the block's first byte, and where it starts
  for (size_t b = 0; b + 1 < starts.size(); ++b) {
    const uint64_t m = std::min<uint64_t>(block, elems - b * block);
    const uint64_t lo = b * block * uint64_t(width), hi = lo + m * uint64_t(width);
    while (from + runs[2 * r + 1] <= lo) from += runs[2 * r++ + 1];
    const uint8_t* in = src + starts[b];
    const uint64_t in_len = starts[b + 1] - starts[b];
    if (hi <= from + runs[2 * r + 1]) {  // inside one run
      decoder.block(in, in_len, width, m, at(r) + (lo - from));
      continue;
    }
    staging.resize(hi - lo);
    decoder.block(in, in_len, width, m, staging.data());
    for (uint64_t q = r, start = from, done = lo; done < hi; start += runs[2 * q++ + 1]) {
      const uint64_t end = std::min(hi, start + runs[2 * q + 1]);
      if (end <= done) continue;
      std::memcpy(at(q) + (done - start), staging.data() + (done - lo), end - done);
      done = end;
    }
  }
}

}  // namespace

ChunkDecodeQueue::ChunkDecodeQueue(const uint64_t* chunks, uint64_t n, const uint64_t* streams,
                                   const uint64_t* runs, const uint8_t* const* ptrs,
                                   const uint64_t* lens, uint8_t* hashes)
    : chunks_(chunks),
      n_(n),
      streams_(streams),
      runs_(runs),
      ptrs_(ptrs),
      lens_(lens),
      hashes_(hashes) {}

void ChunkDecodeQueue::work() noexcept {
  try {
    std::unique_ptr<BlockDecoder> decoder;
    std::vector<uint64_t> starts;
    std::vector<uint8_t> staging;
    for (uint64_t k; !failed_.load(std::memory_order_relaxed) && (k = next_++) < n_;) {
      if (!decoder) decoder = std::make_unique<BlockDecoder>();
      const uint64_t* chunk = chunks_ + 4 * k;
      for (uint64_t s = chunk[0]; s < chunk[0] + chunk[1]; ++s) {
        const uint64_t* row = streams_ + 5 * s;
        decode_into_runs(*decoder, reinterpret_cast<const uint8_t*>(row[0]), row[1], row[2],
                         runs_ + 2 * row[3], row[4], starts, staging);
      }
      blake3_segments_cpu(ptrs_ + chunk[2], lens_ + chunk[2], chunk[3], hashes_ + 32 * chunk[2], 1);
    }
  } catch (...) {
    std::lock_guard<std::mutex> lock(mu_);
    if (!error_) error_ = std::current_exception();
    failed_ = true;
  }
}

void ChunkDecodeQueue::rethrow() {
  std::lock_guard<std::mutex> lock(mu_);
  if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
}

void planes_decode_chunks(const uint64_t* chunks, uint64_t n, const uint64_t* streams,
                          const uint64_t* runs, const uint8_t* const* ptrs, const uint64_t* lens,
                          uint8_t* hashes, int threads) {
  ChunkDecodeQueue queue(chunks, n, streams, runs, ptrs, lens, hashes);
  const size_t workers = std::min<size_t>(size_t(resolve_threads(threads)), size_t(n));
  parallel_ranges(workers, int(workers), 1, [&](size_t, size_t) { queue.work(); });
  queue.rethrow();
}

}  // namespace mmcore
