// Portable SIMD for the CPU kernels: GCC/Clang vector extensions whose width follows the ISA this
// translation unit is compiled for (kernels.cpp is built once per ISA, see CMakeLists.txt), so the
// same source yields SSE2/NEON, AVX2+FMA and AVX-512 code without intrinsics.
#pragma once

#include <cstdint>
#include <cstring>

namespace jwth {
namespace cpu {

#if defined(__AVX512F__)
constexpr int kW = 16;
#elif defined(__AVX__)
constexpr int kW = 8;
#else
constexpr int kW = 4;
#endif

typedef float vfloat __attribute__((vector_size(kW * sizeof(float))));

static inline vfloat vload(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));  // unaligned load; compiles to one vmovups
  return v;
}
static inline void vstore(float* p, vfloat v) { std::memcpy(p, &v, sizeof(v)); }
static inline vfloat vsplat(float s) { return vfloat{} + s; }
static inline float vsum(vfloat v) {
  float s = 0.f;
  for (int i = 0; i < kW; ++i) s += v[i];
  return s;
}

// ---- 16-bit floats stored as raw bits --------------------------------------------------------------
struct bf16_t { uint16_t bits; };
struct fp16_t { uint16_t bits; };

static inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

static inline float to_float(float x) { return x; }
static inline float to_float(bf16_t x) { return bits_to_float(uint32_t(x.bits) << 16); }
static inline float to_float(fp16_t x) {
  const uint32_t h = x.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24
    const float f = float(mant) * 5.9604644775390625e-08f;
    return sign ? -f : f;
  }
  if (exp == 31) return bits_to_float(sign | 0x7f800000u | (mant << 13));
  return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

// Round to nearest even, as torch's .to(bfloat16) does; NaN stays a (quiet) NaN.
static inline uint16_t float_to_bf16_bits(float f) {
  const uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// Round to nearest even, including the subnormal range and overflow to infinity.
static inline uint16_t float_to_fp16_bits(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t au = u & 0x7fffffffu;
  if (au > 0x7f800000u) return uint16_t(sign | 0x7e00u);       // NaN
  if (au >= 0x477ff000u) return uint16_t(sign | 0x7c00u);      // rounds to >= 65520: inf
  if (au < 0x38800000u) {                                      // below 2^-14: subnormal or zero
    // Adding 0.5 makes the FPU do the RNE at the 2^-24 quantum of fp16 subnormals.
    const float a = bits_to_float(au) + 0.5f;
    return uint16_t(sign | (float_to_bits(a) - 0x3f000000u));
  }
  const uint32_t mant_odd = (au >> 13) & 1u;
  const uint32_t r = au + 0xc8000fffu + mant_odd;  // rebias exponent (-112 << 23) and round
  return uint16_t(sign | (r >> 13));
}

static inline void store_as(float* p, float v) { *p = v; }
static inline void store_as(bf16_t* p, float v) { p->bits = float_to_bf16_bits(v); }
static inline void store_as(fp16_t* p, float v) { p->bits = float_to_fp16_bits(v); }

}  // namespace cpu
}  // namespace jwth
