// The elementwise kernels on the GPU: delta encodings and copies, one thread
// per unit of delta_units.h (the code the CPU emulation runs), tiles of one
// segment per CTA, the grid striding over the tiles. Per-segment results are
// summed in registers while a CTA stays on one segment, then reduced per warp
// with one atomic each.
#include "cuda_common.cuh"
#include "cuda_kernels.h"
#include "delta_units.h"

namespace mmcore::cuda {
namespace {

namespace units = delta::units;

__device__ __forceinline__ unsigned long long warp_sum(unsigned long long v) {
  for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ unsigned long long warp_max(unsigned long long v) {
  for (int o = 16; o; o >>= 1) {
    const unsigned long long w = __shfl_xor_sync(0xffffffffu, v, o);
    v = w > v ? w : v;
  }
  return v;
}

__device__ __forceinline__ bool lane0() { return (threadIdx.x & 31) == 0; }

// body(s, u) for this thread's unit u of every tile of the grid's stride; flush(s)
// once the CTA leaves segment s (every thread of the CTA calls it together).
template <class Body, class Flush>
__device__ __forceinline__ void for_tiles(const Tiles& tiles, Body body, Flush flush) {
  uint32_t current = UINT32_MAX;
  for (uint64_t tile = blockIdx.x; tile < tiles.total; tile += gridDim.x) {
    const uint32_t s = tiles.segment[tile];
    if (s != current) {
      if (current != UINT32_MAX) flush(current);
      current = s;
    }
    body(s, (tile - tiles.base[s]) * units::kTileThreads + threadIdx.x);
  }
  if (current != UINT32_MAX) flush(current);
}

template <class Body>
__device__ __forceinline__ void for_tiles(const Tiles& tiles, Body body) {
  for_tiles(tiles, body, [](uint32_t) {});
}

__global__ void xor_encode_kernel(const uint8_t* const* news, const uint8_t* const* parents,
                                  const uint64_t* words, const uint32_t* widths,
                                  uint8_t* const* outs, unsigned long long* changed, Tiles tiles) {
  unsigned long long acc = 0;
  for_tiles(
      tiles,
      [&](uint32_t s, uint64_t u) {
        acc += units::xor_encode_thread(news, parents, words, widths, outs, s, u);
      },
      [&](uint32_t s) {
        const unsigned long long total = warp_sum(acc);
        if (lane0() && total) atomicAdd(changed + s, total);
        acc = 0;
      });
}

__global__ void xor_decode_kernel(const uint8_t* const* encs, const uint8_t* const* parents,
                                  const uint64_t* words, const uint32_t* widths,
                                  uint8_t* const* outs, Tiles tiles) {
  for_tiles(tiles, [&](uint32_t s, uint64_t u) {
    units::xor_decode_thread(encs, parents, words, widths, outs, s, u);
  });
}

__global__ void quantize_plan_kernel(const uint8_t* const* news, const uint8_t* const* parents,
                                     const uint64_t* numels, const uint32_t* kinds,
                                     const double* tols, unsigned long long* stats,
                                     unsigned long long* max_delta_bits, Tiles tiles) {
  units::QuantStats acc{0, 0, 0, 0};
  for_tiles(
      tiles,
      [&](uint32_t s, uint64_t u) {
        const units::QuantStats st =
            units::quantize_plan_thread(news, parents, numels, kinds, tols, s, u);
        acc.max_q = st.max_q > acc.max_q ? st.max_q : acc.max_q;
        acc.max_delta_bits =
            st.max_delta_bits > acc.max_delta_bits ? st.max_delta_bits : acc.max_delta_bits;
        acc.escapes += st.escapes;
        acc.changed += st.changed;
      },
      [&](uint32_t s) {
        const unsigned long long max_q = warp_max(acc.max_q);
        const unsigned long long escapes = warp_sum(acc.escapes);
        const unsigned long long changed = warp_sum(acc.changed);
        const unsigned long long max_d = warp_max(acc.max_delta_bits);
        if (lane0()) {
          if (max_q) atomicMax(stats + 4 * s, max_q);
          if (escapes) atomicAdd(stats + 4 * s + 1, escapes);
          if (changed) atomicAdd(stats + 4 * s + 2, changed);
          if (max_d) atomicMax(max_delta_bits + s, max_d);
        }
        acc = units::QuantStats{0, 0, 0, 0};
      });
}

__global__ void quantize_write_kernel(const uint8_t* const* news, const uint8_t* const* parents,
                                      const uint64_t* numels, const uint32_t* kinds,
                                      const double* tols, const uint32_t* qwidths,
                                      uint8_t* const* q_outs, uint8_t* flags,
                                      const uint64_t* flag_base, Tiles tiles) {
  for_tiles(tiles, [&](uint32_t s, uint64_t u) {
    units::quantize_write_thread(news, parents, numels, kinds, tols, qwidths, q_outs, flags,
                                 flag_base, s, u);
  });
}

__global__ void quantize_decode_kernel(const uint8_t* const* parents, const uint64_t* numels,
                                       const uint32_t* kinds, const double* tols,
                                       const uint32_t* qwidths, const uint8_t* const* qs,
                                       uint8_t* const* outs, Tiles tiles) {
  for_tiles(tiles, [&](uint32_t s, uint64_t u) {
    units::quantize_decode_thread(parents, numels, kinds, tols, qwidths, qs, outs, s, u);
  });
}

__global__ void gather_kernel(uint8_t* dst, const uint8_t* const* srcs, const uint64_t* lens,
                              const uint64_t* dst_offsets, Tiles tiles) {
  for (uint64_t tile = blockIdx.x; tile < tiles.total; tile += gridDim.x) {
    const uint32_t s = tiles.segment[tile];
    units::copy_tile(dst + dst_offsets[s], srcs[s], lens[s], tile - tiles.base[s], threadIdx.x);
  }
}

__global__ void scatter_kernel(const uint8_t* src, uint8_t* const* dsts, const uint64_t* lens,
                               const uint64_t* src_offsets, Tiles tiles) {
  for (uint64_t tile = blockIdx.x; tile < tiles.total; tile += gridDim.x) {
    const uint32_t s = tiles.segment[tile];
    units::copy_tile(dsts[s], src + src_offsets[s], lens[s], tile - tiles.base[s], threadIdx.x);
  }
}

// CTAs to launch: as many as fit on every SM at once (by the kernel's registers),
// no more than there are tiles; the grid strides over the rest.
template <class Kernel>
unsigned grid(const Tiles& tiles, Kernel kernel) {
  int per_sm = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, units::kTileThreads, 0) !=
          cudaSuccess ||
      per_sm <= 0) {
    cudaGetLastError();  // not a launch's error: leave none behind for check_launch
    per_sm = 2;
  }
  const uint64_t limit = uint64_t(sm_count()) * unsigned(per_sm);
  return unsigned(tiles.total < limit ? tiles.total : limit);
}

}  // namespace

void xor_planes_encode(const uint8_t* const* news, const uint8_t* const* parents,
                       const uint64_t* words, const uint32_t* widths, uint8_t* const* outs,
                       unsigned long long* changed, Tiles tiles, Stream stream) {
  if (tiles.total == 0) return;
  xor_encode_kernel<<<grid(tiles, xor_encode_kernel), units::kTileThreads, 0, as_stream(stream)>>>(
      news, parents, words, widths, outs, changed, tiles);
}

void xor_planes_decode(const uint8_t* const* encs, const uint8_t* const* parents,
                       const uint64_t* words, const uint32_t* widths, uint8_t* const* outs,
                       Tiles tiles, Stream stream) {
  if (tiles.total == 0) return;
  xor_decode_kernel<<<grid(tiles, xor_decode_kernel), units::kTileThreads, 0, as_stream(stream)>>>(
      encs, parents, words, widths, outs, tiles);
}

void quantize_plan(const uint8_t* const* news, const uint8_t* const* parents,
                   const uint64_t* numels, const uint32_t* kinds, const double* tols,
                   unsigned long long* stats, unsigned long long* max_delta_bits, Tiles tiles,
                   Stream stream) {
  if (tiles.total == 0) return;
  quantize_plan_kernel<<<grid(tiles, quantize_plan_kernel), units::kTileThreads, 0,
                         as_stream(stream)>>>(news, parents, numels, kinds, tols, stats,
                                              max_delta_bits, tiles);
}

void quantize_write(const uint8_t* const* news, const uint8_t* const* parents,
                    const uint64_t* numels, const uint32_t* kinds, const double* tols,
                    const uint32_t* qwidths, uint8_t* const* q_outs, uint8_t* flags,
                    const uint64_t* flag_base, Tiles tiles, Stream stream) {
  if (tiles.total == 0) return;
  quantize_write_kernel<<<grid(tiles, quantize_write_kernel), units::kTileThreads, 0,
                          as_stream(stream)>>>(news, parents, numels, kinds, tols, qwidths, q_outs,
                                               flags, flag_base, tiles);
}

void quantize_decode(const uint8_t* const* parents, const uint64_t* numels, const uint32_t* kinds,
                     const double* tols, const uint32_t* qwidths, const uint8_t* const* qs,
                     uint8_t* const* outs, Tiles tiles, Stream stream) {
  if (tiles.total == 0) return;
  quantize_decode_kernel<<<grid(tiles, quantize_decode_kernel), units::kTileThreads, 0,
                           as_stream(stream)>>>(parents, numels, kinds, tols, qwidths, qs, outs,
                                                tiles);
}

void gather(uint8_t* dst, const uint8_t* const* srcs, const uint64_t* lens,
            const uint64_t* dst_offsets, Tiles tiles, Stream stream) {
  if (tiles.total == 0) return;
  gather_kernel<<<grid(tiles, gather_kernel), units::kTileThreads, 0, as_stream(stream)>>>(
      dst, srcs, lens, dst_offsets, tiles);
}

void scatter(const uint8_t* src, uint8_t* const* dsts, const uint64_t* lens,
             const uint64_t* src_offsets, Tiles tiles, Stream stream) {
  if (tiles.total == 0) return;
  scatter_kernel<<<grid(tiles, scatter_kernel), units::kTileThreads, 0, as_stream(stream)>>>(
      src, dsts, lens, src_offsets, tiles);
}

}  // namespace mmcore::cuda
