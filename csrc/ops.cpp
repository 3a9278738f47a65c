// Torch glue: argument checks, the split of each call across the library's threads, operator
// registration, and a small Python module for thread count and instruction-set control.
// Importing the Python module offload_ema._C runs the TORCH_LIBRARY registrations below.
#include <torch/extension.h>

#include <algorithm>
#include <string>
#include <vector>

#include "host_copy.h"
#include "kernels.h"
#include "thread_pool.h"

namespace oe {
namespace {

// Bytes a call moves per thread before another thread pays: waking a pool worker costs tens of
// microseconds (a futex wake; ~35 us measured on a 2-vCPU VM), and moving 4 MiB takes ~400 us at
// 10 GB/s on one core. Below this, extra threads made calls slower (bench/kernels.py --sweep).
constexpr int64_t kGrainBytes = int64_t{4} << 20;

int64_t grain(int64_t bytes_per_element) {
  return std::max<int64_t>(kGrainBytes / std::max<int64_t>(bytes_per_element, 1), 4096);
}

int64_t source_bytes(DType dt) { return dt == DType::kFloat32 ? 4 : 2; }
// Chunk boundaries on whole cache lines and whole vectors (64 floats).
constexpr int64_t kAlign = 64;

void check_cpu_contiguous(const at::Tensor& t, const std::string& name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous (call .contiguous() first)");
}

void check_accumulator(const at::Tensor& t, const std::string& name) {
  check_cpu_contiguous(t, name);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, name, " must be float32, got ",
                   t.scalar_type());
}

DType check_source(const at::Tensor& t, const std::string& name, const at::Tensor& like,
                   const std::string& like_name) {
  check_cpu_contiguous(t, name);
  TORCH_CHECK_VALUE(t.sizes() == like.sizes(), name, " must have the shape of ", like_name, " ",
                    like.sizes(), ", got ", t.sizes());
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default:
      TORCH_CHECK_TYPE(false, name, " must be float32, bfloat16 or float16, got ",
                       t.scalar_type());
  }
  return DType::kFloat32;  // unreachable
}

void check_weight(double w, const std::string& name) {
  // Written so that NaN fails too.
  TORCH_CHECK_VALUE(w >= 0.0 && w <= 1.0, name, " must be in [0, 1], got ", w);
}

std::string item(const char* list, size_t i) {
  return std::string(list) + "[" + std::to_string(i) + "]";
}

void ema_update_(at::Tensor& avg, const at::Tensor& src, double weight) {
  check_accumulator(avg, "avg");
  const DType dt = check_source(src, "src", avg, "avg");
  check_weight(weight, "weight");
  auto* kernel = active_kernels().ema[static_cast<int>(dt)];
  float* a = avg.data_ptr<float>();
  const void* s = src.data_ptr();
  const float w = static_cast<float>(weight);
  parallel_for(avg.numel(), grain(8 + source_bytes(dt)), kAlign,
               [&](int64_t b, int64_t e) { kernel(a, s, b, e, w); });
}

void ema_update_multi_(at::TensorList avgs, const at::Tensor& src, at::ArrayRef<double> weights) {
  TORCH_CHECK_VALUE(avgs.size() == weights.size(), "weights must have one entry per avgs tensor (",
                    avgs.size(), "), got ", weights.size());
  if (avgs.empty()) {
    check_cpu_contiguous(src, "src");
    return;
  }
  std::vector<float*> ptrs(avgs.size());
  std::vector<float> ws(avgs.size());
  DType dt = DType::kFloat32;
  for (size_t j = 0; j < avgs.size(); ++j) {
    check_accumulator(avgs[j], item("avgs", j));
    check_weight(weights[j], item("weights", j));
    if (j == 0) dt = check_source(src, "src", avgs[0], "avgs[0]");
    TORCH_CHECK_VALUE(avgs[j].sizes() == src.sizes(), item("avgs", j), " must have the shape of src ",
                      src.sizes(), ", got ", avgs[j].sizes());
    ptrs[j] = avgs[j].data_ptr<float>();
    ws[j] = static_cast<float>(weights[j]);
  }
  auto* kernel = active_kernels().ema_multi[static_cast<int>(dt)];
  const void* s = src.data_ptr();
  const int k = static_cast<int>(ptrs.size());
  parallel_for(src.numel(), grain(8 * k + source_bytes(dt)), kAlign,
               [&](int64_t b, int64_t e) { kernel(ptrs.data(), ws.data(), k, s, b, e); });
}

void ema_fold_(at::TensorList avgs, at::TensorList srcs, at::ArrayRef<double> weights) {
  const size_t m = avgs.size(), K = srcs.size();
  TORCH_CHECK_VALUE(K >= 1 && K <= static_cast<size_t>(kMaxFold), "srcs must hold 1 to ",
                    kMaxFold, " snapshots, got ", K);
  TORCH_CHECK_VALUE(weights.size() == m * K, "weights must have one entry per (avgs tensor, "
                    "srcs tensor) pair (", m, " x ", K, " = ", m * K, "), got ", weights.size());
  if (m == 0) {
    for (size_t k = 0; k < K; ++k) check_cpu_contiguous(srcs[k], item("srcs", k));
    return;
  }
  std::vector<float*> ptrs(m);
  std::vector<float> ws(m * K);
  std::vector<const void*> sp(K);
  DType dt = DType::kFloat32;
  for (size_t j = 0; j < m; ++j) {
    check_accumulator(avgs[j], item("avgs", j));
    TORCH_CHECK_VALUE(avgs[j].sizes() == avgs[0].sizes(), item("avgs", j), " must have the shape "
                      "of avgs[0] ", avgs[0].sizes(), ", got ", avgs[j].sizes());
    ptrs[j] = avgs[j].data_ptr<float>();
  }
  for (size_t k = 0; k < K; ++k) {
    const DType d = check_source(srcs[k], item("srcs", k), avgs[0], "avgs[0]");
    if (k == 0) dt = d;
    TORCH_CHECK_TYPE(d == dt, item("srcs", k), " must have the dtype of srcs[0] (",
                     srcs[0].scalar_type(), "), got ", srcs[k].scalar_type());
    sp[k] = srcs[k].data_ptr();
  }
  for (size_t i = 0; i < m * K; ++i) {
    check_weight(weights[i], item("weights", i));
    ws[i] = static_cast<float>(weights[i]);
  }
  auto* kernel = active_kernels().ema_fold[static_cast<int>(dt)];
  const int mi = static_cast<int>(m), Ki = static_cast<int>(K);
  parallel_for(avgs[0].numel(), grain(8 * mi + Ki * source_bytes(dt)), kAlign,
               [&](int64_t b, int64_t e) {
    kernel(ptrs.data(), ws.data(), mi, sp.data(), Ki, b, e);
  });
}

void mean_(at::Tensor& out, at::TensorList srcs) {
  check_accumulator(out, "out");
  TORCH_CHECK_VALUE(!srcs.empty(), "srcs must hold at least one tensor");
  std::vector<const void*> ptrs(srcs.size());
  std::vector<DType> dts(srcs.size());
  for (size_t j = 0; j < srcs.size(); ++j) {
    dts[j] = check_source(srcs[j], item("srcs", j), out, "out");
    ptrs[j] = srcs[j].data_ptr();
  }
  auto* kernel = active_kernels().mean;
  float* o = out.data_ptr<float>();
  const int m = static_cast<int>(ptrs.size());
  int64_t bytes = 4;
  for (DType d : dts) bytes += source_bytes(d);
  parallel_for(out.numel(), grain(bytes), kAlign,
               [&](int64_t b, int64_t e) { kernel(o, ptrs.data(), dts.data(), m, b, e); });
}

// Copies srcs[i] into dsts[i] (non_blocking) with ``stream`` current, restoring the caller's
// stream before returning. One call from Python: an interrupt (KeyboardInterrupt, delivered
// between bytecodes) cannot land between the switch to the copy stream and the switch back,
// as it can between the enter and exit of ``with torch.cuda.stream(...)``. A source with
// starts[i] >= 0 is read as elements [starts[i], ends[i]) of its flattening; for a
// non-contiguous tensor that is a kernel, run here on the copy stream, which orders it before
// the copy that reads its output. Device-agnostic (c10::StreamGuard dispatches to the stream's
// device), so this CPU-built extension serves CUDA streams once torch's CUDA library is loaded.
void copy_on_stream(std::vector<at::Tensor> dsts, std::vector<at::Tensor> srcs,
                    const std::vector<int64_t>& starts, const std::vector<int64_t>& ends,
                    int64_t stream_id, int64_t device_index, int64_t device_type) {
  TORCH_CHECK_VALUE(dsts.size() == srcs.size(), "dsts and srcs must have the same length, got ",
                    dsts.size(), " and ", srcs.size());
  TORCH_CHECK_VALUE(starts.size() == srcs.size() && ends.size() == srcs.size(),
                    "starts and ends must have one entry per source, got ", starts.size(),
                    " and ", ends.size(), " for ", srcs.size());
  c10::StreamGuard guard(c10::Stream::unpack3(stream_id,
                                              static_cast<c10::DeviceIndex>(device_index),
                                              static_cast<c10::DeviceType>(device_type)));
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < srcs.size(); ++i) {
    if (starts[i] >= 0) srcs[i] = srcs[i].reshape(-1).slice(0, starts[i], ends[i]);
  }
  if (!dsts.empty()) at::_foreach_copy_(dsts, srcs, /*non_blocking=*/true);
}

}  // namespace
}  // namespace oe

// Each op is declared once; (a!) marks the tensors it writes.
TORCH_LIBRARY(offload_ema, m) {
  m.def("ema_update_(Tensor(a!) avg, Tensor src, float weight) -> ()");
  m.def("ema_update_multi_(Tensor(a!)[] avgs, Tensor src, float[] weights) -> ()");
  m.def("ema_fold_(Tensor(a!)[] avgs, Tensor[] srcs, float[] weights) -> ()");
  m.def("mean_(Tensor(a!) out, Tensor[] srcs) -> ()");
}

TORCH_LIBRARY_IMPL(offload_ema, CPU, m) {
  m.impl("ema_update_", &oe::ema_update_);
  m.impl("ema_update_multi_", &oe::ema_update_multi_);
  m.impl("ema_fold_", &oe::ema_fold_);
  m.impl("mean_", &oe::mean_);
}

// The kernels work on host memory only. Registered for CUDA too, so that a CUDA tensor gets the
// argument check's message ("src must be a CPU tensor, got one on cuda:0") instead of the
// dispatcher's "could not run with arguments from the CUDA backend".
TORCH_LIBRARY_IMPL(offload_ema, CUDA, m) {
  m.impl("ema_update_", &oe::ema_update_);
  m.impl("ema_update_multi_", &oe::ema_update_multi_);
  m.impl("ema_fold_", &oe::ema_fold_);
  m.impl("mean_", &oe::mean_);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "offload_ema C++ kernels; importing this module registers torch.ops.offload_ema.*";
  m.def("copy_on_stream", &oe::copy_on_stream,
        "Non-blocking copies srcs -> dsts with a given stream current (restored on return).",
        py::arg("dsts"), py::arg("srcs"), py::arg("starts"), py::arg("ends"),
        py::arg("stream_id"), py::arg("device_index"), py::arg("device_type"),
        // As torch's own bindings of _foreach_copy_: other threads (training's) run meanwhile.
        py::call_guard<py::gil_scoped_release>());
  oe::bind_host_copy(m);
  m.def("get_num_threads", &oe::get_num_threads, "Threads a kernel call may use.");
  m.def("set_num_threads", &oe::set_num_threads, "Sets the threads a kernel call may use (>= 1).");
  m.def("isa", [] { return std::string(oe::isa_name(oe::active_isa())); },
        "Instruction set the kernels use now.");
  m.def("best_isa", [] { return std::string(oe::isa_name(oe::best_isa())); },
        "Widest instruction set this host supports whose kernels match the scalar path.");
  m.def("detected_isa", [] { return std::string(oe::isa_name(oe::detected_isa())); },
        "Widest instruction set this CPU and OS support, before the check against scalar.");
  m.def(
      "rejected_isas",
      [] {
        std::vector<std::string> names;
        for (oe::Isa isa : oe::rejected_isas()) names.emplace_back(oe::isa_name(isa));
        return names;
      },
      "Instruction sets disabled because their kernels differed from scalar, widest first.");
  m.def(
      "matches_scalar",
      [](const std::string& name) {
        oe::Isa isa;
        TORCH_CHECK_VALUE(oe::isa_from_name(name, &isa), "isa must be one of scalar, avx2, avx512, neon, got '", name, "'");
        return oe::matches_scalar(isa);
      },
      "Runs the start-up check of one instruction set's kernels against the scalar kernels.");
  m.def(
      "set_isa",
      [](const std::string& name) {
        oe::Isa isa;
        TORCH_CHECK_VALUE(oe::isa_from_name(name, &isa), "isa must be one of scalar, avx2, avx512, neon, got '", name, "'");
        const auto& rejected = oe::rejected_isas();
        TORCH_CHECK_VALUE(std::find(rejected.begin(), rejected.end(), isa) == rejected.end(),
                          "isa '", name, "' gave results different from the scalar kernels on "
                          "this host and is disabled (best: ", oe::isa_name(oe::best_isa()), ")");
        TORCH_CHECK_VALUE(oe::set_isa(isa), "isa '", name, "' is not supported on this host (best: ",
                          oe::isa_name(oe::best_isa()), ")");
      },
      "Lowers the instruction set the kernels use (tests, benchmarks).");
}
