// A multi-tensor host copy planned once (see host_copy.cpp), exposed to Python as _C.HostCopy.
#pragma once

#include <torch/extension.h>

namespace oe {

void bind_host_copy(pybind11::module_& m);

}  // namespace oe
