// The averaging kernels behind a runtime dispatch table. Every entry works on the element range
// [begin, end) of flat, contiguous buffers, so the caller can split one call across threads.
#pragma once

#include <cstdint>
#include <string>

namespace oe {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
constexpr int kNumDTypes = 3;

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kNeon = 3 };

struct Kernels {
  // avg[i] += w * (src[i] - avg[i]) for i in [begin, end).
  void (*ema[kNumDTypes])(float* avg, const void* src, int64_t begin, int64_t end, float w);
  // The same for k accumulators, reading each block of src from memory once.
  void (*ema_multi[kNumDTypes])(float* const* avgs, const float* ws, int k, const void* src,
                                int64_t begin, int64_t end);
  // out[i] = mean_j srcs[j][i], summed in float64 in slot order; slots may mix dtypes.
  void (*mean)(float* out, const void* const* srcs, const DType* dtypes, int m, int64_t begin,
               int64_t end);
};

// The widest instruction set this CPU and OS support (checked once, at first use).
Isa best_isa();
// The set the kernels use now: best_isa() unless lowered with set_isa (for tests, benchmarks).
Isa active_isa();
// Selects a set no wider than best_isa(); returns false (and changes nothing) otherwise.
bool set_isa(Isa isa);
const Kernels& active_kernels();

const char* isa_name(Isa isa);
bool isa_from_name(const std::string& name, Isa* out);

}  // namespace oe
