"""Averaging kernels on host tensors.

Each op updates float32 accumulators in place from a source tensor of float32, bfloat16 or
float16. The C++ kernels (``csrc/``) widen 16-bit sources in registers, update in one pass over
memory, run on the library's own threads (:func:`set_num_threads`) and release the GIL. Where the
extension is missing, or ``OFFLOAD_EMA_DISABLE_CPP=1`` is set, a pure-torch fallback computes the
same values (to float32 rounding), more slowly and on torch's own intra-op threads.

At first use the C++ kernels of the widest instruction set the CPU supports are run on a small
fixed input and compared bit for bit with the scalar kernels; a set that differs is never used
(avx512 -> avx2 -> scalar, neon -> scalar) and a RuntimeWarning says so, once per process.
"""
from __future__ import annotations

import os
import threading
import warnings
from typing import List, Optional, Sequence

import torch

from offload_ema.averages import check_int

__all__ = [
    "ema_update_",
    "ema_update_multi_",
    "mean_",
    "backend",
    "set_num_threads",
    "get_num_threads",
    "isa",
    "set_isa",
]

_DISABLE_ENV = "OFFLOAD_EMA_DISABLE_CPP"


def _load_extension():
    if os.environ.get(_DISABLE_ENV, "0") not in ("", "0"):
        return None
    try:
        # Importing _C registers torch.ops.offload_ema.* (TORCH_LIBRARY in csrc/ops.cpp).
        from offload_ema import _C
    except ImportError as exc:
        warnings.warn(
            f"offload_ema: C++ kernels unavailable ({exc}); using the pure-torch fallback, which "
            "is slower. Build them with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return _C


_C = _load_extension()

if _C is not None:
    # The ops only mutate their inputs: under fake tensors (torch.compile, opcheck) they do nothing.
    for _name in ("ema_update_", "ema_update_multi_", "mean_"):
        torch.library.register_fake(f"offload_ema::{_name}")(lambda *args: None)
    _ops = torch.ops.offload_ema


_isa_checked = False
_isa_check_lock = threading.Lock()


def _check_isa() -> None:
    """Runs the C++ check of the instruction sets (once per process) and warns if it fell back."""
    global _isa_checked
    with _isa_check_lock:
        if _isa_checked:
            return
        rejected = _C.rejected_isas()  # the first C++ call that needs the best set runs the check
        _isa_checked = True
    if rejected:
        warnings.warn(
            f"offload_ema: the {' and '.join(rejected)} kernels gave results different from the "
            f"scalar kernels on this CPU and are disabled; using {_C.best_isa()}. Please report "
            "this with your CPU model and compiler.",
            RuntimeWarning,
            stacklevel=3,
        )


def backend() -> str:
    """Which implementation is active: ``"cpp"`` or ``"torch"`` (the fallback)."""
    return "cpp" if _C is not None else "torch"


def _cpp():
    """The C++ ops (their instruction set checked once, at first use), or None: the fallback."""
    if _C is None:
        return None
    if not _isa_checked:
        _check_isa()
    return _ops


def ema_update_(avg: torch.Tensor, src: torch.Tensor, weight: float) -> None:
    """``avg += weight * (src - avg)`` in one pass; avg float32, src float32/bfloat16/float16."""
    cpp = _cpp()
    if cpp is not None:
        cpp.ema_update_(avg, src, float(weight))
    else:
        _torch_ema_multi([avg], src, [float(weight)])


def ema_update_multi_(avgs: Sequence[torch.Tensor], src: torch.Tensor,
                      weights: Sequence[float]) -> None:
    """``avgs[j] += weights[j] * (src - avgs[j])`` for every j, reading src from memory once."""
    avgs = list(avgs)
    weights = [float(w) for w in weights]
    cpp = _cpp()
    if cpp is not None:
        cpp.ema_update_multi_(avgs, src, weights)
    else:
        _torch_ema_multi(avgs, src, weights)


MAX_FOLD = 16  # snapshots one ema_fold_ call takes


def ema_fold_(avg: torch.Tensor, srcs: Sequence[torch.Tensor], weights: Sequence[float]) -> None:
    """Folds K snapshots into ``avg`` in one pass over memory: for k = 0 .. K-1 in order,
    ``avg += weights[k] * (srcs[k] - avg)``, bit-identical to K ``ema_update_`` calls. The srcs
    share one dtype (float32, bfloat16 or float16); 1 <= K <= 16."""
    ema_fold_multi_([avg], srcs, [list(weights)])


def ema_fold_multi_(avgs: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor],
                    weights: Sequence[Sequence[float]]) -> None:
    """``ema_fold_`` for several accumulators over the same K snapshots: ``weights[j][k]`` is
    accumulator j's weight for snapshot k; the snapshots are read from memory once per block."""
    avgs, srcs = list(avgs), list(srcs)
    if len(weights) != len(avgs):
        raise ValueError(f"weights must have one row per avgs tensor ({len(avgs)}), got "
                         f"{len(weights)}")
    flat = []
    for j, row in enumerate(weights):
        row = [float(w) for w in row]
        if len(row) != len(srcs):
            raise ValueError(f"weights[{j}] must have one entry per srcs tensor ({len(srcs)}), "
                             f"got {len(row)}")
        flat += row
    cpp = _cpp()
    if cpp is not None:
        cpp.ema_fold_(avgs, srcs, flat)
    else:
        _torch_fold(avgs, srcs, flat)


def mean_(out: torch.Tensor, srcs: Sequence[torch.Tensor]) -> None:
    """``out = mean(srcs)`` elementwise, summed in float64 in list order, rounded to float32."""
    srcs = list(srcs)
    cpp = _cpp()
    if cpp is not None:
        cpp.mean_(out, srcs)
    else:
        _torch_mean(out, srcs)


def host_copy_plan(dsts: List[torch.Tensor], srcs: List[torch.Tensor]):
    """A native copy of ``srcs[i]`` into ``dsts[i]`` (CPU, contiguous, same dtype and size),
    planned once: ``plan.run()`` copies all of them in one call, split across the library's
    threads by bytes, and returns -1, or the index of a source whose memory was reallocated
    since (nothing copied then). None with the pure-torch fallback (use ``torch._foreach_copy_``)."""
    if _C is None or not hasattr(_C, "HostCopy"):
        return None
    return _C.HostCopy(dsts, srcs)


_fallback_threads: Optional[int] = None


def set_num_threads(n: int) -> None:
    """Sets the threads one kernel call may use (the library's own, not torch's).

    The fallback records the number but runs on torch's intra-op threads.
    """
    check_int(n, "n", 1)
    global _fallback_threads
    if _C is not None:
        _C.set_num_threads(n)
    else:
        _fallback_threads = n


def get_num_threads() -> int:
    """Threads one kernel call may use: OFFLOAD_EMA_NUM_THREADS, else this process's CPUs (<= 16)."""
    if _C is not None:
        return _C.get_num_threads()
    if _fallback_threads is not None:
        return _fallback_threads
    env = os.environ.get("OFFLOAD_EMA_NUM_THREADS", "")
    if env.isdigit() and int(env) >= 1:
        return int(env)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cpus or 1, 16))


def isa() -> str:
    """Instruction set the C++ kernels use now (``avx512``, ``avx2``, ``neon``, ``scalar``), or
    ``"torch"`` for the fallback. Never a set that failed the check against the scalar kernels."""
    if _C is None:
        return "torch"
    if not _isa_checked:
        _check_isa()
    return _C.isa()


def set_isa(name: str) -> None:
    """Makes the C++ kernels use a narrower instruction set than the host's best (``"best"``
    restores it: the widest set that passed the check against the scalar kernels). Meant for
    tests and benchmarks: results are equal on every set."""
    if _C is None:
        raise RuntimeError("set_isa needs the C++ kernels; the active backend is 'torch'")
    if not _isa_checked:
        _check_isa()
    _C.set_isa(_C.best_isa() if name == "best" else name)


# ---- pure-torch fallback -------------------------------------------------------------------

_SOURCE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Elements per step of the fallback: bounds its temporaries to a few MiB whatever the tensor size.
_CHUNK = 1 << 20


def _check_cpu_contiguous(t, name):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU tensor, got one on {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first)")


def _check_accumulator(t, name):
    _check_cpu_contiguous(t, name)
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {t.dtype}")


def _check_source(t, name, like, like_name):
    _check_cpu_contiguous(t, name)
    if t.shape != like.shape:
        raise ValueError(f"{name} must have the shape of {like_name} {list(like.shape)}, "
                         f"got {list(t.shape)}")
    if t.dtype not in _SOURCE_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")


def _check_weight(w, name):
    if not 0.0 <= w <= 1.0:  # NaN fails too
        raise ValueError(f"{name} must be in [0, 1], got {w}")


@torch.no_grad()
def _torch_ema_multi(avgs, src, weights):
    single = len(avgs) == 1
    if len(avgs) != len(weights):
        raise ValueError(f"weights must have one entry per avgs tensor ({len(avgs)}), "
                         f"got {len(weights)}")
    for j, (a, w) in enumerate(zip(avgs, weights)):
        name = "avg" if single else f"avgs[{j}]"
        _check_accumulator(a, name)
        _check_weight(w, "weight" if single else f"weights[{j}]")
        if j == 0:
            _check_source(src, "src", a, name)
        elif a.shape != src.shape:
            raise ValueError(f"{name} must have the shape of src {list(src.shape)}, "
                             f"got {list(a.shape)}")
    if not avgs:
        _check_cpu_contiguous(src, "src")
        return
    s = src.view(-1)
    flats = [a.view(-1) for a in avgs]
    for b in range(0, s.numel(), _CHUNK):
        chunk = s[b:b + _CHUNK].float()
        for a, w in zip(flats, weights):
            part = a[b:b + _CHUNK]
            part.add_(chunk - part, alpha=w)


@torch.no_grad()
def _torch_fold(avgs, srcs, weights):
    """The C++ checks, then K single updates in order (what the kernel must equal)."""
    K = len(srcs)
    if not 1 <= K <= MAX_FOLD:
        raise ValueError(f"srcs must hold 1 to {MAX_FOLD} snapshots, got {K}")
    for j, a in enumerate(avgs):
        _check_accumulator(a, f"avgs[{j}]")
        if a.shape != avgs[0].shape:
            raise ValueError(f"avgs[{j}] must have the shape of avgs[0] {list(avgs[0].shape)}, "
                             f"got {list(a.shape)}")
    for k, src in enumerate(srcs):
        if avgs:
            _check_source(src, f"srcs[{k}]", avgs[0], "avgs[0]")
            if src.dtype != srcs[0].dtype:
                raise TypeError(f"srcs[{k}] must have the dtype of srcs[0] ({srcs[0].dtype}), "
                                f"got {src.dtype}")
        else:
            _check_cpu_contiguous(src, f"srcs[{k}]")
    for i, w in enumerate(weights):
        _check_weight(w, f"weights[{i}]")
    for k, src in enumerate(srcs):
        _torch_ema_multi(avgs, src, [weights[j * K + k] for j in range(len(avgs))])


@torch.no_grad()
def _torch_mean(out, srcs):
    _check_accumulator(out, "out")
    if not srcs:
        raise ValueError("srcs must hold at least one tensor")
    for j, s in enumerate(srcs):
        _check_source(s, f"srcs[{j}]", out, "out")
    o = out.view(-1)
    flats = [s.view(-1) for s in srcs]
    for b in range(0, o.numel(), _CHUNK):
        acc = torch.zeros(min(_CHUNK, o.numel() - b), dtype=torch.float64)
        for s in flats:
            acc += s[b:b + _CHUNK]
        o[b:b + _CHUNK].copy_(acc.div_(len(flats)))
