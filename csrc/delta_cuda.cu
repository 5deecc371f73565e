// Delta encodings on the GPU: the per-element math of delta_math.h, one thread
// per word or element, blocks mapped to segments through block_base.
#include "cuda_common.cuh"
#include "cuda_kernels.h"
#include "delta_math.h"

namespace mmcore::cuda {
namespace {

struct Item {
  size_t segment;
  uint64_t index;  // word or element index inside the segment
};

__device__ __forceinline__ Item locate(const uint64_t* block_base, size_t n) {
  const size_t s = find_segment(block_base, n, blockIdx.x);
  return Item{s, (uint64_t(blockIdx.x) - block_base[s]) * kThreads + threadIdx.x};
}

__global__ void xor_encode_kernel(const uint8_t* const* news, const uint8_t* const* parents,
                                  const uint64_t* words, const uint32_t* widths,
                                  uint8_t* const* outs, unsigned long long* changed,
                                  const uint64_t* block_base, size_t n) {
  const Item it = locate(block_base, n);
  const size_t s = it.segment;
  const uint64_t m = words[s];
  int differs = 0;
  if (it.index < m) {
    const uint32_t w = widths[s];
    const uint8_t* a = news[s] + it.index * w;
    const uint8_t* b = parents[s] + it.index * w;
    for (uint32_t p = 0; p < w; ++p) {
      const uint8_t x = a[p] ^ b[p];
      outs[s][uint64_t(p) * m + it.index] = x;
      differs |= x;
    }
  }
  const int count = __syncthreads_count(differs != 0);
  if (threadIdx.x == 0 && count) atomicAdd(changed + s, (unsigned long long)count);
}

__global__ void xor_decode_kernel(const uint8_t* const* encs, const uint8_t* const* parents,
                                  const uint64_t* words, const uint32_t* widths,
                                  uint8_t* const* outs, const uint64_t* block_base, size_t n) {
  const Item it = locate(block_base, n);
  const size_t s = it.segment;
  const uint64_t m = words[s];
  if (it.index >= m) return;
  const uint32_t w = widths[s];
  for (uint32_t p = 0; p < w; ++p)
    outs[s][it.index * w + p] = encs[s][uint64_t(p) * m + it.index] ^ parents[s][it.index * w + p];
}

__global__ void quantize_plan_kernel(const uint8_t* const* news, const uint8_t* const* parents,
                                     const uint64_t* numels, const uint32_t* kinds,
                                     const double* tols, unsigned long long* stats,
                                     unsigned long long* max_delta_bits, const uint64_t* block_base,
                                     size_t n) {
  __shared__ unsigned long long block_max_q, block_max_d;
  if (threadIdx.x == 0) block_max_q = block_max_d = 0;
  __syncthreads();
  const Item it = locate(block_base, n);
  const size_t s = it.segment;
  int escaped = 0, changed = 0;
  if (it.index < numels[s]) {
    const uint32_t kind = kinds[s];
    const int size = delta::kind_size(kind);
    const uint64_t nb = delta::load_bits(news[s] + it.index * size, kind);
    const uint64_t pb = delta::load_bits(parents[s] + it.index * size, kind);
    changed = nb != pb;
    const double x = delta::to_double(nb, kind), p = delta::to_double(pb, kind);
    if (delta::is_finite(x) && delta::is_finite(p))
      atomicMax(&block_max_d, (unsigned long long)delta::double_bits(fabs(x - p)));
    int32_t q;
    if (delta::quantize_one(nb, pb, kind, 2.0 * tols[s], tols[s], &q)) {
      atomicMax(&block_max_q, (unsigned long long)(q < 0 ? -int64_t(q) : int64_t(q)));
    } else {
      escaped = 1;
    }
  }
  const int escapes = __syncthreads_count(escaped);
  const int changes = __syncthreads_count(changed);
  if (threadIdx.x == 0) {
    if (block_max_q) atomicMax(stats + 4 * s, block_max_q);
    if (escapes) atomicAdd(stats + 4 * s + 1, (unsigned long long)escapes);
    if (changes) atomicAdd(stats + 4 * s + 2, (unsigned long long)changes);
    if (block_max_d) atomicMax(max_delta_bits + s, block_max_d);
  }
}

__global__ void quantize_write_kernel(const uint8_t* const* news, const uint8_t* const* parents,
                                      const uint64_t* numels, const uint32_t* kinds,
                                      const double* tols, const uint32_t* qwidths,
                                      uint8_t* const* q_outs, uint8_t* flags,
                                      const uint64_t* elem_base, const uint64_t* block_base,
                                      size_t n) {
  const Item it = locate(block_base, n);
  const size_t s = it.segment;
  if (it.index >= numels[s]) return;
  const uint32_t kind = kinds[s];
  const int size = delta::kind_size(kind);
  const uint64_t nb = delta::load_bits(news[s] + it.index * size, kind);
  const uint64_t pb = delta::load_bits(parents[s] + it.index * size, kind);
  int32_t q = 0;
  const bool ok = delta::quantize_one(nb, pb, kind, 2.0 * tols[s], tols[s], &q);
  delta::store_q(q_outs[s], it.index, qwidths[s], ok ? q : 0);
  flags[elem_base[s] + it.index] = ok ? 0 : 1;
}

__global__ void quantize_decode_kernel(const uint8_t* const* parents, const uint64_t* numels,
                                       const uint32_t* kinds, const double* tols,
                                       const uint32_t* qwidths, const uint8_t* const* qs,
                                       uint8_t* const* outs, const uint64_t* block_base, size_t n) {
  const Item it = locate(block_base, n);
  const size_t s = it.segment;
  if (it.index >= numels[s]) return;
  const uint32_t kind = kinds[s];
  const int size = delta::kind_size(kind);
  const uint64_t pb = delta::load_bits(parents[s] + it.index * size, kind);
  const int32_t q = delta::load_q(qs[s], it.index, qwidths[s]);
  delta::store_bits(outs[s] + it.index * size, delta::dequantize_one(pb, q, kind, 2.0 * tols[s]),
                    kind);
}

}  // namespace

void xor_planes_encode(const uint8_t* const* news, const uint8_t* const* parents,
                       const uint64_t* words, const uint32_t* widths, uint8_t* const* outs,
                       unsigned long long* changed, const uint64_t* block_base, size_t n,
                       uint64_t total_blocks, Stream stream) {
  if (total_blocks == 0) return;
  xor_encode_kernel<<<unsigned(total_blocks), kThreads, 0, as_stream(stream)>>>(
      news, parents, words, widths, outs, changed, block_base, n);
}

void xor_planes_decode(const uint8_t* const* encs, const uint8_t* const* parents,
                       const uint64_t* words, const uint32_t* widths, uint8_t* const* outs,
                       const uint64_t* block_base, size_t n, uint64_t total_blocks, Stream stream) {
  if (total_blocks == 0) return;
  xor_decode_kernel<<<unsigned(total_blocks), kThreads, 0, as_stream(stream)>>>(
      encs, parents, words, widths, outs, block_base, n);
}

void quantize_plan(const uint8_t* const* news, const uint8_t* const* parents,
                   const uint64_t* numels, const uint32_t* kinds, const double* tols,
                   unsigned long long* stats, unsigned long long* max_delta_bits,
                   const uint64_t* block_base, size_t n, uint64_t total_blocks, Stream stream) {
  if (total_blocks == 0) return;
  quantize_plan_kernel<<<unsigned(total_blocks), kThreads, 0, as_stream(stream)>>>(
      news, parents, numels, kinds, tols, stats, max_delta_bits, block_base, n);
}

void quantize_write(const uint8_t* const* news, const uint8_t* const* parents,
                    const uint64_t* numels, const uint32_t* kinds, const double* tols,
                    const uint32_t* qwidths, uint8_t* const* q_outs, uint8_t* flags,
                    const uint64_t* elem_base, const uint64_t* block_base, size_t n,
                    uint64_t total_blocks, Stream stream) {
  if (total_blocks == 0) return;
  quantize_write_kernel<<<unsigned(total_blocks), kThreads, 0, as_stream(stream)>>>(
      news, parents, numels, kinds, tols, qwidths, q_outs, flags, elem_base, block_base, n);
}

void quantize_decode(const uint8_t* const* parents, const uint64_t* numels, const uint32_t* kinds,
                     const double* tols, const uint32_t* qwidths, const uint8_t* const* qs,
                     uint8_t* const* outs, const uint64_t* block_base, size_t n,
                     uint64_t total_blocks, Stream stream) {
  if (total_blocks == 0) return;
  quantize_decode_kernel<<<unsigned(total_blocks), kThreads, 0, as_stream(stream)>>>(
      parents, numels, kinds, tols, qwidths, qs, outs, block_base, n);
}

}  // namespace mmcore::cuda
