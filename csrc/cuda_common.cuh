// Helpers shared by the .cu files.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace mmcore::cuda {

// Streaming multiprocessors of the current device (asked once per device).
inline unsigned sm_count() {
  constexpr int kDevices = 64;
  static int known[kDevices] = {};
  int device = 0;
  cudaGetDevice(&device);
  if (device >= 0 && device < kDevices && known[device]) return unsigned(known[device]);
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      sms <= 0) {
    cudaGetLastError();  // not a launch's error: leave none behind for check_launch
    return 132;          // a guess for this launch only: ask again next time
  }
  if (device >= 0 && device < kDevices) known[device] = sms;
  return unsigned(sms);
}

inline cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

}  // namespace mmcore::cuda
