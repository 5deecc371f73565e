// CUDA launchers (torch-free). Every pointer, table and scratch buffer is
// device memory allocated by the caller (torch); every launcher enqueues on the
// caller's stream and returns without synchronising. Tables of segments are
// described by "base" arrays: base[s] is the index of segment s's first work
// item (chunk, word, element or block) and base[n] the total.
#pragma once

#include <cstddef>
#include <cstdint>

namespace mmcore::cuda {

using Stream = void*;  // cudaStream_t

// xor-planes fused into BLAKE3's stage 0 (all null: hash only).
struct XorPlanesArgs {
  const uint8_t* const* parents;
  uint8_t* const* outs;
  const uint64_t* words;
  const uint32_t* widths;
  unsigned long long* changed;
};

// BLAKE3: one call per stage of the host's plan (blake3_plan.h, tree_plan):
// stage 0 (leaf) hashes the chunks of ptrs/lens, later stages the nodes
// `leaves` of the stage before; tasks and cta_first are the stage's tables.
// Stage 0 with xor_args also writes the xor-planes of ptrs against parents.
void blake3_stage(bool leaf, const uint8_t* const* ptrs, const uint64_t* lens,
                  const uint32_t* leaves, const void* tasks, const uint32_t* cta_first,
                  uint64_t ctas, uint32_t* nodes, uint8_t* out, const XorPlanesArgs& xor_args,
                  Stream stream);

// The elementwise kernels (delta_units.h) work in tiles of one segment each:
// base[s] is segment s's first tile, segment[i] tile i's segment (total tiles).
struct Tiles {
  const uint64_t* base;
  const uint32_t* segment;
  uint64_t total;
};

// Tiles of kTileThreads units of kUnit words: 4,096 words per tile.
void xor_planes_encode(const uint8_t* const* news, const uint8_t* const* parents,
                       const uint64_t* words, const uint32_t* widths, uint8_t* const* outs,
                       unsigned long long* changed, Tiles tiles, Stream stream);
void xor_planes_decode(const uint8_t* const* encs, const uint8_t* const* parents,
                       const uint64_t* words, const uint32_t* widths, uint8_t* const* outs,
                       Tiles tiles, Stream stream);

// Tiles of 4,096 bytes of elements (256 units of 16 bytes). stats: 4 per segment as in delta.h (max
// |q|, escapes, changed, 0), zeroed by the caller; max_delta_bits: the bits of max |new - parent|
// (non-negative doubles order like their bits), zeroed by the caller.
void quantize_plan(const uint8_t* const* news, const uint8_t* const* parents,
                   const uint64_t* numels, const uint32_t* kinds, const double* tols,
                   unsigned long long* stats, unsigned long long* max_delta_bits, Tiles tiles,
                   Stream stream);
// q values (escapes hold 0) and one escape flag byte per element at
// flags[flag_base[s] + i] (flag_base[s] a multiple of 16); the caller compacts
// the flags (in index order).
void quantize_write(const uint8_t* const* news, const uint8_t* const* parents,
                    const uint64_t* numels, const uint32_t* kinds, const double* tols,
                    const uint32_t* qwidths, uint8_t* const* q_outs, uint8_t* flags,
                    const uint64_t* flag_base, Tiles tiles, Stream stream);
// parent + q * step; the caller writes the escapes over the result.
void quantize_decode(const uint8_t* const* parents, const uint64_t* numels, const uint32_t* kinds,
                     const double* tols, const uint32_t* qwidths, const uint8_t* const* qs,
                     uint8_t* const* outs, Tiles tiles, Stream stream);

// Copies in tiles of kCopyTile (16 KiB) bytes.
void gather(uint8_t* dst, const uint8_t* const* srcs, const uint64_t* lens,
            const uint64_t* dst_offsets, Tiles tiles, Stream stream);
void scatter(const uint8_t* src, uint8_t* const* dsts, const uint64_t* lens,
             const uint64_t* src_offsets, Tiles tiles, Stream stream);

// Byte planes (planes_units.h): decodes the n blocks of `blocks` (planes_units::Block,
// built by planes_blocks) into their destinations. planes: n * 8 addresses of scratch;
// error: two u32 zeroed by the caller, set to the first error code and its block.
void planes_decode(const void* blocks, uint64_t n, uint64_t* planes, uint32_t* error,
                   Stream stream);

// cudaGetLastError() as a message, or nullptr when the last launch succeeded.
const char* last_error();

}  // namespace mmcore::cuda
