// Many device tensors to one contiguous device buffer and back, in one launch:
// each block copies up to kCopyBytes of one segment.
#include "cuda_common.cuh"
#include "cuda_kernels.h"

namespace mmcore::cuda {
namespace {

__device__ __forceinline__ void copy_piece(uint8_t* dst, const uint8_t* src, uint64_t len) {
  const bool aligned =
      ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) & 15) == 0;
  if (aligned) {
    const uint64_t vecs = len / 16;
    for (uint64_t i = threadIdx.x; i < vecs; i += blockDim.x)
      reinterpret_cast<uint4*>(dst)[i] = reinterpret_cast<const uint4*>(src)[i];
    for (uint64_t i = vecs * 16 + threadIdx.x; i < len; i += blockDim.x) dst[i] = src[i];
  } else {
    for (uint64_t i = threadIdx.x; i < len; i += blockDim.x) dst[i] = src[i];
  }
}

__global__ void gather_kernel(uint8_t* dst, const uint8_t* const* srcs, const uint64_t* lens,
                              const uint64_t* dst_offsets, const uint64_t* block_base, size_t n) {
  const size_t s = find_segment(block_base, n, blockIdx.x);
  const uint64_t start = (uint64_t(blockIdx.x) - block_base[s]) * kCopyBytes;
  if (start >= lens[s]) return;
  const uint64_t len = lens[s] - start < kCopyBytes ? lens[s] - start : kCopyBytes;
  copy_piece(dst + dst_offsets[s] + start, srcs[s] + start, len);
}

__global__ void scatter_kernel(const uint8_t* src, uint8_t* const* dsts, const uint64_t* lens,
                               const uint64_t* src_offsets, const uint64_t* block_base, size_t n) {
  const size_t s = find_segment(block_base, n, blockIdx.x);
  const uint64_t start = (uint64_t(blockIdx.x) - block_base[s]) * kCopyBytes;
  if (start >= lens[s]) return;
  const uint64_t len = lens[s] - start < kCopyBytes ? lens[s] - start : kCopyBytes;
  copy_piece(dsts[s] + start, src + src_offsets[s] + start, len);
}

}  // namespace

void gather(uint8_t* dst, const uint8_t* const* srcs, const uint64_t* lens,
            const uint64_t* dst_offsets, const uint64_t* block_base, size_t n,
            uint64_t total_blocks, Stream stream) {
  if (total_blocks == 0) return;
  gather_kernel<<<unsigned(total_blocks), kThreads, 0, as_stream(stream)>>>(
      dst, srcs, lens, dst_offsets, block_base, n);
}

void scatter(const uint8_t* src, uint8_t* const* dsts, const uint64_t* lens,
             const uint64_t* src_offsets, const uint64_t* block_base, size_t n,
             uint64_t total_blocks, Stream stream) {
  if (total_blocks == 0) return;
  scatter_kernel<<<unsigned(total_blocks), kThreads, 0, as_stream(stream)>>>(
      src, dsts, lens, src_offsets, block_base, n);
}

}  // namespace mmcore::cuda
