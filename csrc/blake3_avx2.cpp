// AVX2 instantiation of the lane kernels: this file alone is compiled with
// -mavx2, and is only called after a runtime CPU check.
#include "blake3.h"
#define MMCORE_LANES_ISA isa_avx2
#include "blake3_lanes.h"

namespace mmcore::blake3 {

static void chunks_x8(const uint8_t* const* data, const uint32_t* len, uint32_t blocks,
                      const uint64_t* counter, const uint8_t* root, uint32_t* const* out) {
  chunks_lanes<8>(data, len, blocks, counter, root, out);
}

static void parents_x8(const uint32_t* const* left, const uint32_t* const* right,
                       const uint8_t* root, uint32_t* const* out) {
  parents_lanes<8>(left, right, root, out);
}

LaneKernels avx2_kernels() { return LaneKernels{8, chunks_x8, parents_x8, "avx2"}; }

}  // namespace mmcore::blake3
