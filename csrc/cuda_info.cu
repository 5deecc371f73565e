#include <cuda_runtime_api.h>

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

}  // namespace mmcore
