// Many tensors to one contiguous buffer and back (CPU launcher).
#pragma once

#include <cstddef>
#include <cstdint>

namespace mmcore {

// dst[dst_offsets[i] : + lens[i]] = srcs[i][0 : lens[i]] for every i.
void gather_cpu(uint8_t* dst, const uint8_t* const* srcs, const uint64_t* lens,
                const uint64_t* dst_offsets, size_t n, int threads);

// dsts[i][0 : lens[i]] = src[src_offsets[i] : + lens[i]] for every i.
void scatter_cpu(const uint8_t* src, uint8_t* const* dsts, const uint64_t* lens,
                 const uint64_t* src_offsets, size_t n, int threads);

}  // namespace mmcore
