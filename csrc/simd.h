// SIMD vocabulary for the averaging kernels. Each instruction set gets one struct with the
// same static interface; kernels_isa.inc is written once against that interface and compiled
// once per struct. Nothing here is compiled with -m flags: every intrinsic-using function carries
// its own target attribute, so one build runs on any x86-64 (or aarch64) host and the runtime
// dispatcher in kernels.cpp picks the widest set the CPU and OS support.
#pragma once

#include <cstdint>
#include <cstring>

#include "scalar.h"

#if defined(__x86_64__) || defined(_M_X64)
#define OE_X86 1
#include <immintrin.h>
#elif defined(__aarch64__)
#define OE_NEON 1
#include <arm_neon.h>
#endif

namespace oe {

#if defined(OE_X86)

#define OE_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define OE_TARGET_AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))
#define OE_INLINE_AVX2 static inline __attribute__((always_inline, target("avx2,fma,f16c")))
#define OE_INLINE_AVX512 static inline __attribute__((always_inline, target("avx512f,avx2,fma,f16c")))

// 8 floats / 4 doubles per register. Needs AVX2 (integer widening), FMA and F16C.
struct VecAvx2 {
  using F = __m256;
  using D = __m256d;
  static constexpr int W = 8;  // floats per F; D holds W / 2 doubles

  OE_INLINE_AVX2 F load(const float* p) { return _mm256_loadu_ps(p); }
  OE_INLINE_AVX2 F load(const bf16_t* p) {
    // bf16 is the top half of a float: widen u16 -> u32 and shift into place, in registers.
    const __m256i x = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
  }
  OE_INLINE_AVX2 F load(const fp16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  OE_INLINE_AVX2 void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  OE_INLINE_AVX2 F set1(float x) { return _mm256_set1_ps(x); }
  OE_INLINE_AVX2 F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  OE_INLINE_AVX2 F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }  // a * b + c

  OE_INLINE_AVX2 D lo(F v) { return _mm256_cvtps_pd(_mm256_castps256_ps128(v)); }
  OE_INLINE_AVX2 D hi(F v) { return _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)); }
  OE_INLINE_AVX2 D dadd(D a, D b) { return _mm256_add_pd(a, b); }
  OE_INLINE_AVX2 D ddiv(D a, D b) { return _mm256_div_pd(a, b); }
  OE_INLINE_AVX2 D dset1(double x) { return _mm256_set1_pd(x); }
  // Rounds two double halves to float (round to nearest) and stores W floats.
  OE_INLINE_AVX2 void store_pd(float* p, D l, D h) {
    _mm_storeu_ps(p, _mm256_cvtpd_ps(l));
    _mm_storeu_ps(p + W / 2, _mm256_cvtpd_ps(h));
  }
};

// 16 floats / 8 doubles per register. Only AVX512F instructions (plus the AVX2/F16C ones every
// AVX-512 CPU has), so it runs on Skylake-SP, Ice Lake, Sapphire Rapids and Zen 4 alike.
struct VecAvx512 {
  using F = __m512;
  using D = __m512d;
  static constexpr int W = 16;

  OE_INLINE_AVX512 F load(const float* p) { return _mm512_loadu_ps(p); }
  OE_INLINE_AVX512 F load(const bf16_t* p) {
    const __m512i x = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
  }
  OE_INLINE_AVX512 F load(const fp16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  OE_INLINE_AVX512 void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  OE_INLINE_AVX512 F set1(float x) { return _mm512_set1_ps(x); }
  OE_INLINE_AVX512 F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  OE_INLINE_AVX512 F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }

  OE_INLINE_AVX512 D lo(F v) { return _mm512_cvtps_pd(_mm512_castps512_ps256(v)); }
  OE_INLINE_AVX512 D hi(F v) {
    // AVX512F has no 256-bit float extract (that is AVX512DQ); go through the integer view.
    return _mm512_cvtps_pd(_mm256_castsi256_ps(_mm512_extracti64x4_epi64(_mm512_castps_si512(v), 1)));
  }
  OE_INLINE_AVX512 D dadd(D a, D b) { return _mm512_add_pd(a, b); }
  OE_INLINE_AVX512 D ddiv(D a, D b) { return _mm512_div_pd(a, b); }
  OE_INLINE_AVX512 D dset1(double x) { return _mm512_set1_pd(x); }
  OE_INLINE_AVX512 void store_pd(float* p, D l, D h) {
    _mm256_storeu_ps(p, _mm512_cvtpd_ps(l));
    _mm256_storeu_ps(p + W / 2, _mm512_cvtpd_ps(h));
  }
};

#elif defined(OE_NEON)

// NEON and fp16 <-> fp32 conversion are part of the aarch64 base ISA: no runtime check needed.
#define OE_INLINE_NEON static inline __attribute__((always_inline))
struct VecNeon {
  using F = float32x4_t;
  using D = float64x2_t;
  static constexpr int W = 4;

  OE_INLINE_NEON F load(const float* p) { return vld1q_f32(p); }
  OE_INLINE_NEON F load(const bf16_t* p) {
    return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(reinterpret_cast<const uint16_t*>(p)), 16));
  }
  OE_INLINE_NEON F load(const fp16_t* p) {
    return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(reinterpret_cast<const uint16_t*>(p))));
  }
  OE_INLINE_NEON void store(float* p, F v) { vst1q_f32(p, v); }
  OE_INLINE_NEON F set1(float x) { return vdupq_n_f32(x); }
  OE_INLINE_NEON F sub(F a, F b) { return vsubq_f32(a, b); }
  OE_INLINE_NEON F fmadd(F a, F b, F c) { return vfmaq_f32(c, a, b); }

  OE_INLINE_NEON D lo(F v) { return vcvt_f64_f32(vget_low_f32(v)); }
  OE_INLINE_NEON D hi(F v) { return vcvt_high_f64_f32(v); }
  OE_INLINE_NEON D dadd(D a, D b) { return vaddq_f64(a, b); }
  OE_INLINE_NEON D ddiv(D a, D b) { return vdivq_f64(a, b); }
  OE_INLINE_NEON D dset1(double x) { return vdupq_n_f64(x); }
  OE_INLINE_NEON void store_pd(float* p, D l, D h) { vst1q_f32(p, vcombine_f32(vcvt_f32_f64(l), vcvt_f32_f64(h))); }
};

#endif

}  // namespace oe
