// Delta encodings over tables of segments (CPU launchers). Each segment is a
// (new, parent) pair of equal byte length; see delta_math.h for the math and
// docs/FORMAT.md for the encodings.
#pragma once

#include <cstddef>
#include <cstdint>

namespace mmcore {

// out[s] receives the W planes of new[s] XOR parent[s] (nbytes[s] bytes, a
// multiple of widths[s] in {1, 2, 4, 8}); changed[s] counts the words that differ.
void xor_planes_encode_cpu(const uint8_t* const* news, const uint8_t* const* parents,
                           const uint64_t* nbytes, const uint32_t* widths, uint8_t* const* outs,
                           uint64_t* changed, size_t n, int threads);

// xor_planes_encode_cpu fused with BLAKE3 of every new segment (hashes: 32 * n
// bytes): each 1 KiB chunk is hashed and encoded in the same pass over memory.
void xor_planes_encode_hashed_cpu(const uint8_t* const* news, const uint8_t* const* parents,
                                  const uint64_t* nbytes, const uint32_t* widths,
                                  uint8_t* const* outs, uint64_t* changed, uint8_t* hashes,
                                  size_t n, int threads);

// The inverse: outs[s] = planes of encs[s] regrouped, XOR parent[s].
void xor_planes_decode_cpu(const uint8_t* const* encs, const uint8_t* const* parents,
                           const uint64_t* nbytes, const uint32_t* widths, uint8_t* const* outs,
                           size_t n, int threads);

// Pass 1 of quantized encoding, per segment: stats[4 * s + 0] = max |q| over
// quantized elements, + 1 = escapes, + 2 = changed elements (bits differ);
// max_delta[s] = max |new - parent| over finite pairs (0 if none).
void quantize_plan_cpu(const uint8_t* const* news, const uint8_t* const* parents,
                       const uint64_t* numels, const uint32_t* kinds, const double* tols, size_t n,
                       int64_t* stats, double* max_delta, int threads);

// Pass 2: q_outs[s] gets numels[s] quantized values of qwidths[s] bytes (1, 2 or
// 4; escapes hold 0), esc_index[s] the escaped element indices (uint64) and
// esc_bits[s] their exact values (element bytes), in index order.
void quantize_write_cpu(const uint8_t* const* news, const uint8_t* const* parents,
                        const uint64_t* numels, const uint32_t* kinds, const double* tols,
                        const uint32_t* qwidths, uint8_t* const* q_outs, uint8_t* const* esc_index,
                        uint8_t* const* esc_bits, size_t n, int threads);

// Recovery: outs[s][i] = parent + q * 2 * tol, then the escapes written over it.
void quantize_decode_cpu(const uint8_t* const* parents, const uint64_t* numels,
                         const uint32_t* kinds, const double* tols, const uint32_t* qwidths,
                         const uint8_t* const* qs, const uint64_t* n_escapes,
                         const uint8_t* const* esc_index, const uint8_t* const* esc_bits,
                         uint8_t* const* outs, size_t n, int threads);

}  // namespace mmcore
