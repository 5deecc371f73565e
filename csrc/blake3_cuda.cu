// BLAKE3 over a segment table on the GPU: the stages of blake3_tree.h, one
// launch each, the plan built on the host (blake3_tree.cpp).
#include "blake3_tree.h"
#include "cuda_common.cuh"
#include "cuda_kernels.h"

namespace mmcore::cuda {
namespace {

namespace tree = blake3::tree;

// Runs a step on the calling thread, then waits for the CTA; each thread keeps
// its state in registers (slot 0 of a one-element array).
struct DeviceExec {
  template <class F>
  __device__ static void each(F&& f) {
    f(threadIdx.x);
    __syncthreads();
  }
  __device__ static uint32_t slot(uint32_t) { return 0; }
  __device__ static void max_into(uint32_t* p, uint32_t v) { atomicMax(p, v); }
};

template <bool Leaf>
__global__ void __launch_bounds__(tree::kThreads) stage_kernel(tree::StageArgs a) {
  __shared__ tree::Shared sh;
  tree::Thread th[1];
  tree::run_cta<Leaf, DeviceExec>(a, sh, blockIdx.x, th);
}

}  // namespace

void blake3_stage(bool leaf, const uint8_t* const* ptrs, const uint64_t* lens,
                  const uint32_t* leaves, const void* tasks, const uint32_t* cta_first,
                  uint64_t ctas, uint32_t* nodes, uint8_t* out, Stream stream) {
  if (ctas == 0) return;
  tree::StageArgs a{ptrs,      lens,  leaves, static_cast<const tree::Task*>(tasks),
                    cta_first, nodes, out};
  if (leaf)
    stage_kernel<true><<<unsigned(ctas), tree::kThreads, 0, as_stream(stream)>>>(a);
  else
    stage_kernel<false><<<unsigned(ctas), tree::kThreads, 0, as_stream(stream)>>>(a);
}

const char* last_error() {
  cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace mmcore::cuda
