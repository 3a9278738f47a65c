"""The asynchronous path of a snapshot: parameters -> pinned staging -> averages in host memory.

    optimizer.step() on the main stream
      -> Averager.step: record E_ready; the side stream waits on it and copies the parameters
         (non_blocking) into a staging slot, then records E_copied          (submit)
      -> worker thread: E_copied.synchronize(), then the ops kernels update every average due at
         that step from the slot, and the slot is freed                      (_process)
      -> before the next in-place change of the parameters, the main stream waits on E_copied
         (a stream wait, not a host block), so the copy never reads half-updated weights (fence)

Staging is a fixed set of slots allocated once. When one slot holds a whole snapshot, up to
``len(slots)`` snapshots are in flight. When the byte budget is smaller than a snapshot, two slots
take it in chunks: the worker issues the copies of later chunks as it frees slots, and the fence
must first wait on the host until the last chunk's copy has been issued, i.e. until the worker
has applied all chunks but the last two. That wait is reported as ``fence_wait_seconds``.

On a CPU-only model the same engine runs with the worker doing the copy itself (host memcpy into
the slot); the fence then waits until that copy is complete.
"""
from __future__ import annotations

import collections
import queue
import threading
import time
from typing import Deque, Dict, List, Optional, Tuple

import torch

from offload_ema import ops
from offload_ema.averages import EMA
from offload_ema.layout import ALIGN, Layout, is_dtensor, local_tensor

_BUSY_POLICIES = ("block", "skip", "coalesce")


def _per_thread_intraop() -> bool:
    """Whether torch.set_num_threads in one thread leaves the others alone: true of the OpenMP
    backend (a per-thread setting), not of torch's native pool (process-wide)."""
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


class AverageState:
    """One average's host buffers and counters. Buffers are written only by the worker; the
    scheduling fields (``scheduled``, ``pending``, ``next_pos``) only by the main thread."""

    def __init__(self, name: str, spec, layout: Layout):
        self.name = name
        self.spec = spec
        self.scheduled = 0   # snapshots handed to the engine
        self.pending = 0     # due snapshots coalesced into the next one (EMA decay periods)
        self.applied = 0     # snapshots applied by the worker
        self.last_step = 0   # step of the last applied snapshot
        if isinstance(spec, EMA):
            self.acc = [torch.zeros(g.numel, dtype=torch.float32) for g in layout.groups]
        else:
            self.slots: List[Optional[List[torch.Tensor]]] = [None] * spec.window
            self.order: Deque[int] = collections.deque(maxlen=spec.window)  # oldest first
            self.next_pos = 0
        self._layout = layout

    def slot(self, pos: int) -> List[torch.Tensor]:
        if self.slots[pos] is None:  # LAWA slots are allocated as the window fills
            self.slots[pos] = [torch.empty(g.numel, dtype=g.dtype) for g in self._layout.groups]
        return self.slots[pos]


class Job:
    """One snapshot: the step, what it feeds, and its copies."""

    def __init__(self, step: int, emas, lawas):
        self.step = step
        self.emas: List[Tuple[AverageState, Optional[float]]] = emas  # weight None: initialise
        self.lawas: List[Tuple[AverageState, int]] = lawas            # ring position to fill
        self.prepared = None        # [(chunk, slot, start event, done event)] issued by submit
        self.eager = None           # eager (buffer) staging slot, filled by submit
        self.eager_event = None     # CUDA event after the eager copy
        self.ready_event = None     # CUDA event after the optimizer step (chunked copies)
        self.copy_event = None      # CUDA event after the last copy: what the fence waits on
        self.issued = threading.Event()  # every copy issued (CUDA) / done (CPU)
        self.held: List[int] = []   # staging slots this job holds
        self.submitted = time.perf_counter()
        self.copy_s = 0.0
        self.update_s = 0.0


class Engine:
    def __init__(self, layout: Layout, staging_bytes: Optional[int] = None):
        self.layout = layout
        self.device = layout.device
        self.cuda = self.device.type == "cuda"
        snapshot = max(layout.nbytes, 1)
        if staging_bytes is None:
            staging_bytes = 2 * snapshot
        if isinstance(staging_bytes, bool) or not isinstance(staging_bytes, int) or (
                staging_bytes < 2 * ALIGN):
            raise ValueError(f"staging_bytes must be an int >= {2 * ALIGN}, got {staging_bytes!r}")
        if staging_bytes >= snapshot:
            n_slots, slot_bytes = staging_bytes // snapshot, snapshot
        else:
            n_slots, slot_bytes = 2, staging_bytes // 2
        self.chunks = layout.plan(slot_bytes)
        # Snapshots that may be in flight at once: one per slot when a slot holds a snapshot;
        # one in chunked mode (its chunks take both slots in turn).
        self.capacity = n_slots if len(self.chunks) <= 1 else 1
        self.slot_bytes = slot_bytes
        self.slots = [torch.empty(slot_bytes, dtype=torch.uint8, pin_memory=self.cuda)
                      for _ in range(n_slots)]
        self._copy_plans: Dict[int, tuple] = {}  # id(views) -> what _copy needs, built once
        self._views = {(s, c): self._make_views(self.slots[s], self.chunks[c])
                       for s in range(n_slots) for c in range(len(self.chunks))}
        # Averaged buffers change in place during the next forward, long before the fence: they
        # are copied at once, on the main thread / stream, into a small area of their own.
        eager_bytes = layout.eager_nbytes
        self.eager_slots = [torch.empty(eager_bytes, dtype=torch.uint8, pin_memory=self.cuda)
                            for _ in range(self.capacity if eager_bytes else 0)]
        eager_chunks = layout.plan(max(eager_bytes, 1), eager=True)
        self._eager_views = [self._make_views(t, eager_chunks[0]) for t in self.eager_slots]
        self._eager_free: Deque[int] = collections.deque(range(len(self.eager_slots)))
        # Host staging in all (pinned on a GPU): the parameter slots within the budget, plus the
        # averaged buffers' small area.
        self.staging_nbytes = sum(t.numel() for t in self.slots + self.eager_slots)
        self._free: Deque[int] = collections.deque(range(n_slots))
        self.side = torch.cuda.Stream(self.device) if self.cuda else None

        self.cond = threading.Condition()
        self.in_flight = 0
        self.pending_calls = 0
        self.error: Optional[BaseException] = None
        self.error_reported = False
        self.stats: Dict[str, float] = collections.defaultdict(float)
        self._unfenced: Optional[Job] = None
        self._queue: "queue.SimpleQueue" = queue.SimpleQueue()  # Job, callable, None (stop)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="offload_ema-worker", daemon=True)
        self._thread.start()

    # ---- staging views ------------------------------------------------------------------
    def _make_views(self, buf: torch.Tensor, chunk):
        """(piece, flat staging view, [(part, destination view)]) for one chunk in one buffer."""
        out = []
        for piece in chunk.pieces:
            g = self.layout.groups[piece.group]
            n = piece.end - piece.start
            size = torch.empty((), dtype=g.dtype).element_size()
            flat = buf[piece.byte_offset:piece.byte_offset + n * size].view(g.dtype)
            parts = []
            for part in piece.parts:
                dst = flat[part.dst:part.dst + part.end - part.start]
                parts.append((part, dst.view(part.entry.shape) if part.whole else dst))
            out.append((piece, flat, parts))
        return out

    def _copy(self, views) -> None:
        """Copies the live tensors into staging views (async on the current stream when they
        are on a GPU)."""
        plan = self._copy_plans.get(id(views))
        if plan is None:  # built once per views list: the per-step work is one foreach call
            dsts, srcs, dynamic = [], [], []
            for _, _, parts in views:
                for part, dst in parts:
                    t = part.entry.tensor
                    if part.whole and not is_dtensor(t):
                        srcs.append(t)  # the live tensor itself: in-place updates show through
                    else:  # a slice of a tensor, or an FSDP2 shard: taken afresh each time
                        dynamic.append((len(srcs), part))
                        srcs.append(None)
                    dsts.append(dst)
            plan = self._copy_plans[id(views)] = (dsts, srcs, dynamic)
        dsts, srcs, dynamic = plan
        if dynamic:
            srcs = list(srcs)
            for i, part in dynamic:
                t = local_tensor(part.entry.tensor).detach()
                srcs[i] = t if part.whole else t.reshape(-1)[part.start:part.end]
        with torch.no_grad():
            torch._foreach_copy_(dsts, srcs, non_blocking=self.cuda)

    # ---- main thread ----------------------------------------------------------------------
    def busy(self) -> bool:
        with self.cond:
            return self.in_flight >= self.capacity

    def wait_capacity(self) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.in_flight < self.capacity or self.error is not None)

    def submit(self, job: Job) -> None:
        """Hands a snapshot to the engine. The caller has checked capacity."""
        with self.cond:
            self.in_flight += 1
            if self.cuda and len(self.chunks) == 1:
                job.held.append(self._free.popleft())
            if self._eager_views:
                job.eager = self._eager_free.popleft()
        if job.eager is not None:
            # On the current stream: ordered after the optimizer step and before the next forward
            # that updates the buffers in place.
            self._copy(self._eager_views[job.eager])
            if self.cuda:
                job.eager_event = torch.cuda.Event()
                job.eager_event.record(torch.cuda.current_stream(self.device))
        if self.cuda:
            main = torch.cuda.current_stream(self.device)
            ready = torch.cuda.Event()
            ready.record(main)  # after the optimizer step's kernels
            if len(self.chunks) == 1:
                slot = job.held[0]
                # The copy must start only after the optimizer step has written the parameters.
                self.side.wait_event(ready)
                with torch.cuda.stream(self.side):
                    start = torch.cuda.Event(enable_timing=True)
                    done = torch.cuda.Event(enable_timing=True)
                    start.record(self.side)
                    self._copy(self._views[(slot, 0)])
                    done.record(self.side)
                job.prepared = [(0, slot, start, done)]
                job.copy_event = done
                job.issued.set()
            else:
                job.ready_event = ready
        self.stats["bytes_copied"] += self.layout.nbytes
        self._unfenced = job
        self._queue.put(job)

    def fence(self) -> None:
        """Makes the parameters safe to change: the last snapshot's copy is complete (CPU) or
        ordered before anything later on the current stream (CUDA)."""
        job, self._unfenced = self._unfenced, None
        if job is None:
            return
        t0 = time.perf_counter()
        job.issued.wait()  # chunked / CPU: the worker issues (CPU: performs) the copies
        if self.cuda and job.copy_event is not None:
            # Stream wait, not a host block: the next optimizer step's kernels queue behind the
            # copy; forward and backward before it already overlapped with it.
            torch.cuda.current_stream(self.device).wait_event(job.copy_event)
        self.stats["fence_wait_seconds"] += time.perf_counter() - t0

    def call_soon(self, fn) -> None:
        """Runs ``fn()`` on the worker after every snapshot submitted so far is applied (it sees
        the averages at a consistent step). ``fn`` reports its own errors."""
        with self.cond:
            self.pending_calls += 1
        self._queue.put(fn)

    def flush(self) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.in_flight == 0 and self.pending_calls == 0)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join()

    # ---- worker thread ----------------------------------------------------------------------
    def _run(self) -> None:
        if self.cuda:
            torch.cuda.set_device(self.device)
        if _per_thread_intraop():
            # The worker's own torch ops (staging and slot copies) are small; run them on this
            # thread instead of waking an OpenMP team that competes with training for the cores.
            # The kernels use offload_ema's own threads.
            torch.set_num_threads(1)
        while True:
            job = self._queue.get()
            if job is None:
                return
            if not isinstance(job, Job):
                try:
                    job()
                finally:
                    with self.cond:
                        self.pending_calls -= 1
                        self.cond.notify_all()
                continue
            try:
                if self.error is None:
                    self._process(job)
            except BaseException as exc:  # reaches the user at the next step / flush / close
                with self.cond:
                    if self.error is None:
                        self.error = exc
            finally:
                with self.cond:
                    self._free.extend(job.held)
                    job.held.clear()
                    if job.eager is not None:
                        self._eager_free.append(job.eager)
                    job.issued.set()  # nobody may wait on a copy that will never be issued
                    self.in_flight -= 1
                    self.cond.notify_all()

    def _process(self, job: Job) -> None:
        if job.eager is not None:
            if job.eager_event is not None:
                job.eager_event.synchronize()  # the buffers' bytes have landed in staging
            self._update(job, self._eager_views[job.eager])
        if job.prepared is not None:
            for chunk, slot, start, done in job.prepared:
                self._apply(job, chunk, slot, start, done)
        else:
            pending: Deque[Tuple[int, int, object, object]] = collections.deque()
            last = len(self.chunks) - 1
            for chunk in range(len(self.chunks)):
                while not self._free:
                    self._apply(job, *pending.popleft())
                with self.cond:
                    slot = self._free.popleft()
                    job.held.append(slot)
                if self.cuda:
                    with torch.cuda.stream(self.side):
                        if chunk == 0:
                            self.side.wait_event(job.ready_event)  # after the optimizer step
                        start = torch.cuda.Event(enable_timing=True)
                        done = torch.cuda.Event(enable_timing=True)
                        start.record(self.side)
                        self._copy(self._views[(slot, chunk)])
                        done.record(self.side)
                    pending.append((chunk, slot, start, done))
                    if chunk == last:
                        job.copy_event = done
                else:
                    t0 = time.perf_counter()
                    self._copy(self._views[(slot, chunk)])
                    job.copy_s += time.perf_counter() - t0
                    pending.append((chunk, slot, None, None))
                if chunk == last:
                    job.issued.set()
            while pending:
                self._apply(job, *pending.popleft())
        self._complete(job)

    def _release(self, job: Job, slot: int) -> None:
        with self.cond:
            job.held.remove(slot)
            self._free.append(slot)
            self.cond.notify_all()

    def _apply(self, job: Job, chunk: int, slot: int, start=None, done=None) -> None:
        """Updates every average the job feeds from one chunk in a slot, then frees the slot."""
        if done is not None:
            done.synchronize()  # the slot's bytes are valid only once its copy has landed
            job.copy_s += start.elapsed_time(done) / 1e3
        self._update(job, self._views[(slot, chunk)])
        self._release(job, slot)

    def _update(self, job: Job, views) -> None:
        t0 = time.perf_counter()
        for piece, flat, _ in views:
            g, lo, hi = piece.group, piece.start, piece.end
            accs, weights = [], []
            for state, w in job.emas:
                acc = state.acc[g][lo:hi]
                if w is None:
                    acc.copy_(flat)  # the first snapshot initialises the EMA exactly
                else:
                    accs.append(acc)
                    weights.append(w)
            if accs:
                ops.ema_update_multi_(accs, flat, weights)
            for state, pos in job.lawas:
                state.slot(pos)[g][lo:hi].copy_(flat)
        job.update_s += time.perf_counter() - t0

    def _complete(self, job: Job) -> None:
        with self.cond:
            for state, _ in job.emas:
                state.applied += 1
                state.last_step = job.step
            for state, pos in job.lawas:
                state.order.append(pos)
                state.applied += 1
                state.last_step = job.step
            st = self.stats
            st["snapshots_applied"] += 1
            st["update_seconds"] += job.update_s
            st["copy_seconds"] += job.copy_s
            st["last_applied_step"] = job.step
            lag = time.perf_counter() - job.submitted
            st["lag_seconds_last"] = lag
            st["lag_seconds_max"] = max(st["lag_seconds_max"], lag)
