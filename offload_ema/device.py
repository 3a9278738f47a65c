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

import contextlib
from typing import List, Optional

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


class HostOps:
    """CPU training: the worker copies synchronously; nothing is deferred."""

    asynchronous = False
    pinned_nbytes = 0

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

    def copy(self, stream, dsts: List[torch.Tensor], srcs: List[torch.Tensor]) -> None:
        torch._foreach_copy_(dsts, srcs)

    def stream_context(self, stream):
        return contextlib.nullcontext()

    def drain(self) -> None:
        pass


class CudaOps:
    """One CUDA device: the current stream is training's, a side stream carries the copies."""

    asynchronous = True

    def __init__(self, device: torch.device):
        self.device = device
        self.side = torch.cuda.Stream(device)
        self.pinned_nbytes = 0
        self._registered: Optional[torch.Tensor] = None

    def alloc_host(self, sizes: List[int]) -> List[torch.Tensor]:
        """Page-locked host memory of exactly the bytes asked (plus 64-byte alignment): plain
        host memory registered with cudaHostRegister. torch's pinned allocator would round the
        request up to a power of two (a 14 GB snapshot pins 16 GB) and keep it cached after
        close. Falls back to that allocator where registering fails."""
        total = _carved_bytes(sizes)
        base = torch.empty(total, dtype=torch.uint8)
        try:
            with torch.cuda.device(self.device):  # the context the registration belongs to
                err = torch.cuda.cudart().cudaHostRegister(base.data_ptr(), total, 0)
            ok = int(err) == 0
        except (AttributeError, RuntimeError, TypeError):
            ok = False
        if ok:
            self._registered = base
            self.pinned_nbytes = total
        else:
            base = torch.empty(total, dtype=torch.uint8, pin_memory=True)
            self.pinned_nbytes = 1 << max(total - 1, 0).bit_length()  # what the allocator holds
        return carve(base, sizes)

    def free_host(self) -> None:
        """After the worker stopped (no copy into the memory can be pending any more)."""
        base, self._registered = self._registered, None
        if base is not None:
            torch.cuda.cudart().cudaHostUnregister(base.data_ptr())

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

    def copy(self, stream, dsts: List[torch.Tensor], srcs: List[torch.Tensor]) -> None:
        # One line: an interrupt cannot leave the training thread on the side stream.
        with torch.cuda.stream(stream): torch._foreach_copy_(dsts, srcs, non_blocking=True)  # noqa: E701,E501

    def stream_context(self, stream):
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def drain(self) -> None:
        self.side.synchronize()

    def host_wait(self, event) -> None:
        event.synchronize()

    def elapsed_seconds(self, start, done) -> float:
        return start.elapsed_time(done) / 1e3


def _thread_local_capture_mode() -> None:
    """cuThreadExchangeStreamCaptureMode(CU_STREAM_CAPTURE_MODE_THREAD_LOCAL) for this thread,
    as PyTorch does for its NCCL watchdog; best effort (the driver library may be named
    differently, or absent on a build without CUDA)."""
    import ctypes
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
