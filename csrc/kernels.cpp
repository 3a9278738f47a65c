// Runtime dispatch for the averaging kernels: one copy of kernels_isa.inc per instruction set,
// plus the scalar path, chosen once from what the CPU (and, for AVX, the OS) supports and from
// which vector paths actually reproduce the scalar path's bits on this host.
#include "kernels.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "simd.h"

// ---- scalar path: every host -------------------------------------------------------------
namespace oe {
namespace scalar_isa {
namespace {

template <class T>
void ema(float* avg, const void* src, int64_t begin, int64_t end, float w) {
  scalar::ema(avg + begin, static_cast<const T*>(src) + begin, end - begin, w);
}

template <class T>
void ema_multi(float* const* avgs, const float* ws, int k, const void* src, int64_t begin,
               int64_t end) {
  for (int j = 0; j < k; ++j) ema<T>(avgs[j], src, begin, end, ws[j]);
}

template <class T>
void ema_fold(float* const* avgs, const float* ws, int m, const void* const* srcs, int K,
              int64_t begin, int64_t end) {
  const T* s[kMaxFold];
  for (int k = 0; k < K; ++k) s[k] = static_cast<const T*>(srcs[k]);
  for (int j = 0; j < m; ++j) scalar::fold(avgs[j], s, ws + j * K, K, begin, end);
}

}  // namespace

const Kernels& table() {
  static const Kernels k = {
      {&ema<float>, &ema<bf16_t>, &ema<fp16_t>},
      {&ema_multi<float>, &ema_multi<bf16_t>, &ema_multi<fp16_t>},
      {&ema_fold<float>, &ema_fold<bf16_t>, &ema_fold<fp16_t>},
      &scalar::mean,
  };
  return k;
}

}  // namespace scalar_isa
}  // namespace oe

// ---- vector paths --------------------------------------------------------------------------
#if defined(OE_X86)
#define OE_ISA_NS avx2
#define OE_VEC VecAvx2
#define OE_TARGET OE_TARGET_AVX2
#include "kernels_isa.inc"
#undef OE_ISA_NS
#undef OE_VEC
#undef OE_TARGET

#define OE_ISA_NS avx512
#define OE_VEC VecAvx512
#define OE_TARGET OE_TARGET_AVX512
#include "kernels_isa.inc"
#undef OE_ISA_NS
#undef OE_VEC
#undef OE_TARGET
#elif defined(OE_NEON)
#define OE_ISA_NS neon
#define OE_VEC VecNeon
#define OE_TARGET
#include "kernels_isa.inc"
#undef OE_ISA_NS
#undef OE_VEC
#undef OE_TARGET
#endif

// ---- dispatch ------------------------------------------------------------------------------
namespace oe {
namespace {

Isa detect() {
#if defined(OE_X86)
  // __builtin_cpu_supports also checks that the OS saves the wide registers (XGETBV), so a
  // hypervisor that hides AVX-512 state falls back to AVX2 instead of faulting.
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  if (avx2 && __builtin_cpu_supports("avx512f")) return Isa::kAvx512;
  if (avx2) return Isa::kAvx2;
  return Isa::kScalar;
#elif defined(OE_NEON)
  return Isa::kNeon;
#else
  return Isa::kScalar;
#endif
}

int rank(Isa isa) { return isa == Isa::kNeon ? 1 : static_cast<int>(isa); }

// Whether `isa` is `ceiling` or a set below it on the same architecture's chain.
bool within(Isa isa, Isa ceiling) {
  if (isa == Isa::kScalar) return true;
  if ((isa == Isa::kNeon) != (ceiling == Isa::kNeon)) return false;
  return rank(isa) <= rank(ceiling);
}

Isa narrower(Isa isa) { return isa == Isa::kAvx512 ? Isa::kAvx2 : Isa::kScalar; }

const Kernels& kernels_for(Isa isa) {
  switch (isa) {
#if defined(OE_X86)
    case Isa::kAvx2: return avx2::table();
    case Isa::kAvx512: return avx512::table();
#elif defined(OE_NEON)
    case Isa::kNeon: return neon::table();
#endif
    default: return scalar_isa::table();
  }
}

// ---- the check behind best_isa() ----
// 413 elements: for every vector width (4, 8, 16 floats) this runs the two-vector loop, the
// one-vector loop (413 % 32 = 29, 413 % 16 = 13, 413 % 8 = 5) and an odd scalar tail.
constexpr int64_t kCheckN = 413;

uint32_t mix(uint32_t x) {  // a fixed integer hash: the same input on every host and run
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// A finite float with a random sign and mantissa and a binary exponent in [lo, hi] - 127.
float check_float(uint32_t seed, uint32_t lo, uint32_t hi) {
  const uint32_t h = mix(seed);
  const uint32_t exp = lo + (mix(seed ^ 0x9e3779b9u) % (hi - lo + 1));
  return bits_to_float((h & 0x807fffffu) | (exp << 23));
}

struct CheckInput {
  std::vector<float> avg, f32;
  std::vector<bf16_t> bf16;
  std::vector<fp16_t> fp16;
};

// No NaN or infinity: their payloads and signs are not part of the kernels' contract, and a
// false alarm would cost every run on this host its vector path.
CheckInput make_check_input() {
  CheckInput in;
  for (uint32_t i = 0; i < kCheckN; ++i) {
    in.avg.push_back(check_float(4 * i, 120, 134));
    in.f32.push_back(check_float(4 * i + 1, 110, 140));
    uint32_t u;
    const float b = check_float(4 * i + 2, 110, 140);
    std::memcpy(&u, &b, sizeof u);
    in.bf16.push_back(bf16_t{static_cast<uint16_t>(u >> 16)});
    // Any finite half, subnormals included: clearing the top exponent bit of an Inf/NaN pattern.
    uint16_t x = static_cast<uint16_t>(mix(4 * i + 3));
    if ((x & 0x7c00u) == 0x7c00u) x &= 0xbfffu;
    in.fp16.push_back(fp16_t{x});
  }
  // The widening edge cases, placed in vector bodies: signed zeros, the smallest subnormal, 65504.
  in.fp16[2].x = 0x0000;
  in.fp16[3].x = 0x8000;
  in.fp16[5].x = 0x0001;
  in.fp16[7].x = 0x7bff;
  return in;
}

// Every kernel of one table on the check input, all results in one buffer.
std::vector<float> run_check(const Kernels& k, const CheckInput& in) {
  const int64_t n = kCheckN;
  const void* srcs[kNumDTypes] = {in.f32.data(), in.bf16.data(), in.fp16.data()};
  const float ws[3] = {0.37f, 1e-3f, 1.0f};
  std::vector<float> out;
  for (int d = 0; d < kNumDTypes; ++d) {
    std::vector<float> a = in.avg;
    k.ema[d](a.data(), srcs[d], 0, n, ws[0]);
    out.insert(out.end(), a.begin(), a.end());
    std::vector<float> m0 = in.avg, m1 = in.avg, m2 = in.f32;
    float* avgs[3] = {m0.data(), m1.data(), m2.data()};
    k.ema_multi[d](avgs, ws, 3, srcs[d], 0, n);
    for (const auto* m : {&m0, &m1, &m2}) out.insert(out.end(), m->begin(), m->end());
    // Three snapshots (the one source thrice) folded into two accumulators.
    std::vector<float> f0 = in.avg, f1 = in.f32;
    float* folds[2] = {f0.data(), f1.data()};
    const void* snaps[3] = {srcs[d], srcs[d], srcs[d]};
    const float fws[6] = {0.37f, 1e-3f, 1.0f, 0.5f, 0.25f, 0.125f};
    k.ema_fold[d](folds, fws, 2, snaps, 3, 0, n);
    for (const auto* f : {&f0, &f1}) out.insert(out.end(), f->begin(), f->end());
  }
  const void* slots[3] = {in.fp16.data(), in.f32.data(), in.bf16.data()};
  const DType dts[3] = {DType::kFloat16, DType::kFloat32, DType::kBFloat16};
  std::vector<float> mean(n);
  k.mean(mean.data(), slots, dts, 3, 0, n);
  out.insert(out.end(), mean.begin(), mean.end());
  return out;
}

bool corruption_requested(Isa isa) {
  const char* env = std::getenv("OFFLOAD_EMA_ISA_CHECK_CORRUPT");
  if (env == nullptr) return false;
  const std::string list = std::string(",") + env + ",";
  return list.find(std::string(",") + isa_name(isa) + ",") != std::string::npos;
}

struct IsaChoice {
  Isa best;
  std::vector<Isa> rejected;
};

const IsaChoice& isa_choice() {
  // A function-local static: the check runs once, on the first caller's thread, and concurrent
  // first callers wait for it instead of using an unchecked set.
  static const IsaChoice choice = [] {
    IsaChoice c{Isa::kScalar, {}};
    bool found = false;
    // Every set of the chain is checked, not only down to the first that passes: set_isa may
    // later select a narrower one, and that must not be a set with wrong results either.
    for (Isa isa = detected_isa(); isa != Isa::kScalar; isa = narrower(isa)) {
      if (!matches_scalar(isa)) {
        c.rejected.push_back(isa);
      } else if (!found) {
        c.best = isa;
        found = true;
      }
    }
    return c;
  }();
  return choice;
}

std::atomic<int>& active_slot() {
  static std::atomic<int> slot{static_cast<int>(best_isa())};
  return slot;
}

}  // namespace

Isa detected_isa() {
  static const Isa isa = detect();
  return isa;
}

bool matches_scalar(Isa isa) {
  if (!within(isa, detected_isa())) return false;  // its instructions would fault here
  if (isa == Isa::kScalar) return true;
  const CheckInput in = make_check_input();
  const std::vector<float> want = run_check(scalar_isa::table(), in);
  std::vector<float> got = run_check(kernels_for(isa), in);
  if (corruption_requested(isa)) {
    uint32_t u;
    std::memcpy(&u, &got[got.size() / 2], sizeof u);
    u ^= 1u;
    std::memcpy(&got[got.size() / 2], &u, sizeof u);
  }
  return got.size() == want.size() &&
         std::memcmp(got.data(), want.data(), got.size() * sizeof(float)) == 0;
}

Isa best_isa() { return isa_choice().best; }

const std::vector<Isa>& rejected_isas() { return isa_choice().rejected; }

Isa active_isa() { return static_cast<Isa>(active_slot().load(std::memory_order_relaxed)); }

bool set_isa(Isa isa) {
  if (!within(isa, best_isa())) return false;
  active_slot().store(static_cast<int>(isa), std::memory_order_relaxed);
  return true;
}

const Kernels& active_kernels() { return kernels_for(active_isa()); }

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    case Isa::kNeon: return "neon";
    default: return "scalar";
  }
}

bool isa_from_name(const std::string& name, Isa* out) {
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512, Isa::kNeon}) {
    if (name == isa_name(isa)) {
      *out = isa;
      return true;
    }
  }
  return false;
}

}  // namespace oe
