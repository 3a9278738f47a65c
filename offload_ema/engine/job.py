"""One snapshot in flight, and the small objects the engine's threads hand each other.

Each hand-off is one named object with one job:

- :class:`Job`: a snapshot from submit to release. The training thread fills it before queuing
  it; the issuer writes ``prepared`` / ``copy_event`` before setting ``issued``, and whoever
  reads them waits on ``issued`` first (a fence reading a copy event not yet recorded).
- ``Job.claim``: who issues a whole snapshot's copies, the fence or the issuer (one atomic
  ``dict.setdefault``: an interrupt after it leaves the winner readable, never a lost claim).
- :class:`ErrorSlot`: the first failure of a background thread, set once, read by any thread (a
  failure that nobody reports).
"""
from __future__ import annotations

import threading
import time
from typing import Dict, List, Optional, Tuple

import torch

# Job.claim["by"]: who issues a whole-snapshot job's copies.
FENCE, ISSUER, RELEASED = "fence", "issuer", "released"
# Waits on another thread's work look up every WAIT_POLL seconds whether that thread is still
# alive: a background thread that died must give an error, never a hang.
WAIT_POLL = 0.05


def nothing() -> None:
    pass


class ErrorSlot:
    """The first error of the worker or the issuer (set once, under its lock)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.error: Optional[BaseException] = None

    def record(self, exc: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = exc


class Job:
    """One snapshot: the step, what it feeds, and its copies."""

    def __init__(self, step: int, emas, lawas, found_inf: Optional[torch.Tensor]):
        self.step = step
        # (buffers, periods): accumulators and the due periods this snapshot stands for. The
        # worker turns them into weights from the periods it has applied (exact under drops and
        # coalescing); the first snapshot applied initialises an accumulator (a copy).
        self.emas: List[Tuple[object, int]] = emas
        self.weights: List[float] = []
        self.lawas: List[object] = lawas
        self.lawa_pos: Dict[int, int] = {}  # id(buffers) -> ring entry, chosen by the worker
        # GradScaler's found_inf for a fused optimizer's step (which runs the post-hook even when
        # it skipped the update): the snapshot of a step with non-finite gradients is dropped.
        self.found_inf = found_inf
        self.dropped: Optional[bool] = None  # decided by the worker
        self.ticket: Optional[int] = None    # per-job resources: buffer staging, found_inf flag
        self.prepared = None        # [(chunk, staging buffer, start, done)] issued by submit
        self.buffers_event = None   # after the averaged module buffers' copy
        self.flag_event = None      # after found_inf's copy into its flag
        self.ready_event = None     # after the optimizer step (chunked copies)
        self.copy_event = None      # after the last copy: what the fence waits on
        self.issued = threading.Event()  # every copy issued (async) / parameters read (host)
        self.taken = False  # set by the worker when it takes the job (read by recover)
        self.issue_error: Optional[BaseException] = None  # the issuer's, raised by the worker
        # Who issues a whole-snapshot job's copies: the issuer thread, or the training thread
        # when it fences before the issuer got to it (avg.step() fences at once: it issues
        # inline rather than wait for a thread hand-off). Taken with one dict.setdefault (one
        # atomic operation, and it records the winner): an interrupt at any bytecode after it
        # leaves the claim readable, so the fence can hand it back (``RELEASED``) instead of
        # leaving the issuer waiting for a copy nobody issues.
        self.claim: Dict[str, str] = {}
        self.held: List[int] = []   # staging buffers this job holds
        self.schedule = None        # the schedule's state once this job was taken
        # Sources resolved per copy (FSDP2 / ZeRO-3 parts, reshaped non-contiguous tensors),
        # kept alive until the copy has completed: a shard whose storage is replaced meanwhile
        # would otherwise return its block to the caching allocator, which can hand it to the
        # main stream while the side stream still reads it. (Other sources are the layout's
        # bound aliases, alive as long as the Averager.)
        self.sources: List[torch.Tensor] = []
        self.submitted = time.perf_counter()
        self.copy_s = 0.0
        self.update_s = 0.0
