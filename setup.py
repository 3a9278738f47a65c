"""Build offload_ema and its C++ kernels against the torch already installed.

    pip install --no-build-isolation -e .

--no-build-isolation makes the build use the installed torch instead of fetching another one.
No -march flag is used: the kernels pick their instruction set at run time (csrc/simd.h), so a
wheel built here runs on any x86-64 or aarch64 host.
"""
import os
import sys

from setuptools import find_packages, setup

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:
    sys.exit("offload_ema compiles its C++ kernels against the torch already installed, and pip's "
             "isolated build environment has none (an isolated build would fetch a second, "
             "multi-GB torch). Install torch first (e.g. pip install torch), then:\n"
             "    pip install --no-build-isolation .")

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version():
    with open(os.path.join(HERE, "offload_ema", "_version.py")) as f:
        scope = {}
        exec(f.read(), scope)
    return scope["__version__"]


ext_modules = []
if os.environ.get("OFFLOAD_EMA_SKIP_CPP_BUILD") != "1":
    ext_modules.append(
        CppExtension(
            name="offload_ema._C",
            sources=["csrc/ops.cpp", "csrc/kernels.cpp", "csrc/thread_pool.cpp",
                     "csrc/host_copy.cpp"],
            depends=["csrc/kernels.h", "csrc/kernels_isa.inc", "csrc/scalar.h", "csrc/simd.h",
                     "csrc/thread_pool.h", "csrc/host_copy.h"],
            # No -ffast-math: NaN and Inf must propagate exactly as in the float64 reference.
            extra_compile_args=["-O3", "-std=c++17", "-fno-strict-aliasing"],
            extra_link_args=["-lpthread"],
        )
    )

setup(
    name="offload_ema",
    version=read_version(),
    description="Asynchronous CPU-offloaded weight averaging (EMA, LAWA) for PyTorch training",
    packages=find_packages(include=["offload_ema", "offload_ema.*"]),
    python_requires=">=3.9",
    # torch is not listed: pip would otherwise be free to fetch a (CUDA) build of its choosing.
    # Install torch first (README); the build uses whatever torch >= 2.4 is present.
    install_requires=["numpy", "psutil", "safetensors"],
    # Integrations and tools, each optional: `pip install --no-build-isolation -e .[lightning]`.
    # (DeepSpeed is left out: its sdist must be built with --no-build-isolation against the
    # installed torch, which an extra cannot ask for; `make deps` installs it that way.)
    extras_require={
        "lightning": ["lightning"],
        "transformers": ["transformers", "accelerate"],
        "diffusers": ["diffusers"],
        "bench": ["matplotlib", "scikit-learn"],
        "test": ["pytest", "lightning", "transformers", "accelerate", "diffusers", "matplotlib",
                 "scikit-learn"],
    },
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)},
    entry_points={"console_scripts": ["offload-ema = offload_ema.cli:main"]},
)
