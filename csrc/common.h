// Shared macros for code compiled by both g++ (CPU path) and nvcc (GPU path).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MMCORE_HD __host__ __device__
#define MMCORE_INLINE __forceinline__
#define MMCORE_UNROLL _Pragma("unroll")
#else
#define MMCORE_HD
#define MMCORE_INLINE inline __attribute__((always_inline))
#define MMCORE_UNROLL _Pragma("GCC unroll 16")
#endif

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "mmcore stores little-endian bytes and assumes a little-endian host"
#endif
