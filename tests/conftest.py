import faulthandler
import os
import sys

import pytest
import torch

from offload_ema import ops


def _cpp_isas():
    if ops.backend() != "cpp":
        return []
    order = {"x86": ["scalar", "avx2", "avx512"], "arm": ["scalar", "neon"]}
    best = ops._C.best_isa()
    chain = order["arm"] if best == "neon" else order["x86"]
    return chain[: chain.index(best) + 1]


CPP_BACKENDS = [f"cpp-{isa}" for isa in _cpp_isas()]
ALL_BACKENDS = CPP_BACKENDS + ["torch"]


@pytest.fixture(params=ALL_BACKENDS)
def backend(request, monkeypatch):
    """Runs a test once per kernel path: each instruction set the C++ kernels can use on this
    host, and the pure-torch fallback."""
    name = request.param
    if name == "torch":
        monkeypatch.setattr(ops, "_C", None)
    else:
        ops.set_isa(name.split("-", 1)[1])
    yield name
    if name != "torch":
        ops.set_isa("best")


@pytest.fixture(params=CPP_BACKENDS or [pytest.param("cpp", marks=pytest.mark.skip("C++ kernels not built"))])
def cpp_backend(request):
    ops.set_isa(request.param.split("-", 1)[1])
    yield request.param
    ops.set_isa("best")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# No test may hang the suite: one that runs past this many seconds dumps every thread's stack
# and ends the run with an error (each test's own waits have shorter timeouts that fail it).
TEST_TIMEOUT = float(os.environ.get("OFFLOAD_EMA_TEST_TIMEOUT", "600"))


def _stderr_fd(config) -> int:
    """The terminal's stderr, not pytest's capture of it (lost when the process exits)."""
    try:
        from _pytest.faulthandler import fault_handler_stderr_fd_key
        return config.stash[fault_handler_stderr_fd_key]
    except (ImportError, KeyError):
        return sys.__stderr__.fileno()


@pytest.fixture(autouse=True)
def _no_hang(request):
    faulthandler.dump_traceback_later(TEST_TIMEOUT, exit=True, file=_stderr_fd(request.config))
    yield
    faulthandler.cancel_dump_traceback_later()
