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
  __device__ static void add_into(uint32_t* p, uint32_t v) { atomicAdd(p, v); }
  __device__ static void add_global(unsigned long long* p, uint32_t v) {
    atomicAdd(p, (unsigned long long)v);
  }
};

template <bool Leaf, bool Fused>
__global__ void __launch_bounds__(tree::kThreads) stage_kernel(tree::StageArgs a) {
  __shared__ tree::Shared sh;
  tree::Thread th[1];
  if constexpr (Fused) {
    __shared__ tree::XorSlots xs;
    tree::run_cta<Leaf, Fused, DeviceExec>(a, sh, &xs, blockIdx.x, th);
  } else {
    tree::run_cta<Leaf, Fused, DeviceExec>(a, sh, nullptr, blockIdx.x, th);
  }
}

}  // namespace

void blake3_stage(bool leaf, const uint8_t* const* ptrs, const uint64_t* lens,
                  const uint32_t* leaves, const void* tasks, const uint32_t* cta_first,
                  uint64_t ctas, uint32_t* nodes, uint8_t* out, const XorPlanesArgs& xor_args,
                  Stream stream) {
  if (ctas == 0) return;
  const tree::StageArgs a{
      ptrs,
      lens,
      leaves,
      static_cast<const tree::Task*>(tasks),
      cta_first,
      nodes,
      out,
      {xor_args.parents, xor_args.outs, xor_args.words, xor_args.widths, xor_args.changed}};
  void (*kernel)(tree::StageArgs) = !leaf              ? stage_kernel<false, false>
                                    : xor_args.parents ? stage_kernel<true, true>
                                                       : stage_kernel<true, false>;
  kernel<<<unsigned(ctas), tree::kThreads, 0, as_stream(stream)>>>(a);
}

const char* last_error() {
  cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace mmcore::cuda
