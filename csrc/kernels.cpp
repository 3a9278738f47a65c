// Runtime dispatch for the averaging kernels: one copy of kernels_isa.inc per instruction set,
// plus the scalar path, chosen once from what the CPU (and, for AVX, the OS) supports.
#include "kernels.h"

#include <atomic>
#include <cstdlib>

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

}  // namespace

const Kernels& table() {
  static const Kernels k = {
      {&ema<float>, &ema<bf16_t>, &ema<fp16_t>},
      {&ema_multi<float>, &ema_multi<bf16_t>, &ema_multi<fp16_t>},
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

Isa detect_isa() {
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

std::atomic<int>& active_slot() {
  static std::atomic<int> slot{static_cast<int>(best_isa())};
  return slot;
}

}  // namespace

Isa best_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

Isa active_isa() { return static_cast<Isa>(active_slot().load(std::memory_order_relaxed)); }

bool set_isa(Isa isa) {
  const Isa best = best_isa();
  const bool arm = best == Isa::kNeon;
  if ((isa == Isa::kNeon) != arm && isa != Isa::kScalar) return false;
  if (rank(isa) > rank(best)) return false;
  active_slot().store(static_cast<int>(isa), std::memory_order_relaxed);
  return true;
}

const Kernels& active_kernels() {
  switch (active_isa()) {
#if defined(OE_X86)
    case Isa::kAvx2: return avx2::table();
    case Isa::kAvx512: return avx512::table();
#elif defined(OE_NEON)
    case Isa::kNeon: return neon::table();
#endif
    default: return scalar_isa::table();
  }
}

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
