// BLAKE3 over a segment table on the GPU: one thread per chunk, then one
// launch per tree level. The compression function is blake3_math.h's, the same
// code the CPU path runs.
#include "blake3_math.h"
#include "cuda_common.cuh"
#include "cuda_kernels.h"

namespace mmcore::cuda {
namespace {

__global__ void chunk_kernel(const uint8_t* const* ptrs, const uint64_t* lens, const uint64_t* base,
                             size_t n, uint64_t total, uint32_t* cvs) {
  const uint64_t c = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= total) return;
  const size_t s = find_segment(base, n, c);
  const uint64_t index = c - base[s];
  const uint64_t offset = index * blake3::kChunkLen;
  const uint64_t len = lens[s];
  const uint32_t chunk_len =
      uint32_t(len - offset < blake3::kChunkLen ? len - offset : uint64_t(blake3::kChunkLen));
  const bool root = base[s + 1] - base[s] == 1;
  uint32_t cv[8];
  blake3::chunk_cv(len ? ptrs[s] + offset : nullptr, chunk_len, index, root, cv);
  for (int i = 0; i < 8; ++i) cvs[c * 8 + i] = cv[i];
}

__global__ void level_kernel(const uint32_t* cur, const uint64_t* cur_base, const uint64_t* counts,
                             uint32_t* next, const uint64_t* next_base, size_t n, uint64_t total) {
  const uint64_t t = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= total) return;
  const size_t s = find_segment(next_base, n, t);
  const uint64_t i = t - next_base[s];
  const uint64_t count = counts[s];
  const uint32_t* src = cur + cur_base[s] * 8;
  uint32_t* dst = next + t * 8;
  if (count > 1 && 2 * i + 1 < count) {
    blake3::parent_cv(src + 2 * i * 8, src + (2 * i + 1) * 8, count == 2, dst);
  } else {  // a single node, or the odd last one carried up
    for (int k = 0; k < 8; ++k) dst[k] = src[2 * i * 8 + k];
  }
}

__global__ void output_kernel(const uint32_t* cvs, const uint64_t* base, size_t n, uint8_t* out) {
  const uint64_t s = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (s >= n) return;
  for (int i = 0; i < 8; ++i) blake3::store_le32(out + 32 * s + 4 * i, cvs[base[s] * 8 + i]);
}

}  // namespace

void blake3_chunks(const uint8_t* const* ptrs, const uint64_t* lens, const uint64_t* chunk_base,
                   size_t n, uint64_t total_chunks, uint32_t* cvs, Stream stream) {
  if (total_chunks == 0) return;
  chunk_kernel<<<grid_for(total_chunks, 128), 128, 0, as_stream(stream)>>>(ptrs, lens, chunk_base,
                                                                           n, total_chunks, cvs);
}

void blake3_level(const uint32_t* cur, const uint64_t* cur_base, const uint64_t* counts,
                  uint32_t* next, const uint64_t* next_base, size_t n, uint64_t total_next,
                  Stream stream) {
  if (total_next == 0) return;
  level_kernel<<<grid_for(total_next, 128), 128, 0, as_stream(stream)>>>(
      cur, cur_base, counts, next, next_base, n, total_next);
}

void blake3_output(const uint32_t* cvs, const uint64_t* base, size_t n, uint8_t* out,
                   Stream stream) {
  if (n == 0) return;
  output_kernel<<<grid_for(n, 128), 128, 0, as_stream(stream)>>>(cvs, base, n, out);
}

const char* last_error() {
  cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace mmcore::cuda
