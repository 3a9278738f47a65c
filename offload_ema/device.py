"""Stream, event and asynchronous-copy operations, for the engine, behind one small interface.

Three implementations:

- :class:`CudaOps`: a side CUDA stream, CUDA events (blocking-sync: a host wait sleeps instead of
  spinning a core), ``non_blocking`` copies into pinned memory.
- :class:`HostOps`: CPU training. There are no streams: the worker copies the parameters itself
  (a plain host copy) and the copy fence waits until it has.
- ``offload_ema.testing.LazyOps``: a simulated copy engine for tests. CPU models behave as on a
  GPU: every asynchronous copy is deferred and run later, so an ordering mistake in the engine
  gives wrong averages on the CPU.

The engine's calls, in order, for one snapshot (asynchronous implementations)::

    main = ops.main_stream()
    ready = ops.record(main)                 # training thread, after the optimizer step
    ops.stream_wait(ops.side, ready)         # issuer thread (worker when chunked), from here
    start = ops.record(ops.side, timing=True)
    ops.copy(ops.side, packs, small_srcs)    # device to device into the pack buffer (one kernel)
    ops.copy(ops.side, dsts, srcs)           # deferred: the sources are read later
    done = ops.record(ops.side, timing=True)
    ops.host_wait(done)                      # worker, before reading staging
    ops.stream_wait(main, done)              # fence, before the next in-place change
"""
from __future__ import annotations

import ctypes
import weakref
from typing import List, Optional, Tuple

import torch


def carve(base: torch.Tensor, sizes: List[int]) -> List[torch.Tensor]:
    """Byte areas of ``sizes`` in ``base``, each starting on a 64-byte boundary."""
    out, offset = [], 0
    for n in sizes:
        out.append(base[offset:offset + n])
        offset += -(-n // 64) * 64
    return out


def _carved_bytes(sizes: List[int]) -> int:
    return sum(-(-n // 64) * 64 for n in sizes)


def ranged(srcs: List[torch.Tensor], ranges: Optional[List[Tuple[int, int]]]) -> List[torch.Tensor]:
    """``srcs`` with ``ranges[i] = (start, end)`` applied: elements [start, end) of the
    flattening (start < 0: the tensor as it is). For a non-contiguous tensor this runs a kernel,
    so call it where the copy that reads it runs."""
    if ranges is None:
        return srcs
    return [s if lo < 0 else s.reshape(-1)[lo:hi] for s, (lo, hi) in zip(srcs, ranges)]


class HostOps:
    """CPU training: the worker copies synchronously; nothing is deferred."""

    asynchronous = False
    pinned_nbytes = 0
    claim_policy = "race"  # (no issuer thread on the host)

    def __init__(self, device: torch.device):
        self.device = device
        self.side = None

    def alloc_host(self, sizes: List[int]) -> List[torch.Tensor]:
        return carve(torch.empty(_carved_bytes(sizes), dtype=torch.uint8), sizes)

    def free_host(self) -> None:
        pass

    def alloc_device(self, nbytes: int) -> torch.Tensor:
        raise RuntimeError("host training packs nothing on a device")

    def thread_init(self) -> None:
        pass

    def is_capturing(self) -> bool:
        return False

    def copy(self, stream, dsts: List[torch.Tensor], srcs: List[torch.Tensor],
             ranges: Optional[List[Tuple[int, int]]] = None) -> None:
        # The sources are detached aliases and staging needs no history: no grad mode to set
        # (a ``with torch.no_grad()`` left by an interrupt would leave it off for training).
        torch._foreach_copy_(dsts, ranged(srcs, ranges))

    def drain(self) -> None:
        pass

    def host_wait(self, event) -> None:
        pass


class CudaOps:
    """One CUDA device: the current stream is training's, a side stream carries the copies."""

    asynchronous = True
    # Whoever comes first issues a whole snapshot's copies: the issuer thread or the fence.
    claim_policy = "race"

    def __init__(self, device: torch.device):
        self.device = device
        self.side = torch.cuda.Stream(device)
        self.pinned_nbytes = 0
        self._unregister: Optional[weakref.finalize] = None

    def alloc_host(self, sizes: List[int]) -> List[torch.Tensor]:
        """Page-locked host memory of exactly the bytes asked (plus 64-byte alignment): plain
        host memory registered with the driver's cuMemHostRegister. torch's pinned allocator
        would round the request up to a power of two (a 14 GB snapshot pins 16 GB) and keep it
        cached after close. The driver API, not cudaHostRegister: a failed runtime call is kept
        as the runtime's last error, which torch's next unrelated kernel-launch check would
        report as its own; the driver API sets no such state. Falls back to torch's allocator
        where registering fails."""
        total = _carved_bytes(sizes)
        base = torch.empty(total, dtype=torch.uint8)
        torch.cuda.init()  # the driver initialised (cuInit) before its API is called directly
        index = self.device.index if self.device.index is not None else \
            torch.cuda.current_device()
        why = _driver_register(base.data_ptr(), total, index) if total else "nothing to pin"
        if why is None:
            # Unregistered before the memory can be freed: on close, or when this object is
            # collected unclosed (the finalizer holds ``base``, so the memory outlives it).
            self._unregister = weakref.finalize(self, _driver_unregister, base, index)
            self.pinned_nbytes = total
        else:
            if total:
                import warnings
                warnings.warn(f"offload_ema: pinning {total} bytes of staging with "
                              f"cuMemHostRegister failed ({why}); torch's pinned allocator is "
                              "used instead (it rounds up to a power of two)", RuntimeWarning)
            base = torch.empty(total, dtype=torch.uint8, pin_memory=True)
            self.pinned_nbytes = 1 << max(total - 1, 0).bit_length()  # what the allocator holds
        return carve(base, sizes)

    def free_host(self) -> None:
        """After the worker stopped (no copy into the memory can be pending any more)."""
        unregister, self._unregister = self._unregister, None
        if unregister is not None:
            unregister()

    def alloc_device(self, nbytes: int) -> torch.Tensor:
        """The pack buffer: device memory used by the side stream alone (allocated on it, so
        the caching allocator ties the block to the stream that uses it)."""
        with torch.cuda.stream(self.side):
            return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def thread_init(self) -> None:
        """For the worker and the issuer: its events, syncs and any kernel it launches belong to
        this device and the side stream (never the legacy default stream, which is not ordered
        with the side stream). And graph capture on another thread in the default "global" mode must not be
        invalidated by this thread's CUDA calls: this thread's capture mode is thread-local."""
        torch.cuda.set_device(self.device)
        torch.cuda.set_stream(self.side)
        _thread_local_capture_mode()

    def is_capturing(self) -> bool:
        return torch.cuda.is_current_stream_capturing()

    def main_stream(self):
        return torch.cuda.current_stream(self.device)

    def record(self, stream, timing: bool = False):
        event = torch.cuda.Event(enable_timing=timing, blocking=True)
        event.record(stream)
        return event

    def stream_wait(self, stream, event) -> None:
        stream.wait_event(event)

    def copy(self, stream, dsts: List[torch.Tensor], srcs: List[torch.Tensor],
             ranges: Optional[List[Tuple[int, int]]] = None) -> None:
        """Non-blocking copies issued on ``stream`` (the ranged sources' kernels too). Through
        one C++ call that switches to the stream and back: an interrupt at any bytecode of the
        training thread (the fence issues copies) cannot leave it on the side stream, as it can
        between the enter and exit of ``with torch.cuda.stream(...)``."""
        from offload_ema import ops
        copy_on_stream = getattr(ops._C, "copy_on_stream", None)  # (None: an older build)
        if copy_on_stream is not None:
            lo_hi = ranges or [(-1, -1)] * len(srcs)
            copy_on_stream(dsts, srcs, [r[0] for r in lo_hi], [r[1] for r in lo_hi],
                           stream.stream_id, stream.device_index, stream.device_type)
            return
        # Without the C++ extension (a pure-Python install): not safe against an interrupt
        # between the two switches.
        with torch.cuda.stream(stream), torch.no_grad():
            torch._foreach_copy_(dsts, ranged(srcs, ranges), non_blocking=True)

    def drain(self) -> None:
        """Waits for the side stream (the main stream's copies: the engine waits on its last
        main-stream event)."""
        self.side.synchronize()

    def host_wait(self, event) -> None:
        event.synchronize()

    def elapsed_seconds(self, start, done) -> float:
        return start.elapsed_time(done) / 1e3


def _libcuda():
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None


CU_MEMHOSTREGISTER_PORTABLE = 1  # pinned for every context (any device's copies)


def _driver_register(ptr: int, nbytes: int, index: int) -> Optional[str]:
    """cuMemHostRegister(ptr, nbytes, PORTABLE) with device ``index``'s primary context pushed
    for the call (retained until _driver_unregister: the thread's current context may be none
    or another device's). None when done, else why not (no driver library, a refused call)."""
    lib = _libcuda()
    if lib is None:
        return "no libcuda.so.1"
    try:
        dev, ctx = ctypes.c_int(), ctypes.c_void_p()
        if lib.cuDeviceGet(ctypes.byref(dev), index) != 0:
            return f"cuDeviceGet({index}) failed"
        if lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev) != 0:
            return "cuDevicePrimaryCtxRetain failed"
        lib.cuCtxPushCurrent_v2.argtypes = [ctypes.c_void_p]
        if lib.cuCtxPushCurrent_v2(ctx) != 0:
            lib.cuDevicePrimaryCtxRelease_v2(dev)
            return "cuCtxPushCurrent failed"
        try:
            register = getattr(lib, "cuMemHostRegister_v2", None) or lib.cuMemHostRegister
            register.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
            err = register(ctypes.c_void_p(ptr), ctypes.c_size_t(nbytes),
                           CU_MEMHOSTREGISTER_PORTABLE)
        finally:
            lib.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))
        if err != 0:
            lib.cuDevicePrimaryCtxRelease_v2(dev)
            return f"CUresult {err}"
        return None
    except (AttributeError, OSError, ctypes.ArgumentError) as exc:
        return repr(exc)


def _driver_unregister(base: torch.Tensor, index: int) -> None:
    """cuMemHostUnregister with the registering primary context pushed (a collection or the
    exit may run on a thread without it), then that context's retain released. Best effort: at
    exit the context may be gone, and then so is the registration."""
    lib = _libcuda()
    if lib is None:
        return
    try:
        dev, ctx = ctypes.c_int(), ctypes.c_void_p()
        if lib.cuDeviceGet(ctypes.byref(dev), index) != 0 or \
                lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev) != 0:
            return
        lib.cuCtxPushCurrent_v2.argtypes = [ctypes.c_void_p]
        lib.cuMemHostUnregister.argtypes = [ctypes.c_void_p]
        if lib.cuCtxPushCurrent_v2(ctx) == 0:
            lib.cuMemHostUnregister(ctypes.c_void_p(base.data_ptr()))
            lib.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))
        lib.cuDevicePrimaryCtxRelease_v2(dev)  # this call's retain
        lib.cuDevicePrimaryCtxRelease_v2(dev)  # _driver_register's
    except (AttributeError, OSError, ctypes.ArgumentError):
        pass


def _thread_local_capture_mode() -> None:
    """cuThreadExchangeStreamCaptureMode(CU_STREAM_CAPTURE_MODE_THREAD_LOCAL) for this thread,
    as PyTorch does for its NCCL watchdog; best effort (the driver library may be named
    differently, or absent on a build without CUDA)."""
    try:
        mode = ctypes.c_int(1)  # CU_STREAM_CAPTURE_MODE_THREAD_LOCAL
        ctypes.CDLL("libcuda.so.1").cuThreadExchangeStreamCaptureMode(ctypes.byref(mode))
    except (OSError, AttributeError):
        pass


_override: Optional[object] = None  # set by offload_ema.testing.lazy_device()


def ops_for(device: torch.device):
    """The operations the engine uses for parameters on ``device``."""
    if _override is not None and device.type == "cpu":
        return _override.make(device)
    if device.type == "cuda":
        return CudaOps(device)
    return HostOps(device)
