// What the CUDA side of the module can report without touching any tensor.
#pragma once

namespace mmcore {

// Number of usable CUDA devices, or -1 when the driver or runtime is missing.
// Initialises the CUDA runtime: call it only when the user asks.
int cuda_device_count();

}  // namespace mmcore
