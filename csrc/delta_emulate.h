// CPU emulation of the elementwise GPU kernels (for the CPU tests): the same
// tables as the launchers of cuda_kernels.h, in host memory, run tile by tile
// and thread by thread; per-segment results summed (or maxed) as the kernels'
// atomics do.
#pragma once

#include <cstddef>
#include <cstdint>

namespace mmcore::delta::units {

struct EmuTiles {  // as cuda::Tiles
  const uint64_t* base;
  const uint32_t* segment;
  uint64_t total;
};

void emulate_xor_planes_encode(const uint8_t* const* news, const uint8_t* const* parents,
                               const uint64_t* words, const uint32_t* widths, uint8_t* const* outs,
                               uint64_t* changed, const EmuTiles& tiles);
void emulate_xor_planes_decode(const uint8_t* const* encs, const uint8_t* const* parents,
                               const uint64_t* words, const uint32_t* widths, uint8_t* const* outs,
                               const EmuTiles& tiles);
void emulate_quantize_plan(const uint8_t* const* news, const uint8_t* const* parents,
                           const uint64_t* numels, const uint32_t* kinds, const double* tols,
                           uint64_t* stats, uint64_t* max_delta_bits, const EmuTiles& tiles);
void emulate_quantize_write(const uint8_t* const* news, const uint8_t* const* parents,
                            const uint64_t* numels, const uint32_t* kinds, const double* tols,
                            const uint32_t* qwidths, uint8_t* const* q_outs, uint8_t* flags,
                            const uint64_t* flag_base, const EmuTiles& tiles);
void emulate_quantize_decode(const uint8_t* const* parents, const uint64_t* numels,
                             const uint32_t* kinds, const double* tols, const uint32_t* qwidths,
                             const uint8_t* const* qs, uint8_t* const* outs, const EmuTiles& tiles);
void emulate_gather(uint8_t* dst, const uint8_t* const* srcs, const uint64_t* lens,
                    const uint64_t* dst_offsets, const EmuTiles& tiles);
void emulate_scatter(const uint8_t* src, uint8_t* const* dsts, const uint64_t* lens,
                     const uint64_t* src_offsets, const EmuTiles& tiles);

}  // namespace mmcore::delta::units
