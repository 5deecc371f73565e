#include "delta.h"

#include <cstring>
#include <type_traits>
#include <vector>

#include "blake3.h"
#include "delta_math.h"
#include "parallel.h"

namespace mmcore {
namespace {

// The unsigned integer of W bytes.
template <int W>
using Word = std::conditional_t<
    W == 1, uint8_t,
    std::conditional_t<W == 2, uint16_t, std::conditional_t<W == 4, uint32_t, uint64_t>>>;

// Same bytes as delta::xor_planes_encode_word, in blocks the compiler
// vectorises: XOR whole words into an L1-resident block, then peel one plane
// at a time with shift-and-narrow loops.
template <int W>
uint64_t encode_planes(const uint8_t* next, const uint8_t* parent, uint8_t* out, uint64_t m,
                       uint64_t begin, uint64_t end) {
  using T = Word<W>;
  constexpr uint64_t kBlock = 4096;
  T x[kBlock];
  uint64_t changed = 0;
  for (uint64_t start = begin; start < end; start += kBlock) {
    const uint64_t len = end - start < kBlock ? end - start : kBlock;
    const uint8_t* na = next + start * W;
    const uint8_t* pa = parent + start * W;
    for (uint64_t i = 0; i < len; ++i) {
      T u, v;
      std::memcpy(&u, na + i * W, W);
      std::memcpy(&v, pa + i * W, W);
      x[i] = T(u ^ v);
      changed += x[i] != 0;
    }
    for (int p = 0; p < W; ++p) {
      uint8_t* plane = out + uint64_t(p) * m + start;
      for (uint64_t i = 0; i < len; ++i) plane[i] = uint8_t(x[i] >> (8 * p));
    }
  }
  return changed;
}

template <int W>
void decode_planes(const uint8_t* enc, const uint8_t* parent, uint8_t* out, uint64_t m) {
  for (uint64_t i = 0; i < m; ++i) delta::xor_planes_decode_word<W>(enc, parent, out, i, m);
}

}  // namespace

// Work items: whole small segments, or word ranges of large ones, so one big
// tensor still spreads over every thread.
struct WordRange {
  size_t segment;
  uint64_t begin, end;
};

std::vector<WordRange> word_ranges(const uint64_t* nbytes, const uint32_t* widths, size_t n,
                                   int threads) {
  constexpr uint64_t kSplitBytes = 4u << 20;
  std::vector<WordRange> items;
  items.reserve(n);
  const uint64_t parts = uint64_t(resolve_threads(threads));
  for (size_t s = 0; s < n; ++s) {
    const uint64_t m = nbytes[s] / widths[s];
    const uint64_t k = nbytes[s] >= kSplitBytes ? parts : 1;
    for (uint64_t j = 0; j < k; ++j) items.push_back({s, m * j / k, m * (j + 1) / k});
  }
  return items;
}

void xor_planes_encode_cpu(const uint8_t* const* news, const uint8_t* const* parents,
                           const uint64_t* nbytes, const uint32_t* widths, uint8_t* const* outs,
                           uint64_t* changed, size_t n, int threads) {
  const std::vector<WordRange> items = word_ranges(nbytes, widths, n, threads);
  std::vector<uint64_t> counts(items.size());
  parallel_ranges(items.size(), threads, 1, [&](size_t begin, size_t end) {
    for (size_t k = begin; k < end; ++k) {
      const WordRange& r = items[k];
      const size_t s = r.segment;
      const uint64_t m = nbytes[s] / widths[s];
      switch (widths[s]) {
        case 1:
          counts[k] = encode_planes<1>(news[s], parents[s], outs[s], m, r.begin, r.end);
          break;
        case 2:
          counts[k] = encode_planes<2>(news[s], parents[s], outs[s], m, r.begin, r.end);
          break;
        case 4:
          counts[k] = encode_planes<4>(news[s], parents[s], outs[s], m, r.begin, r.end);
          break;
        default:
          counts[k] = encode_planes<8>(news[s], parents[s], outs[s], m, r.begin, r.end);
          break;
      }
    }
  });
  for (size_t s = 0; s < n; ++s) changed[s] = 0;
  for (size_t k = 0; k < items.size(); ++k) changed[items[k].segment] += counts[k];
}

namespace {

struct FusedXor {
  const uint8_t* const* news;
  const uint8_t* const* parents;
  const uint64_t* nbytes;
  const uint32_t* widths;
  uint8_t* const* outs;
  uint64_t* changed;
};

// Chunk boundaries are multiples of 1024 bytes, so of every word size: a chunk
// covers whole words [offset / W, (offset + len) / W).
void encode_chunk(void* ctx, size_t s, uint64_t offset, uint32_t len) {
  const FusedXor& f = *static_cast<const FusedXor*>(ctx);
  const uint32_t w = f.widths[s];
  const uint64_t m = f.nbytes[s] / w, begin = offset / w, end = (offset + len) / w;
  uint64_t count;
  switch (w) {
    case 1: count = encode_planes<1>(f.news[s], f.parents[s], f.outs[s], m, begin, end); break;
    case 2: count = encode_planes<2>(f.news[s], f.parents[s], f.outs[s], m, begin, end); break;
    case 4: count = encode_planes<4>(f.news[s], f.parents[s], f.outs[s], m, begin, end); break;
    default: count = encode_planes<8>(f.news[s], f.parents[s], f.outs[s], m, begin, end); break;
  }
  if (count) __atomic_fetch_add(&f.changed[s], count, __ATOMIC_RELAXED);
}

}  // namespace

void xor_planes_encode_hashed_cpu(const uint8_t* const* news, const uint8_t* const* parents,
                                  const uint64_t* nbytes, const uint32_t* widths,
                                  uint8_t* const* outs, uint64_t* changed, uint8_t* hashes,
                                  size_t n, int threads) {
  for (size_t s = 0; s < n; ++s) changed[s] = 0;
  FusedXor ctx{news, parents, nbytes, widths, outs, changed};
  const ChunkVisitor visitor{encode_chunk, &ctx};
  blake3_segments_cpu(news, nbytes, n, hashes, threads, &visitor);
}

void xor_planes_decode_cpu(const uint8_t* const* encs, const uint8_t* const* parents,
                           const uint64_t* nbytes, const uint32_t* widths, uint8_t* const* outs,
                           size_t n, int threads) {
  parallel_ranges(n, threads, 1, [&](size_t begin, size_t end) {
    for (size_t s = begin; s < end; ++s) {
      const uint64_t m = nbytes[s] / widths[s];
      switch (widths[s]) {
        case 1: decode_planes<1>(encs[s], parents[s], outs[s], m); break;
        case 2: decode_planes<2>(encs[s], parents[s], outs[s], m); break;
        case 4: decode_planes<4>(encs[s], parents[s], outs[s], m); break;
        default: decode_planes<8>(encs[s], parents[s], outs[s], m); break;
      }
    }
  });
}

namespace {

// The per-element loops are templated on the float kind, so the format
// conversions in delta_math.h fold to straight-line code for each dtype.
template <uint32_t K>
void plan_segment(const uint8_t* news, const uint8_t* parents, uint64_t numel, double tol,
                  int64_t* stats, double* max_delta) {
  constexpr int size = K == delta::kF64 ? 8 : K == delta::kF32 ? 4 : 2;
  const double step = 2.0 * tol;
  int64_t max_q = 0, escapes = 0, changed = 0;
  double max_d = 0.0;
  for (uint64_t i = 0; i < numel; ++i) {
    const uint64_t nb = delta::load_bits(news + i * size, K);
    const uint64_t pb = delta::load_bits(parents + i * size, K);
    changed += nb != pb;
    const double x = delta::to_double(nb, K), p = delta::to_double(pb, K);
    if (delta::is_finite(x) && delta::is_finite(p)) {
      const double d = std::fabs(x - p);
      if (d > max_d) max_d = d;
    }
    int32_t q;
    if (delta::quantize_one(nb, pb, K, step, tol, &q)) {
      const int64_t a = q < 0 ? -int64_t(q) : int64_t(q);
      if (a > max_q) max_q = a;
    } else {
      ++escapes;
    }
  }
  stats[0] = max_q;
  stats[1] = escapes;
  stats[2] = changed;
  stats[3] = 0;
  *max_delta = max_d;
}

template <uint32_t K>
void write_segment(const uint8_t* news, const uint8_t* parents, uint64_t numel, double tol,
                   uint32_t qwidth, uint8_t* q_out, uint8_t* esc_index, uint8_t* esc_bits) {
  constexpr int size = K == delta::kF64 ? 8 : K == delta::kF32 ? 4 : 2;
  const double step = 2.0 * tol;
  uint64_t e = 0;
  for (uint64_t i = 0; i < numel; ++i) {
    const uint64_t nb = delta::load_bits(news + i * size, K);
    const uint64_t pb = delta::load_bits(parents + i * size, K);
    int32_t q = 0;
    if (!delta::quantize_one(nb, pb, K, step, tol, &q)) {
      q = 0;
      std::memcpy(esc_index + 8 * e, &i, 8);
      delta::store_bits(esc_bits + size * e, nb, K);
      ++e;
    }
    delta::store_q(q_out, i, qwidth, q);
  }
}

template <uint32_t K>
void decode_segment(const uint8_t* parents, uint64_t numel, double tol, uint32_t qwidth,
                    const uint8_t* qs, uint64_t n_escapes, const uint8_t* esc_index,
                    const uint8_t* esc_bits, uint8_t* out) {
  constexpr int size = K == delta::kF64 ? 8 : K == delta::kF32 ? 4 : 2;
  const double step = 2.0 * tol;
  for (uint64_t i = 0; i < numel; ++i) {
    const uint64_t pb = delta::load_bits(parents + i * size, K);
    delta::store_bits(out + i * size,
                      delta::dequantize_one(pb, delta::load_q(qs, i, qwidth), K, step), K);
  }
  for (uint64_t e = 0; e < n_escapes; ++e) {
    uint64_t i;
    std::memcpy(&i, esc_index + 8 * e, 8);
    if (i < numel) std::memcpy(out + i * size, esc_bits + size * e, size);
  }
}

// Calls fn<K>() for the segment's float kind.
template <typename Fn>
void with_kind(uint32_t kind, Fn&& fn) {
  switch (kind) {
    case delta::kF16: fn(std::integral_constant<uint32_t, delta::kF16>{}); break;
    case delta::kBF16: fn(std::integral_constant<uint32_t, delta::kBF16>{}); break;
    case delta::kF32: fn(std::integral_constant<uint32_t, delta::kF32>{}); break;
    default: fn(std::integral_constant<uint32_t, delta::kF64>{}); break;
  }
}

}  // namespace

void quantize_plan_cpu(const uint8_t* const* news, const uint8_t* const* parents,
                       const uint64_t* numels, const uint32_t* kinds, const double* tols, size_t n,
                       int64_t* stats, double* max_delta, int threads) {
  parallel_ranges(n, threads, 1, [&](size_t begin, size_t end) {
    for (size_t s = begin; s < end; ++s)
      with_kind(kinds[s], [&](auto k) {
        plan_segment<decltype(k)::value>(news[s], parents[s], numels[s], tols[s], stats + 4 * s,
                                         max_delta + s);
      });
  });
}

void quantize_write_cpu(const uint8_t* const* news, const uint8_t* const* parents,
                        const uint64_t* numels, const uint32_t* kinds, const double* tols,
                        const uint32_t* qwidths, uint8_t* const* q_outs, uint8_t* const* esc_index,
                        uint8_t* const* esc_bits, size_t n, int threads) {
  parallel_ranges(n, threads, 1, [&](size_t begin, size_t end) {
    for (size_t s = begin; s < end; ++s)
      with_kind(kinds[s], [&](auto k) {
        write_segment<decltype(k)::value>(news[s], parents[s], numels[s], tols[s], qwidths[s],
                                          q_outs[s], esc_index[s], esc_bits[s]);
      });
  });
}

void quantize_decode_cpu(const uint8_t* const* parents, const uint64_t* numels,
                         const uint32_t* kinds, const double* tols, const uint32_t* qwidths,
                         const uint8_t* const* qs, const uint64_t* n_escapes,
                         const uint8_t* const* esc_index, const uint8_t* const* esc_bits,
                         uint8_t* const* outs, size_t n, int threads) {
  parallel_ranges(n, threads, 1, [&](size_t begin, size_t end) {
    for (size_t s = begin; s < end; ++s)
      with_kind(kinds[s], [&](auto k) {
        decode_segment<decltype(k)::value>(parents[s], numels[s], tols[s], qwidths[s], qs[s],
                                           n_escapes[s], esc_index[s], esc_bits[s], outs[s]);
      });
  });
}

}  // namespace mmcore
