// BLAKE3-256 over a table of (pointer, length) segments: CPU launcher.
#pragma once

#include <cstddef>
#include <cstdint>

namespace mmcore {

// Writes the 32-byte BLAKE3 hash of segment i to out + 32 * i. All segments
// are hashed in one pass: full chunks of every segment share SIMD lanes, and
// the work is split over `threads` threads (0 = all cores).
// Optional visitor, called once per chunk (segment, byte offset, length) on the
// thread that just hashed it, while its bytes are still in cache: how a fused
// kernel does more work in the same pass over memory. Must be thread-safe.
struct ChunkVisitor {
  void (*visit)(void* ctx, size_t segment, uint64_t offset, uint32_t len);
  void* ctx;
};

void blake3_segments_cpu(const uint8_t* const* ptrs, const uint64_t* lens, size_t n, uint8_t* out,
                         int threads, const ChunkVisitor* visitor = nullptr);

// Name of the instruction set the CPU path uses ("avx512", "avx2" or "generic").
const char* blake3_cpu_isa();

namespace blake3 {
// Widest lane count and entry points, chosen once per process.
struct LaneKernels {
  int width;
  void (*chunks)(const uint8_t* const*, const uint32_t*, uint32_t, const uint64_t*, const uint8_t*,
                 uint32_t* const*);
  void (*parents)(const uint32_t* const*, const uint32_t* const*, const uint8_t*, uint32_t* const*);
  const char* isa;
};
LaneKernels avx2_kernels();    // defined in blake3_avx2.cpp (x86-64 only)
LaneKernels avx512_kernels();  // defined in blake3_avx512.cpp (x86-64 only)
}  // namespace blake3

}  // namespace mmcore
