// Per-element delta math shared by the CPU and CUDA paths: XOR planes and
// error-bounded quantization. Everything here is exact integer work or IEEE
// double arithmetic with one rounding per operation (no FMA contraction: the
// build passes -ffp-contract=off to g++ and --fmad=false to nvcc), so both
// devices produce the same bits.
#pragma once

#include <cmath>
#include <cstring>

#include "common.h"

namespace mmcore::delta {

// ---- XOR planes ---------------------------------------------------------
// A segment of m words of W bytes becomes W planes of m bytes: plane p holds
// byte p (little-endian) of every word of new XOR parent.

template <int W>
MMCORE_HD MMCORE_INLINE void xor_planes_encode_word(const uint8_t* next, const uint8_t* parent,
                                                    uint8_t* out, uint64_t i, uint64_t m) {
  for (int p = 0; p < W; ++p) out[uint64_t(p) * m + i] = next[i * W + p] ^ parent[i * W + p];
}

template <int W>
MMCORE_HD MMCORE_INLINE void xor_planes_decode_word(const uint8_t* enc, const uint8_t* parent,
                                                    uint8_t* out, uint64_t i, uint64_t m) {
  for (int p = 0; p < W; ++p) out[i * W + p] = enc[uint64_t(p) * m + i] ^ parent[i * W + p];
}

// ---- Floating formats ---------------------------------------------------
enum FloatKind : uint32_t { kF16 = 1, kBF16 = 2, kF32 = 3, kF64 = 4 };

MMCORE_HD MMCORE_INLINE int kind_size(uint32_t kind) {
  return kind == kF64 ? 8 : kind == kF32 ? 4 : 2;
}

MMCORE_HD MMCORE_INLINE uint64_t double_bits(double v) {
  uint64_t b;
  memcpy(&b, &v, 8);
  return b;
}

MMCORE_HD MMCORE_INLINE double bits_double(uint64_t b) {
  double v;
  memcpy(&v, &b, 8);
  return v;
}

MMCORE_HD MMCORE_INLINE uint64_t load_bits(const uint8_t* p, uint32_t kind) {
  uint64_t b = 0;
  memcpy(&b, p, kind_size(kind));  // little-endian host
  return b;
}

MMCORE_HD MMCORE_INLINE void store_bits(uint8_t* p, uint64_t b, uint32_t kind) {
  memcpy(p, &b, kind_size(kind));
}

MMCORE_HD MMCORE_INLINE bool is_finite(double v) {
  return ((double_bits(v) >> 52) & 0x7ff) != 0x7ff;
}

// Exact value of a stored element as a double (every f16/bf16/f32 value is one).
MMCORE_HD MMCORE_INLINE double to_double(uint64_t b, uint32_t kind) {
  if (kind == kF64) return bits_double(b);
  if (kind == kF32) {
    float f;
    uint32_t u = uint32_t(b);
    memcpy(&f, &u, 4);
    return double(f);
  }
  if (kind == kBF16) {
    float f;
    uint32_t u = uint32_t(b) << 16;
    memcpy(&f, &u, 4);
    return double(f);
  }
  // float16: sign, 5-bit exponent (bias 15), 10-bit mantissa
  const uint32_t sign = (uint32_t(b) >> 15) & 1, exp = (uint32_t(b) >> 10) & 0x1f,
                 mant = uint32_t(b) & 0x3ff;
  double mag;
  if (exp == 0x1f) {
    mag = mant ? NAN : INFINITY;
  } else if (exp == 0) {
    mag = ldexp(double(mant), -24);
  } else {
    mag = ldexp(double(mant | 0x400), int(exp) - 25);
  }
  return sign ? -mag : mag;
}

// Rounds a finite double to the nearest float16 / bfloat16 bit pattern, ties
// to even, directly (no double rounding through float32). Overflow gives inf.
MMCORE_HD MMCORE_INLINE uint64_t round_small_float(double v, int exp_bits, int mant_bits) {
  const uint64_t b = double_bits(v);
  const uint64_t sign = (b >> 63) << (exp_bits + mant_bits);
  const int exp = int((b >> 52) & 0x7ff);
  const uint64_t frac = b & ((uint64_t(1) << 52) - 1);
  const int bias = (1 << (exp_bits - 1)) - 1;
  const uint64_t inf = uint64_t((1 << exp_bits) - 1) << mant_bits;
  if (exp == 0) return sign;  // double subnormals are far below the target's range
  int e = exp - 1023;         // value = 1.frac * 2^e
  const uint64_t sig = frac | (uint64_t(1) << 52);
  int shift = 52 - mant_bits;
  if (e < 1 - bias) shift += (1 - bias) - e;  // subnormal in the target
  if (shift > 54) return sign;                // below half the smallest subnormal
  uint64_t rounded = sig >> shift;
  const uint64_t rem = sig & ((uint64_t(1) << shift) - 1);
  const uint64_t half = uint64_t(1) << (shift - 1);
  if (rem > half || (rem == half && (rounded & 1))) ++rounded;
  if (e < 1 - bias) return sign | rounded;  // 2^mant_bits here is the smallest normal: same bits
  if (rounded >> (mant_bits + 1)) {         // the significand carried into a new bit
    rounded >>= 1;
    ++e;
  }
  if (e > bias) return sign | inf;
  return sign | (uint64_t(e + bias) << mant_bits) | (rounded & ((uint64_t(1) << mant_bits) - 1));
}

MMCORE_HD MMCORE_INLINE uint64_t from_double(double v, uint32_t kind) {
  if (kind == kF64) return double_bits(v);
  if (kind == kF32) {
    float f = float(v);  // IEEE round to nearest even on both devices
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
  }
  if (kind == kBF16) return round_small_float(v, 8, 7);
  return round_small_float(v, 5, 10);
}

// Exactly |a - b| <= tol, for finite a, b, tol (TwoSum recovers the rounding
// error of a - b, so a difference that rounds down onto tol is not accepted).
MMCORE_HD MMCORE_INLINE bool within(double a, double b, double tol) {
  const double s = a - b;
  const double bv = s - a;
  const double av = s - bv;
  const double err = (a - av) + (-b - bv);
  const double mag = fabs(s);
  if (mag < tol) return true;
  if (mag > tol || !(mag == tol)) return false;
  return err == 0.0 || (err < 0.0) != (s < 0.0);
}

// q values are stored as little-endian int8, int16 or int32 (width 1, 2, 4).
MMCORE_HD MMCORE_INLINE void store_q(uint8_t* q, uint64_t i, uint32_t width, int32_t v) {
  if (width == 1) {
    q[i] = uint8_t(int8_t(v));
  } else if (width == 2) {
    const int16_t h = int16_t(v);
    memcpy(q + 2 * i, &h, 2);
  } else {
    memcpy(q + 4 * i, &v, 4);
  }
}

MMCORE_HD MMCORE_INLINE int32_t load_q(const uint8_t* q, uint64_t i, uint32_t width) {
  if (width == 1) return int8_t(q[i]);
  if (width == 2) {
    int16_t h;
    memcpy(&h, q + 2 * i, 2);
    return h;
  }
  int32_t v;
  memcpy(&v, q + 4 * i, 4);
  return v;
}

constexpr double kMaxQ = 2147483647.0;

// Quantizes one element: returns false when it must be stored exactly (an
// escape: not finite, out of q's range, or a zero that would not come back as
// the same zero), else sets q such that recovering parent + q*step lands within tol.
MMCORE_HD MMCORE_INLINE bool quantize_one(uint64_t new_bits, uint64_t parent_bits, uint32_t kind,
                                          double step, double tol, int32_t* q) {
  const double x = to_double(new_bits, kind);
  const double p = to_double(parent_bits, kind);
  if (!is_finite(x) || !is_finite(p)) return false;
  const double qd = rint((x - p) / step);
  if (!(fabs(qd) <= kMaxQ)) return false;
  const int32_t qi = int32_t(qd);
  const uint64_t rec_bits = from_double(p + double(qi) * step, kind);
  const double rec = to_double(rec_bits, kind);
  if (!is_finite(rec) || !within(rec, x, tol)) return false;
  if (x == 0.0 && rec_bits != new_bits) return false;  // a zero keeps its exact bits (sign)
  *q = qi;
  return true;
}

// The recovered bits for a quantized element, exactly as quantize_one checked them.
MMCORE_HD MMCORE_INLINE uint64_t dequantize_one(uint64_t parent_bits, int32_t q, uint32_t kind,
                                                double step) {
  return from_double(to_double(parent_bits, kind) + double(q) * step, kind);
}

}  // namespace mmcore::delta
