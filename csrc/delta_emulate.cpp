// The elementwise GPU kernels (delta_units.h) run on the CPU, tile by tile and
// thread by thread, with the tables the CUDA launchers take (in host memory):
// what the CPU tests check against the CPU kernels.
#include "delta_emulate.h"

#include "delta_units.h"

namespace mmcore::delta::units {

namespace {

template <class F>
void each_thread(const EmuTiles& tiles, F f) {
  for (uint64_t tile = 0; tile < tiles.total; ++tile) {
    const uint32_t s = tiles.segment[tile];
    for (uint32_t t = 0; t < kTileThreads; ++t) f(s, tile - tiles.base[s], t);
  }
}

}  // namespace

void emulate_xor_planes_encode(const uint8_t* const* news, const uint8_t* const* parents,
                               const uint64_t* words, const uint32_t* widths, uint8_t* const* outs,
                               uint64_t* changed, const EmuTiles& tiles) {
  each_thread(tiles, [&](uint32_t s, uint64_t local, uint32_t t) {
    changed[s] +=
        xor_encode_thread(news, parents, words, widths, outs, s, local * kTileThreads + t);
  });
}

void emulate_xor_planes_decode(const uint8_t* const* encs, const uint8_t* const* parents,
                               const uint64_t* words, const uint32_t* widths, uint8_t* const* outs,
                               const EmuTiles& tiles) {
  each_thread(tiles, [&](uint32_t s, uint64_t local, uint32_t t) {
    xor_decode_thread(encs, parents, words, widths, outs, s, local * kTileThreads + t);
  });
}

void emulate_quantize_plan(const uint8_t* const* news, const uint8_t* const* parents,
                           const uint64_t* numels, const uint32_t* kinds, const double* tols,
                           uint64_t* stats, uint64_t* max_delta_bits, const EmuTiles& tiles) {
  each_thread(tiles, [&](uint32_t s, uint64_t local, uint32_t t) {
    const QuantStats st =
        quantize_plan_thread(news, parents, numels, kinds, tols, s, local * kTileThreads + t);
    if (st.max_q > stats[4 * s]) stats[4 * s] = st.max_q;
    stats[4 * s + 1] += st.escapes;
    stats[4 * s + 2] += st.changed;
    if (st.max_delta_bits > max_delta_bits[s]) max_delta_bits[s] = st.max_delta_bits;
  });
}

void emulate_quantize_write(const uint8_t* const* news, const uint8_t* const* parents,
                            const uint64_t* numels, const uint32_t* kinds, const double* tols,
                            const uint32_t* qwidths, uint8_t* const* q_outs, uint8_t* flags,
                            const uint64_t* flag_base, const EmuTiles& tiles) {
  each_thread(tiles, [&](uint32_t s, uint64_t local, uint32_t t) {
    quantize_write_thread(news, parents, numels, kinds, tols, qwidths, q_outs, flags, flag_base, s,
                          local * kTileThreads + t);
  });
}

void emulate_quantize_decode(const uint8_t* const* parents, const uint64_t* numels,
                             const uint32_t* kinds, const double* tols, const uint32_t* qwidths,
                             const uint8_t* const* qs, uint8_t* const* outs,
                             const EmuTiles& tiles) {
  each_thread(tiles, [&](uint32_t s, uint64_t local, uint32_t t) {
    quantize_decode_thread(parents, numels, kinds, tols, qwidths, qs, outs, s,
                           local * kTileThreads + t);
  });
}

void emulate_gather(uint8_t* dst, const uint8_t* const* srcs, const uint64_t* lens,
                    const uint64_t* dst_offsets, const EmuTiles& tiles) {
  each_thread(tiles, [&](uint32_t s, uint64_t local, uint32_t t) {
    copy_tile(dst + dst_offsets[s], srcs[s], lens[s], local, t);
  });
}

void emulate_scatter(const uint8_t* src, uint8_t* const* dsts, const uint64_t* lens,
                     const uint64_t* src_offsets, const EmuTiles& tiles) {
  each_thread(tiles, [&](uint32_t s, uint64_t local, uint32_t t) {
    copy_tile(dsts[s], src + src_offsets[s], lens[s], local, t);
  });
}

}  // namespace mmcore::delta::units
