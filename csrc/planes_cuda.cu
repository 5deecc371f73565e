// The byte-plane decoder on the GPU: the two launches of planes_units.h over a table
// of blocks the host built (planes_blocks), each CTA striding over the blocks.
#include "cuda_common.cuh"
#include "cuda_kernels.h"
#include "planes_units.h"

namespace mmcore::cuda {
namespace {

namespace pu = planes_units;

__device__ __forceinline__ void report(uint32_t* error, uint32_t code, uint64_t block) {
  if (atomicCAS(error, 0u, code) == 0u) error[1] = uint32_t(block);
}

__global__ void __launch_bounds__(pu::kLanes)
    planes_decode_kernel(const pu::Block* blocks, uint64_t n, uint64_t* planes, uint32_t* error) {
  __shared__ pu::Shared sh;
  const uint32_t lane = threadIdx.x;
  for (uint64_t k = blockIdx.x; k < n; k += gridDim.x) {
    const pu::Block b = blocks[k];
    if (lane == 0) sh.error = pu::parse(b, sh);
    __syncthreads();
    const bool ok = sh.error == pu::kOk;
    if (ok) {
      pu::fill_tables(b, sh, lane, pu::kLanes);
      __syncthreads();
      if (lane < pu::jobs(b, sh)) {
        const uint32_t e = pu::decode_job(b, sh, lane);
        if (e != pu::kOk) report(error, e, k);
      }
    } else if (lane == 0) {
      report(error, sh.error, k);
    }
    if (lane == 0) {
      if (ok)
        pu::plane_addresses(b, sh, planes + k * pu::kMaxWidth);
      else
        planes[k * pu::kMaxWidth] = 0;
    }
    __syncthreads();  // sh is the next block's
  }
}

__global__ void planes_join_kernel(const pu::Block* blocks, uint64_t n, const uint64_t* planes) {
  for (uint64_t k = blockIdx.x; k < n; k += gridDim.x) {
    const uint64_t* row = planes + k * pu::kMaxWidth;
    if (!row[0]) continue;  // a damaged block: reported by the decode
    const pu::Block b = blocks[k];
    uint64_t at[pu::kMaxWidth];  // the planes' addresses, in registers
    for (uint32_t p = 0; p < pu::kMaxWidth; ++p) at[p] = p < b.width ? row[p] : 0;
    for (uint32_t i = threadIdx.x; i < b.m; i += blockDim.x) pu::join(b, at, i);
  }
}

unsigned blocks_grid(uint64_t n, unsigned per_sm) {
  const uint64_t most = uint64_t(sm_count()) * per_sm;
  return unsigned(n < most ? n : most);
}

}  // namespace

void planes_decode(const void* blocks, uint64_t n, uint64_t* planes, uint32_t* error,
                   Stream stream) {
  if (!n) return;
  const auto* b = static_cast<const pu::Block*>(blocks);
  planes_decode_kernel<<<blocks_grid(n, 16), pu::kLanes, 0, as_stream(stream)>>>(b, n, planes,
                                                                                 error);
  planes_join_kernel<<<blocks_grid(n, 8), pu::kJoinThreads, 0, as_stream(stream)>>>(b, n, planes);
}

}  // namespace mmcore::cuda
