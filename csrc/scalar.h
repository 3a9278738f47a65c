// Portable scalar pieces: 16-bit storage types, their exact widening to float, and the scalar
// kernels. The scalar kernels are the whole implementation on CPUs without a vector path and
// the tail (the last n % W elements) of every vector kernel, so they compute exactly what the
// vector bodies compute: one fused multiply-add per element for the EMA, float64 sums for the
// mean. Free of torch headers so the kernels can be built and tested on their own.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels.h"

namespace oe {

// Bit-compatible with c10::BFloat16 / c10::Half (a single uint16_t).
struct bf16_t { uint16_t x; };
struct fp16_t { uint16_t x; };

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float to_float(float v) { return v; }
inline float to_float(bf16_t v) { return bits_to_float(static_cast<uint32_t>(v.x) << 16); }
inline float to_float(fp16_t v) {
  // IEEE binary16 -> binary32, exact for every input (subnormals, infinities, NaN payloads).
  const uint32_t sign = static_cast<uint32_t>(v.x & 0x8000u) << 16;
  const uint32_t exp = (v.x >> 10) & 0x1fu;
  const uint32_t mant = v.x & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (mant << 13));
  if (exp == 0) {
    const float mag = static_cast<float>(mant) * 0x1p-24f;  // exact: mant < 2^10
    return sign ? -mag : mag;
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

namespace scalar {

// avg[i] += w * (src[i] - avg[i]), with a single rounding of the multiply-add.
template <class T>
inline void ema(float* avg, const T* src, int64_t n, float w) {
  for (int64_t i = 0; i < n; ++i) avg[i] = std::fma(w, to_float(src[i]) - avg[i], avg[i]);
}

// avg[i] updated by K snapshots in order, each as ema() does (one fused multiply-add).
template <class T>
inline void fold(float* avg, const T* const* srcs, const float* ws, int K, int64_t begin,
                 int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    float a = avg[i];
    for (int k = 0; k < K; ++k) a = std::fma(ws[k], to_float(srcs[k][i]) - a, a);
    avg[i] = a;
  }
}

// out[i] = float(sum_j srcs[j][i] / m): summed in float64 in slot order, rounded once.
inline void mean(float* out, const void* const* srcs, const DType* dtypes, int m, int64_t begin,
                 int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    double acc = 0.0;
    for (int j = 0; j < m; ++j) {
      switch (dtypes[j]) {
        case DType::kFloat32: acc += to_float(static_cast<const float*>(srcs[j])[i]); break;
        case DType::kBFloat16: acc += to_float(static_cast<const bf16_t*>(srcs[j])[i]); break;
        case DType::kFloat16: acc += to_float(static_cast<const fp16_t*>(srcs[j])[i]); break;
      }
    }
    out[i] = static_cast<float>(acc / static_cast<double>(m));
  }
}

}  // namespace scalar
}  // namespace oe
