// Torch-free check of the kernel tables: every vector path this build has must give results
// bit-identical to the scalar path (both use one fused multiply-add per EMA element and float64
// sums in slot order for the mean). Built by tests/test_native.py for a foreign architecture
// (aarch64, run under qemu) so that the NEON path is compiled and checked on an x86 host.
//
//   g++ -O3 -std=c++17 -I csrc tests/native/kernel_selftest.cpp csrc/kernels.cpp
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "kernels.h"
#include "scalar.h"

namespace {

int failures = 0;

void expect_equal(const std::vector<float>& got, const std::vector<float>& want, const char* what,
                  const char* isa, int64_t n) {
  if (std::memcmp(got.data(), want.data(), n * sizeof(float)) != 0) {
    for (int64_t i = 0; i < n; ++i) {
      if (std::memcmp(&got[i], &want[i], sizeof(float)) != 0) {
        std::printf("FAIL %s isa=%s n=%" PRId64 " first mismatch at %" PRId64 ": %a vs %a\n", what,
                    isa, n, i, got[i], want[i]);
        break;
      }
    }
    ++failures;
  }
}

std::vector<uint16_t> to_bf16(const std::vector<float>& x) {
  std::vector<uint16_t> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    uint32_t u;
    std::memcpy(&u, &x[i], 4);
    out[i] = static_cast<uint16_t>(u >> 16);
  }
  return out;
}

}  // namespace

int main() {
  using namespace oe;
  std::mt19937 rng(1234);
  std::normal_distribution<float> normal(0.f, 2.f);
  std::uniform_int_distribution<int> any16(0, 65535);
  const Isa best = best_isa();
  std::printf("best isa: %s\n", isa_name(best));
  for (int64_t n : {0, 1, 3, 15, 17, 33, 1031, 70001}) {
    std::vector<float> a0(n), s32(n);
    std::vector<uint16_t> s16(n);  // random bit patterns: also NaN, Inf and subnormal halves
    for (auto& v : a0) v = normal(rng);
    for (auto& v : s32) v = normal(rng);
    for (auto& v : s16) v = static_cast<uint16_t>(any16(rng));
    const std::vector<uint16_t> sbf = to_bf16(s32);
    const void* srcs[3] = {s32.data(), sbf.data(), s16.data()};
    const DType dts[3] = {DType::kFloat32, DType::kBFloat16, DType::kFloat16};

    std::vector<std::vector<float>> want_ema(3), want_multi(6), want_mean(1);
    for (Isa isa : {Isa::kScalar, best}) {
      if (!set_isa(isa)) {
        std::printf("FAIL set_isa(%s)\n", isa_name(isa));
        return 1;
      }
      const Kernels& k = active_kernels();
      for (int d = 0; d < 3; ++d) {
        std::vector<float> a = a0;
        k.ema[d](a.data(), srcs[d], 0, n, 0.125f);
        if (isa == Isa::kScalar) want_ema[d] = a; else expect_equal(a, want_ema[d], "ema", isa_name(isa), n);
        std::vector<float> m0 = a0, m1 = s32;
        float* avgs[2] = {m0.data(), m1.data()};
        const float ws[2] = {0.001f, 0.9f};
        k.ema_multi[d](avgs, ws, 2, srcs[d], 0, n);
        if (isa == Isa::kScalar) {
          want_multi[2 * d] = m0;
          want_multi[2 * d + 1] = m1;
        } else {
          expect_equal(m0, want_multi[2 * d], "ema_multi[0]", isa_name(isa), n);
          expect_equal(m1, want_multi[2 * d + 1], "ema_multi[1]", isa_name(isa), n);
        }
      }
      std::vector<float> out(n);
      k.mean(out.data(), srcs, dts, 3, 0, n);
      if (isa == Isa::kScalar) want_mean[0] = out; else expect_equal(out, want_mean[0], "mean", isa_name(isa), n);
    }
    // The scalar path itself against a direct float64 evaluation.
    for (int64_t i = 0; i < n; ++i) {
      const double exact = static_cast<double>(a0[i]) + 0.125 * (static_cast<double>(s32[i]) - a0[i]);
      const double bound = 4 * 0x1p-24 * (std::fabs(exact) + 0.125 * std::fabs(s32[i] - a0[i])) + 0x1p-149;
      if (!(std::fabs(want_ema[0][i] - exact) <= bound)) {
        std::printf("FAIL scalar ema vs float64 at %" PRId64 "\n", i);
        ++failures;
        break;
      }
    }
  }
  set_isa(best);
  std::printf("%s\n", failures ? "FAILED" : "OK");
  return failures ? 1 : 0;
}
