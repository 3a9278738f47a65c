// Many host-to-host copies in one call, planned once: a CPU-only model's snapshot copied into
// staging (thousands of small parameters). torch._foreach_copy_ on CPU costs about a microsecond
// of dispatch per tensor; here a call costs one pointer check per tensor plus the bytes, split
// across the library's threads by bytes, not by tensor.
#include "host_copy.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "thread_pool.h"

namespace oe {
namespace {

// Bytes per thread before another thread pays (as the kernels' grain, ops.cpp): a copy reads
// and writes each byte once.
constexpr int64_t kCopyGrain = int64_t{2} << 20;

class HostCopy {
 public:
  // dsts[i] <- srcs[i]: CPU tensors, contiguous, same dtype and element count. Both lists are
  // held (their storages stay alive as long as this plan).
  HostCopy(std::vector<at::Tensor> dsts, std::vector<at::Tensor> srcs)
      : dsts_(std::move(dsts)), srcs_(std::move(srcs)) {
    TORCH_CHECK_VALUE(dsts_.size() == srcs_.size(), "dsts and srcs must have the same length, got ",
                      dsts_.size(), " and ", srcs_.size());
    offsets_.reserve(srcs_.size() + 1);
    offsets_.push_back(0);
    for (size_t i = 0; i < srcs_.size(); ++i) {
      const at::Tensor &d = dsts_[i], &s = srcs_[i];
      const std::string idx = "[" + std::to_string(i) + "]";
      TORCH_CHECK_VALUE(d.device().is_cpu() && s.device().is_cpu(), "dsts", idx, " and srcs", idx,
                        " must be CPU tensors");
      TORCH_CHECK_VALUE(d.is_contiguous() && s.is_contiguous(), "dsts", idx, " and srcs", idx,
                        " must be contiguous");
      TORCH_CHECK_TYPE(d.scalar_type() == s.scalar_type(), "dsts", idx,
                       " must have the dtype of srcs", idx, " (", s.scalar_type(), "), got ",
                       d.scalar_type());
      TORCH_CHECK_VALUE(d.numel() == s.numel(), "dsts", idx, " must have the element count of srcs",
                        idx, " (", s.numel(), "), got ", d.numel());
      TORCH_CHECK_VALUE(fits(s) && fits(d), "dsts", idx, " and srcs", idx, " must lie inside their "
                        "storage (was one freed or shrunk with untyped_storage().resize_()?)");
      dst_ptrs_.push_back(static_cast<char*>(d.data_ptr()));
      src_ptrs_.push_back(static_cast<const char*>(s.data_ptr()));
      offsets_.push_back(offsets_.back() + static_cast<int64_t>(s.nbytes()));
    }
  }

  // Copies every source; returns -1, or the index of the first source whose memory is no longer
  // the one planned (a storage reallocated or freed in place: the old address may be freed
  // memory), in which case nothing is copied.
  int64_t run() const {
    // torch's resize of a CPU storage (untyped_storage().resize_(), at::native::resize_bytes_cpu)
    // allocates the new memory before it frees the old, or sets nullptr for 0 bytes: an
    // unchanged address is the planned, live memory. The destinations
    // are staging, which nothing else resizes.
    for (size_t i = 0; i < srcs_.size(); ++i) {
      if (srcs_[i].data_ptr() != src_ptrs_[i]) return static_cast<int64_t>(i);
    }
    const int64_t total = offsets_.back();
    parallel_for(total, kCopyGrain, 64, [&](int64_t begin, int64_t end) {
      // The copies overlapping [begin, end) of the concatenated bytes.
      size_t i = std::upper_bound(offsets_.begin(), offsets_.end(), begin) - offsets_.begin() - 1;
      for (; i + 1 < offsets_.size() && offsets_[i] < end; ++i) {
        const int64_t lo = std::max(begin, offsets_[i]), hi = std::min(end, offsets_[i + 1]);
        const int64_t off = lo - offsets_[i];
        if (hi > lo) std::memcpy(dst_ptrs_[i] + off, src_ptrs_[i] + off, size_t(hi - lo));
      }
    });
    return -1;
  }

  int64_t nbytes() const { return offsets_.back(); }
  size_t size() const { return srcs_.size(); }

 private:
  static bool fits(const at::Tensor& t) {
    return t.numel() == 0 || (t.data_ptr() != nullptr &&
                              t.storage().nbytes() >= static_cast<size_t>(t.storage_offset() *
                                                                          t.element_size()) +
                                                          t.nbytes());
  }

  std::vector<at::Tensor> dsts_, srcs_;
  std::vector<char*> dst_ptrs_;
  std::vector<const char*> src_ptrs_;
  std::vector<int64_t> offsets_;  // offsets_[i]: bytes before copy i; back(): all bytes
};

}  // namespace

void bind_host_copy(pybind11::module_& m) {
  pybind11::class_<HostCopy>(m, "HostCopy",
                             "Host copies dsts[i] <- srcs[i], planned once, run in one call.")
      .def(pybind11::init<std::vector<at::Tensor>, std::vector<at::Tensor>>(),
           pybind11::arg("dsts"), pybind11::arg("srcs"))
      // The training thread runs meanwhile (the worker calls this).
      .def("run", &HostCopy::run, pybind11::call_guard<pybind11::gil_scoped_release>(),
           "Copies all; returns -1, or the index of a source whose memory moved (nothing copied).")
      .def_property_readonly("nbytes", &HostCopy::nbytes)
      .def("__len__", &HostCopy::size);
}

}  // namespace oe
