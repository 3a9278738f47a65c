"""The asynchronous path of a snapshot: parameters -> staging -> averages in host memory.

    optimizer.step() on the main stream
      -> submit (training thread): record E_ready and hand the job on (O(1) in the tensor count)
      -> issuer thread: the side stream waits on E_ready; small tensors are packed into a
         device-side buffer by one multi-tensor kernel and leave in one copy per run, the others
         are copied (non_blocking) into a staging buffer; then E_copied is recorded
      -> worker thread: waits for E_copied, then the ops kernels update every average due at
         that step from the staging buffer, and the buffer is freed
      -> fence (training thread, before the next in-place change of the parameters): waits until
         the copies are issued (normally long since), then the main stream waits on E_copied (a
         stream wait, not a host block), so the copy never reads half-updated weights

The parts, one owner each:

- :class:`Engine` (this module): the coordinator, whose own state is the training thread's
  (``submit``, ``fence``, ``recover``, ``busy``, ``wait_capacity``); ``read`` / ``flush`` /
  ``close`` / ``stats`` from any thread.
- ``staging``: the staging memory and the copy plans (read-only once built), and
  :class:`~offload_ema.engine.staging.Pools`, the free staging handed between the training
  thread and the worker.
- ``issuer``: the issuer thread (asynchronous devices), which issues whole snapshots' copies.
- ``worker``: the worker thread, which applies snapshots, folds, and releases staging.
- ``store``: the averages' memory and arithmetic (the worker's).
- ``job``: a snapshot in flight and the hand-offs (``Job.claim``, ``ErrorSlot``).

Streams, events and copies come from ``offload_ema.device`` (CUDA, host, or the simulated copy
engine of ``offload_ema.testing``). When one staging buffer holds a whole snapshot, up to
``len(buffers)`` snapshots are in flight. When the byte budget is smaller than a snapshot, two
buffers take it in chunks: the worker issues the copies of later chunks as it frees buffers,
and the fence must first wait on the host until the last chunk's copy has been issued
(``fence_wait_seconds``). On a CPU-only model there is no copy engine: the worker reads
parameters of at least ``INPLACE_MIN_BYTES`` in place and copies the smaller ones into staging in
one call, and the fence waits until it has read them all.

Interrupts: a ``KeyboardInterrupt`` may land between any two bytecodes of the training thread's
calls, so the step path holds no lock and changes no thread state. Tickets and staging buffers
are taken in single atomic operations; ``recover`` (after an interrupted or failed step) lets
the worker settle everything queued, then refills both pools whole, so nothing can be lost
between a take and its record. A fence interrupted after winning a job's claim hands it back to
the issuer (or, after a second interrupt, the next flush / read / close on that thread does).
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch

from offload_ema import device as device_mod
from offload_ema.engine.issuer import Issuer
from offload_ema.engine.job import (FENCE, ISSUER, RELEASED, WAIT_POLL, ErrorSlot, Job,
                                        nothing)
from offload_ema.engine.staging import (AUTO_FOLD, INPLACE_MIN_BYTES, PACK_MAX_BYTES,
                                            PACK_TENSOR_BYTES, Pools, Staging, size_staging)
from offload_ema.engine.store import AverageBuffers, AverageStore
from offload_ema.engine.worker import Worker, per_thread_intraop
from offload_ema.layout import Entry, Layout

__all__ = ["Engine", "Job", "Worker", "Issuer", "FENCE", "ISSUER", "RELEASED",
           "per_thread_intraop", "AverageBuffers", "AUTO_FOLD", "INPLACE_MIN_BYTES",
           "PACK_MAX_BYTES", "PACK_TENSOR_BYTES"]


class Engine:
    """Staging, copies, the copy fence, the threads and the averages' host memory, wired.

    Training thread: ``busy``, ``wait_capacity``, ``submit``, ``fence``, ``recover``. Any
    thread: ``run_after`` (a callable run on the worker once everything submitted before it is
    applied), ``read``, ``flush``, ``close``, ``stats``, ``raise_error``. Reads of the averages:
    ``applied``, ``values``, ``copies``, ``export_state`` / ``import_state`` (worker idle, or
    inside ``read``).
    """

    def __init__(self, layout: Layout, specs: Mapping[str, object],
                 staging_bytes: Optional[int] = None, fold: Union[int, str] = 1):
        self.layout = layout
        self._ops = device_mod.ops_for(layout.device)
        self.asynchronous = self._ops.asynchronous
        sizing = size_staging(layout, self.asynchronous, staging_bytes, fold)
        self.fold, self.capacity = sizing.fold, sizing.capacity
        self.n_staging, self.chunks_per_snapshot = sizing.n_buffers, len(sizing.chunks)
        self.staging = Staging(layout, self._ops, sizing)
        self.pools = Pools(sizing.capacity, sizing.n_buffers)  # training thread <-> worker
        self.store = AverageStore(specs, layout)              # the worker's
        self.errors = ErrorSlot()                              # worker, issuer -> any thread
        self.worker = Worker(layout, self._ops, self.staging, self.pools, self.store,
                             self.errors, sizing)
        # Asynchronous devices: the issuer takes every job and call first (its queue is the
        # engine's inbox) and passes them on in order. Whole snapshots (one chunk) have their
        # copies issued there (or by the fence, first come); chunked ones by the worker.
        self._issuer_copies = self.asynchronous and len(sizing.chunks) == 1
        self.issuer: Optional[Issuer] = None
        self._inbox = self.worker.queue
        if self.asynchronous:
            self._inbox = queue.SimpleQueue()
            self.issuer = Issuer(self._ops, self.staging, self._inbox, self.worker.queue,
                                 self.errors, self._issuer_copies)
        # The training thread's own state.
        self._unfenced: Optional[Job] = None      # the last job, until fenced
        self._submitting: Optional[Job] = None    # the job being handed over (recover's)
        self._last_queued_step = 0
        self._last_main_event = None  # the last event this engine recorded on the main stream
        self._fence_thread: Optional[int] = None  # the thread that fences (training's)
        self._dirty = False  # a recover() that has not finished: finished before the next job
        self._fence_wait = 0.0
        self._error_reported = False
        self._closed = False

    @property
    def _error(self) -> Optional[BaseException]:
        return self.errors.error

    # ---- training thread --------------------------------------------------------------------
    def busy(self) -> bool:
        if self._dirty:  # an interrupted recover(): finished now (no job is submitted since)
            self.read(nothing)
            self.pools.refill()
            self._dirty = False
        return self.pools.tickets.empty()

    def wait_capacity(self) -> None:
        # Re-checks the real condition each time: a wake-up lost between wait() and clear()
        # costs at most the timeout.
        while self.pools.tickets.empty() and self._error is None:
            self.pools.ticket_back.wait(WAIT_POLL)
            self.pools.ticket_back.clear()
            self._check_threads()

    def check_not_capturing(self) -> None:
        if self._ops.is_capturing():
            raise RuntimeError(
                "an Averager cannot run inside CUDA graph capture (its copies, events and worker "
                "live outside the graph, and a replay would take no snapshot): capture forward "
                "and backward only and run optimizer.step() outside the graph, or call "
                "avg.step() after each replay instead of attach()")

    def submit(self, step: int, emas: List[Tuple[str, int]], lawas: List[str],
               found_inf: Optional[torch.Tensor] = None, schedule=None) -> None:
        """Hands the snapshot of ``step`` to the worker for the accumulators ``emas`` (name,
        periods it stands for) and the LAWAs ``lawas``; ``schedule`` is the schedule's state
        once this job is taken (what a consistent read reports with the averages). The caller
        has checked ``busy()``. If this raises (out of memory while issuing a copy, an
        interrupt), call ``recover(step)``."""
        store = self.store
        job = Job(step, [(store[n], p) for n, p in emas], [store[n] for n in lawas], found_inf)
        job.schedule = schedule
        self._submitting = job
        try:
            job.ticket = self.pools.tickets.get_nowait()
        except queue.Empty:
            raise RuntimeError("submit called with no staging free (check busy() first)") from None
        if self._issuer_copies:
            job.held = [self.pools.free.popleft()]
        self._issue(job)
        self._unfenced = job
        self._inbox.put(job); self._last_queued_step = step  # noqa: E702 (recover reads both)
        self._submitting = None

    def recover(self, step: int) -> bool:
        """After ``submit`` (or the step around it) raised: whether the job of ``step`` reached
        the worker. Either way the engine is left whole and idle: every job queued so far is
        applied, an unqueued one is forgotten, and the tickets and staging buffers are all free
        again (an interrupt between taking one and recording it, at any bytecode, loses none)."""
        job = self._submitting
        # Set first: a second interrupt before the refill below leaves it to the next submit.
        self._dirty = True
        # Once this marker has run on the worker, every job queued before it has been taken,
        # applied and released (held ones are folded first).
        self.read(nothing)
        queued = self._last_queued_step == step or (job is not None and job.taken)
        if job is not None and not job.taken:
            # Never reached the worker: copies it issued (main stream: flags, buffers; side
            # stream: the fence's) may still write its staging, which is reused next.
            self._drain()
            if self._unfenced is job:
                self._unfenced = None
            job.issued.set()
        if queued:
            self._last_queued_step = step
        self._submitting = None
        self.pools.refill()
        self._dirty = False
        return queued

    def _drain(self) -> None:
        """Waits until no copy the engine issued can still run: the side stream's and the
        training thread's on the main stream (module buffers, found_inf flags)."""
        self._ops.drain()
        event = self._last_main_event
        if event is not None:
            self._ops.host_wait(event)

    def _issue(self, job: Job) -> None:
        """The training thread's part of a snapshot: what must be ordered on the main stream."""
        dev, staging = self._ops, self.staging
        main = dev.main_stream() if self.asynchronous else None
        if self.asynchronous and job.found_inf is not None:
            # After the step that computed it; read by the worker after flag_event (no host sync
            # on this thread). On this device's main stream (a copy from another device would
            # run on that device's stream, which flag_event does not cover).
            flag = job.found_inf.detach().reshape(-1)[:1].to(self.layout.device, non_blocking=True)
            dev.copy(main, [staging.flags[job.ticket:job.ticket + 1]], [flag])
            job.flag_event = self._last_main_event = dev.record(main)
        if staging.buffer_plans:
            # Ordered after the optimizer step and before the next forward, which updates the
            # module buffers in place.
            staging.copy(staging.buffer_plans[job.ticket], main)
            if self.asynchronous:
                job.buffers_event = self._last_main_event = dev.record(main)
        if not staging.chunks:  # this rank averages no parameters (DDP): nothing to copy
            job.issued.set()
            return
        if self.asynchronous:
            # After the optimizer step's kernels. The issuer thread (one chunk) or the worker
            # (chunks, as buffers free up) makes the side stream wait on it and issues the copies;
            # the host copies or reads on the worker. The fence waits until they are issued.
            job.ready_event = dev.record(main)

    def fence(self) -> None:
        """Makes the parameters safe to change: the last snapshot's copy is complete (host) or
        ordered before anything later on the main stream (asynchronous devices)."""
        job = self._unfenced
        if job is None:
            return
        t0 = time.perf_counter()
        self._fence_thread = threading.get_ident()
        if self._issuer_copies and job.ready_event is not None and \
                self._ops.claim_policy != ISSUER:
            try:  # the claim inside the try: an interrupt right after it is handled below
                # (FENCE already: this thread's own earlier fence, abandoned by an interrupt
                # that also skipped the hand-back below: issued from the start.)
                if job.claim.setdefault("by", FENCE) == FENCE and not job.issued.is_set():
                    self.issuer.issue(job)  # not yet taken by the issuer: no hand-off
                    job.issued.set()
            except Exception:  # e.g. out of memory for a reshape: the issuer tries (and reports)
                self._hand_back(job)
            except BaseException:  # an interrupt: the issuer issues it from the start
                self._hand_back(job)
                raise
        # Issuer / chunked: the worker issues the copies; host: the worker reads them.
        self._wait_for(job.issued)
        if self.asynchronous and job.copy_event is not None:
            # Stream wait, not a host block: the next optimizer step's kernels queue behind the
            # copy; forward and backward before it already overlapped with it.
            self._ops.stream_wait(self._ops.main_stream(), job.copy_event)
        # Forgotten only now: an interrupted wait leaves the fence to the next call.
        self._unfenced = None
        self._fence_wait += time.perf_counter() - t0

    def _hand_back(self, job: Job) -> None:
        if job.claim.get("by") == FENCE and not job.issued.is_set():
            job.claim["by"] = RELEASED

    def _release_abandoned_claim(self) -> None:
        """On the thread that fences: a claim of its own left by an interrupted fence (a second
        interrupt skipped the hand-back) is handed to the issuer, which otherwise waits for it.
        Safe: this thread is here, not inside fence()."""
        job = self._unfenced
        if job is not None and threading.get_ident() == self._fence_thread:
            self._hand_back(job)

    # ---- any thread ---------------------------------------------------------------------------
    def run_after(self, fn) -> None:
        """Runs ``fn()`` on the worker after every snapshot submitted so far is applied (it sees
        the averages at a consistent step). ``fn`` reports its own errors."""
        self._inbox.put(fn)  # one atomic operation: an interrupt leaves it queued or not

    def read(self, fn):
        """``fn()``'s result, computed on the worker after every snapshot submitted so far is
        applied and before any later one: a consistent read from any thread."""
        self._release_abandoned_claim()
        done = threading.Event()
        result = []

        def call():
            try:
                result.append((True, fn()))
            except BaseException as exc:
                result.append((False, exc))
            finally:
                done.set()
        self.run_after(call)
        self._wait_for(done)
        ok, value = result[0]
        if not ok:
            raise value
        return value

    def flush(self) -> None:
        """Waits until every snapshot submitted so far is applied and released: the worker
        applies held snapshots before any callable and releases a job before taking the next
        item, so this marker runs after all of them (and not after snapshots another thread
        submits meanwhile, which may be held until ``fold`` are)."""
        self.read(nothing)

    def _wait_for(self, event: threading.Event) -> None:
        """``event.wait()``, raising instead of waiting forever if a thread that would set it
        has stopped."""
        while not event.wait(WAIT_POLL):
            self._check_threads()

    def _check_threads(self) -> None:
        for part in (self.worker, self.issuer):
            if part is not None and not part.thread.is_alive():
                if self._closed:
                    raise RuntimeError("this Averager's engine is closed")
                raise RuntimeError(f"the Averager's {part.thread.name} thread stopped "
                                   "unexpectedly (see the error it ended with); build a new "
                                   "Averager") from self._error

    def stats(self) -> Tuple[Dict[str, float], int]:
        """(a copy of the counters, snapshots in flight), read together under the lock."""
        with self.worker.lock: s = dict(self.worker.stats)  # noqa: E701 (never left held)
        s["fence_wait_seconds"] = self._fence_wait
        return s, self.capacity - self.pools.tickets.qsize()

    @property
    def applied_schedule(self):
        """The schedule's state once the last applied job was taken (a consistent read's)."""
        with self.worker.lock:
            return self.worker.applied_schedule

    def report(self) -> Dict[str, object]:
        """The engine's part of ``Averager.stats()``, read under the lock."""
        s, in_flight = self.stats()
        staging = self.staging
        return {
            "snapshots_applied": int(s.get("snapshots_applied", 0)),
            "snapshots_dropped_nonfinite": int(s.get("snapshots_dropped_nonfinite", 0)),
            "in_flight": in_flight, "last_applied_step": int(s.get("last_applied_step", 0)),
            "bytes_copied": int(s.get("bytes_copied", 0)),
            # Folding: the most snapshots per pass ("auto": what the staging holds), passes
            # made and the snapshots they applied (their mean size says how far "auto" folded).
            "fold": self.fold, "folds": int(s.get("folds", 0)),
            "snapshots_folded": int(s.get("snapshots_folded", 0)),
            **{k: s.get(k, 0.0) for k in ("copy_seconds", "update_seconds", "fence_wait_seconds",
                                          "lag_seconds_last", "lag_seconds_max")},
            "snapshot_bytes": self.layout.nbytes, "staging_bytes": staging.nbytes,
            "pinned_bytes": self._ops.pinned_nbytes, "staging_buffers": self.n_staging,
            "chunks_per_snapshot": self.chunks_per_snapshot, "host_bytes": self.host_bytes(),
            "device_pack_bytes": staging.device_pack_nbytes,
            "read_in_place_bytes": staging.read_in_place_nbytes,
            "averaged_tensors": len(self.layout.entries), "device": str(self.layout.device),
        }

    def set_last_applied_step(self, step: int) -> None:
        with self.worker.lock:
            self.worker.stats["last_applied_step"] = step

    def raise_error(self, only_unreported: bool = False) -> None:
        """Raises the worker's error: the first time as it was (with the worker's traceback),
        later as a RuntimeError that points to it (unless ``only_unreported``)."""
        error = self._error
        if error is None or (only_unreported and self._error_reported):
            return
        if not self._error_reported:
            self._error_reported = True
            raise error
        raise RuntimeError("the Averager's worker failed earlier (see the first error); build a "
                           "new Averager") from error

    def unreported_error(self) -> Optional[BaseException]:
        return None if self._error_reported else self._error

    def close(self) -> None:
        """Applies what is in flight, stops the threads and releases the staging. Idempotent;
        from the worker itself (a garbage collection there) it only asks it to stop."""
        if self._closed:
            return
        self._release_abandoned_claim()
        self._closed = True
        self._inbox.put(None)  # the issuer passes it on to the worker
        threads = [p.thread for p in (self.worker, self.issuer) if p is not None]
        if threading.current_thread() in threads:
            return  # a garbage collection on our own thread: it stops once this returns
        forwarded = False
        while self.worker.thread.is_alive():
            self.worker.thread.join(WAIT_POLL)
            if not forwarded and self.issuer is not None and not self.issuer.thread.is_alive():
                self.worker.queue.put(None)  # the issuer died: nobody passes the stop on
                forwarded = True
        if self.issuer is not None:
            self.issuer.thread.join()
        try:
            self._drain()  # no copy may still write into the host memory freed below
        finally:
            self.staging.free()
            for e in self.layout.all_entries:  # storage the model may have given up: freed
                e.source = None

    # ---- reading the averages (worker idle, or inside read) -----------------------------------
    def applied(self, name: str) -> int:
        return self.store.applied(name)

    def values(self, name: str) -> Iterator[Tuple[Entry, torch.Tensor]]:
        return self.store.values(name)

    def copies(self, name: str) -> Optional[Dict[str, torch.Tensor]]:
        return self.store.copies(name)

    def export_state(self, name: str) -> dict:
        return self.store.export_state(name)

    def import_state(self, name: str, d: dict) -> None:
        self.store.import_state(name, d)

    def host_bytes(self) -> int:
        """Host memory held: averages (LAWA entries filled so far) and staging."""
        with self.worker.lock:
            return self.staging.nbytes + self.store.nbytes()
