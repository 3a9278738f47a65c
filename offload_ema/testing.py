"""Test tools: a simulated device that makes CPU models behave, for the engine, as on a GPU.

Under :func:`lazy_device`, an Averager built on a CPU model takes the engine's asynchronous path
(streams, events, deferred copies) with a simulated copy engine behind it: every copy issued on
the side stream is queued and run by the copy engine's thread after a seeded random delay, in
stream order. A host wait or a stream wait on an event blocks until the copy engine has reached
it. The training thread's own work is the "main stream": it runs at once, in program order.

So a missing fence (the next optimizer step changes the parameters while their copy is still
queued), a read of staging before its copy landed, or a staging buffer reused too early gives
wrong averages on the CPU, for some seed.

    >>> from offload_ema.testing import lazy_device
    >>> with lazy_device(seed=3):
    ...     avg = oe.Averager(cpu_model, {"ema": oe.EMA(0.9)})
"""
from __future__ import annotations

import contextlib
import queue
import random
import threading
import time
from typing import List

import torch

from offload_ema import device as device_mod

__all__ = ["lazy_device", "LazyOps"]

_MAIN = "main"


class _Event:
    """Complete once the copy engine (side stream) or the host (main stream) reached it."""

    def __init__(self, epoch: int = 0):
        self._done = threading.Event()
        self.time = 0.0
        self.epoch = epoch  # main-stream events: their order on the main stream

    def complete(self) -> None:
        self.time = time.perf_counter()
        self._done.set()

    def wait(self, timeout: float = 60.0) -> None:
        if not self._done.wait(timeout):
            raise RuntimeError("simulated device: an event was never reached (a copy engine "
                               "queue was never run: was the engine's thread stopped?)")


class _CopyEngine:
    """Runs the side stream's queued operations in order, each after a seeded random delay."""

    def __init__(self, seed: int, max_delay: float):
        self._rng = random.Random(seed)
        self._max_delay = max_delay
        self._queue: "queue.SimpleQueue" = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._stopped = False  # under _lock
        self.error = None
        self._thread = threading.Thread(target=self._run, name="lazy-copy-engine", daemon=True)
        self._thread.start()

    def enqueue(self, op) -> None:
        with self._lock:
            if not self._stopped:
                self._queue.put(op)
                return
        # After the block: an Averager still open (closed later, at exit say) finds a device
        # that runs each operation at once, after everything queued before it, instead of
        # events that are never reached.
        self._thread.join()
        self._run_op(op)

    def _delay(self) -> float:
        with self._lock:
            r = self._rng.random()
            # Mostly prompt, sometimes late: late enough to outlast a training step.
            return 0.0 if r < 0.4 else self._rng.uniform(0, self._max_delay)

    def _run(self) -> None:
        while True:
            op = self._queue.get()
            if op is None:
                return
            time.sleep(self._delay())
            self._run_op(op)

    def _run_op(self, op) -> None:
        try:
            op()
        except BaseException as exc:  # a broken copy: reported by the next wait
            if self.error is None:
                self.error = exc

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._queue.put(None)
        self._thread.join()


class LazyOps:
    """The engine's device operations on the simulated copy engine (see the module doc)."""

    asynchronous = True
    pinned_nbytes = 0

    def __init__(self, device: torch.device, engine: _CopyEngine, claim_policy: str = "race"):
        self.device = device
        self._engine = engine
        # Who issues a whole snapshot's copies: "race" (as on a GPU: the issuer thread or the
        # fence, whoever comes first), "fence" (the training thread's fence whenever it comes
        # before the next item reaches the issuer) or "issuer" (the fence never issues).
        self.claim_policy = claim_policy
        self.side = "side"
        # The main stream's work completes in host order here, unlike on a GPU, where a side
        # copy not ordered after the latest main-stream event could run before the optimizer
        # step's kernels. So that mistake is caught instead: a side copy must come after the side
        # stream waited on the main stream's latest event.
        self._main_epoch = 0
        self._side_waited = 0

    def thread_init(self) -> None:
        pass

    def alloc_host(self, sizes: List[int]) -> List[torch.Tensor]:
        return device_mod.carve(torch.empty(sum(-(-n // 64) * 64 for n in sizes),
                                            dtype=torch.uint8), sizes)

    def free_host(self) -> None:
        pass

    def alloc_device(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)  # "device" memory: written by side copies

    def is_capturing(self) -> bool:
        return False

    def main_stream(self):
        return _MAIN

    def record(self, stream, timing: bool = False) -> _Event:
        if stream == _MAIN:
            self._main_epoch += 1
            event = _Event(self._main_epoch)
            event.complete()
            return event
        event = _Event()
        self._engine.enqueue(event.complete)
        return event

    def stream_wait(self, stream, event: _Event) -> None:
        if stream == _MAIN:
            self.host_wait(event)  # the main stream is the host's program order
        else:  # a main-stream event: complete when recorded; a side one: in order anyway
            self._side_waited = max(self._side_waited, event.epoch)

    def copy(self, stream, dsts: List[torch.Tensor], srcs: List[torch.Tensor],
             ranges=None) -> None:
        if stream == _MAIN:
            torch._foreach_copy_(dsts, device_mod.ranged(srcs, ranges))
        else:
            if self._side_waited < self._main_epoch:
                raise RuntimeError(
                    "simulated device: a side-stream copy issued without waiting on the main "
                    "stream's latest event (on a GPU it could read the parameters before the "
                    "optimizer step's kernels wrote them)")
            # The sources are read when the copy engine gets to it, as a GPU would (a copy
            # engine records no autograd history: grad mode is per thread, so set it here).
            def run():
                with torch.no_grad():
                    torch._foreach_copy_(dsts, device_mod.ranged(srcs, ranges))
            self._engine.enqueue(run)

    def drain(self) -> None:
        done = self.record(self.side)
        done.wait()

    def host_wait(self, event: _Event) -> None:
        event.wait()
        if self._engine.error is not None:
            raise RuntimeError("simulated device: a copy failed") from self._engine.error

    def elapsed_seconds(self, start: _Event, done: _Event) -> float:
        return max(0.0, done.time - start.time)


class _Factory:
    def __init__(self, seed: int, max_delay: float, claim_policy: str):
        self.engine = _CopyEngine(seed, max_delay)
        self.claim_policy = claim_policy

    def make(self, device: torch.device) -> LazyOps:
        return LazyOps(device, self.engine, self.claim_policy)


CLAIM_POLICIES = ("race", "fence", "issuer")


@contextlib.contextmanager
def lazy_device(seed: int = 0, max_delay: float = 0.004, claim_policy: str = "race"):
    """Averagers built on CPU models inside this block use the simulated copy engine (seeded
    delays of up to ``max_delay`` seconds per queued operation). ``claim_policy`` decides who
    issues a whole snapshot's copies ("race": as on a GPU; "fence" / "issuer": always that
    side, for tests that must cover one path deterministically). Close the Averagers inside
    the block; one left open finds a device that runs each operation at once afterwards."""
    if device_mod._override is not None:
        raise RuntimeError("lazy_device() blocks do not nest")
    if claim_policy not in CLAIM_POLICIES:
        raise ValueError(f"claim_policy must be one of {CLAIM_POLICIES}, got {claim_policy!r}")
    factory = _Factory(seed, max_delay, claim_policy)
    device_mod._override = factory
    try:
        yield factory
    finally:
        device_mod._override = None
        factory.engine.stop()
