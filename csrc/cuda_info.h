// What the CUDA side of the module can report without touching any tensor.
#pragma once

#include <string>

namespace mmcore {

// Number of usable CUDA devices, or -1 when the driver or runtime is missing.
// Initialises the CUDA runtime: call it only when the user asks.
int cuda_device_count();

// Waits for every kernel enqueued on `stream` (a cudaStream_t of the current
// device), then reads and clears the last CUDA error. Returns "" when all went
// well, else the CUDA error as "<description> (<cudaError name>)".
std::string cuda_stream_check(void* stream);

}  // namespace mmcore
