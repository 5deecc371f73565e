#include <cuda_runtime_api.h>

#include <string>

#include "cuda_info.h"

namespace mmcore {

int cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error so later calls start clean
    return -1;
  }
  return count;
}

std::string cuda_stream_check(void* stream) {
  cudaError_t err = cudaStreamSynchronize(static_cast<cudaStream_t>(stream));
  // A launch error not reported yet, or the error the synchronisation just
  // returned: read it either way so that the next check starts clean (errors
  // that corrupt the context stay, as CUDA makes them sticky).
  const cudaError_t last = cudaGetLastError();
  if (err == cudaSuccess) err = last;
  if (err == cudaSuccess) return {};
  return std::string(cudaGetErrorString(err)) + " (" + cudaGetErrorName(err) + ")";
}

}  // namespace mmcore
