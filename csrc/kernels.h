// The averaging kernels behind a runtime dispatch table. Every entry works on the element range
// [begin, end) of flat, contiguous buffers, so the caller can split one call across threads.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace oe {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
constexpr int kNumDTypes = 3;

constexpr int kMaxFold = 16;  // snapshots one ema_fold call takes

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kNeon = 3 };

struct Kernels {
  // avg[i] += w * (src[i] - avg[i]) for i in [begin, end).
  void (*ema[kNumDTypes])(float* avg, const void* src, int64_t begin, int64_t end, float w);
  // The same for k accumulators, reading each block of src from memory once.
  void (*ema_multi[kNumDTypes])(float* const* avgs, const float* ws, int k, const void* src,
                                int64_t begin, int64_t end);
  // Folds K snapshots into each of m accumulators in one pass over memory: for every j and i,
  // for k = 0 .. K-1 in order, avgs[j][i] += ws[j * K + k] * (srcs[k][i] - avgs[j][i]), each
  // with one rounding (bit-identical to K ema calls). The srcs share one dtype; K <= kMaxFold.
  void (*ema_fold[kNumDTypes])(float* const* avgs, const float* ws, int m,
                               const void* const* srcs, int K, int64_t begin, int64_t end);
  // out[i] = mean_j srcs[j][i], summed in float64 in slot order; slots may mix dtypes.
  void (*mean)(float* out, const void* const* srcs, const DType* dtypes, int m, int64_t begin,
               int64_t end);
};

// The widest instruction set this CPU and OS support, before any check of its results.
Isa detected_isa();
// The widest set at or below detected_isa() whose kernels reproduce the scalar path bit for bit
// on a small fixed input (avx512 -> avx2 -> scalar, neon -> scalar). Checked once per process, at
// first use: a vector path that a compiler, an emulator or a hypervisor gets wrong would
// otherwise corrupt every average silently, while the scalar path is only slower.
Isa best_isa();
// The sets at or below detected_isa() whose results differed (set_isa refuses them too), widest
// first; empty normally.
const std::vector<Isa>& rejected_isas();
// The check behind best_isa() for one set: its kernel table against the scalar table (false for
// a set this host cannot run).
// Test seam: OFFLOAD_EMA_ISA_CHECK_CORRUPT=<name>[,<name>...] flips one bit of the results the
// check sees for those sets (the kernels themselves are untouched), so the fallback can be
// exercised on a host whose vector paths are sound.
bool matches_scalar(Isa isa);
// The set the kernels use now: best_isa() unless lowered with set_isa (for tests, benchmarks).
Isa active_isa();
// Selects a set no wider than best_isa(); returns false (and changes nothing) otherwise.
bool set_isa(Isa isa);
const Kernels& active_kernels();

const char* isa_name(Isa isa);
bool isa_from_name(const std::string& name, Isa* out);

}  // namespace oe
