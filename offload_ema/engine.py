"""The asynchronous path of a snapshot: parameters -> pinned staging -> averages in host memory.

    optimizer.step() on the main stream
      -> Averager.step: record E_ready; the side stream waits on it and copies the parameters
         (non_blocking) into a staging buffer, then records E_copied          (submit)
      -> worker thread: E_copied.synchronize(), then the ops kernels update every average due at
         that step from the staging buffer, and the buffer is freed           (_process)
      -> before the next in-place change of the parameters, the main stream waits on E_copied
         (a stream wait, not a host block), so the copy never reads half-updated weights (fence)

Staging is a fixed set of buffers allocated once. When one buffer holds a whole snapshot, up to
``len(buffers)`` snapshots are in flight. When the byte budget is smaller than a snapshot, two
buffers take it in chunks: the worker issues the copies of later chunks as it frees buffers, and
the fence must first wait on the host until the last chunk's copy has been issued, i.e. until the
worker has applied all chunks but the last two. That wait is reported as ``fence_wait_seconds``.

On a CPU-only model the same engine runs with the worker doing the copy itself (host memcpy into
the buffer); the fence then waits until that copy is complete.

Ownership: the worker thread alone writes the averages' buffers and their worker-side counters
(``AverageState.applied``, ``last_step``, the LAWA ring's ``order`` / ``next_pos``); the training
thread alone writes the schedule fields (``scheduled``, ``coalesced``). Fields shared by both
(``_free``, ``_tickets``, ``in_flight``, ``error``, ``stats``) are read and written under ``cond``.
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

BUSY_POLICIES = ("block", "skip", "coalesce")


def _per_thread_intraop() -> bool:
    """Whether torch.set_num_threads in one thread leaves the others alone: true of the OpenMP
    backend (a per-thread setting), not of torch's native pool (process-wide)."""
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


class AverageState:
    """One average's host buffers and counters. Buffers and ``applied`` / ``last_step`` /
    ``order`` / ``next_pos`` are written only by the worker; ``scheduled`` and ``coalesced`` only by
    the training thread."""

    def __init__(self, name: str, spec, layout: Layout):
        self.name = name
        self.spec = spec
        self.scheduled = 0   # snapshots handed to the engine               (training thread)
        self.coalesced = 0   # due snapshots merged into the next one (EMA)  (training thread)
        self.applied = 0     # snapshots applied                            (worker)
        self.last_step = 0   # step of the last applied snapshot            (worker)
        if isinstance(spec, EMA):
            self.acc = [torch.zeros(g.numel, dtype=torch.float32) for g in layout.groups]
        else:
            # The LAWA ring: ``window`` entries, filled as the window fills. The worker picks the
            # entry to overwrite when it applies a snapshot, so a snapshot that is dropped (e.g.
            # non-finite gradients) never leaves a hole or a stale entry in the mean.
            self.ring: List[Optional[List[torch.Tensor]]] = [None] * spec.window
            self.order: Deque[int] = collections.deque(maxlen=spec.window)  # oldest first
            self.next_pos = 0
        self._layout = layout

    def ring_entry(self, pos: int) -> List[torch.Tensor]:
        if self.ring[pos] is None:
            self.ring[pos] = [torch.empty(g.numel, dtype=g.dtype) for g in self._layout.groups]
        return self.ring[pos]


class Job:
    """One snapshot: the step, what it feeds, and its copies."""

    def __init__(self, step: int, emas, lawas, found_inf: Optional[torch.Tensor] = None):
        self.step = step
        # (state, weight): the weight of this snapshot for an EMA that is already initialised;
        # the worker initialises an EMA (copy) from the first snapshot it applies to it.
        self.emas: List[Tuple[AverageState, float]] = emas
        self.lawas: List[AverageState] = lawas
        self.lawa_pos: Dict[int, int] = {}  # id(state) -> ring entry, chosen by the worker
        # GradScaler's found_inf for a fused optimizer's step (which runs the post-hook even when
        # it skipped the update): the snapshot of a step with non-finite gradients is dropped.
        self.found_inf = found_inf
        self.dropped: Optional[bool] = None  # decided by the worker before the first update
        self.ticket: Optional[int] = None    # per-job resources: buffer staging, found_inf flag
        self.prepared = None        # [(chunk, buffer, start event, done event)] issued by submit
        self.buffers_event = None   # CUDA event after the averaged module buffers' copy
        self.flag_event = None      # CUDA event after found_inf's copy into a pinned flag
        self.ready_event = None     # CUDA event after the optimizer step (chunked copies)
        self.copy_event = None      # CUDA event after the last copy: what the fence waits on
        self.issued = threading.Event()  # every copy issued (CUDA) / done (CPU)
        self.held: List[int] = []   # staging buffers this job holds
        # Sources of side-stream copies, kept alive until the copy has completed: a parameter
        # whose storage is replaced meanwhile (model.half(), load_state_dict(assign=True), FSDP2
        # resharding) would otherwise return its block to the caching allocator, which can hand
        # it to the main stream while the side stream still reads it.
        self.sources: List[torch.Tensor] = []
        self.submitted = time.perf_counter()
        self.copy_s = 0.0
        self.update_s = 0.0


class Engine:
    """Staging, copies, the copy fence and the worker thread of one Averager.

    Interface: ``busy`` / ``wait_capacity`` / ``submit`` / ``fence`` (training thread), ``run_after``
    (a callable run on the worker once everything submitted before it is applied), ``flush``,
    ``close``, ``stats_snapshot``, ``error``.
    """

    def __init__(self, layout: Layout, staging_bytes: Optional[int] = None):
        self.layout = layout
        self.device = layout.device
        self.cuda = self.device.type == "cuda"
        # A rank that owns no tensor (DDP with fewer tensors than ranks) still runs the schedule;
        # its staging is the minimum so that every size below stays valid.
        snapshot = max(layout.nbytes, ALIGN)
        if staging_bytes is None:
            staging_bytes = 2 * snapshot
        if isinstance(staging_bytes, bool) or not isinstance(staging_bytes, int) or (
                staging_bytes < 2 * ALIGN):
            raise ValueError(f"staging_bytes must be an int >= {2 * ALIGN}, got {staging_bytes!r}")
        if staging_bytes >= snapshot:
            n_buffers, buffer_bytes = staging_bytes // snapshot, snapshot
        else:
            n_buffers, buffer_bytes = 2, staging_bytes // 2
        self.chunks = layout.plan(buffer_bytes)
        # Snapshots that may be in flight at once: one per buffer when a buffer holds a snapshot;
        # one in chunked mode (its chunks take both buffers in turn).
        self.capacity = n_buffers if len(self.chunks) <= 1 else 1
        self.staging = [torch.empty(buffer_bytes, dtype=torch.uint8, pin_memory=self.cuda)
                        for _ in range(n_buffers)]
        self._copy_plans: Dict[int, tuple] = {}  # id(views) -> what _copy needs, built once
        self._views = {(s, c): self._make_views(self.staging[s], self.chunks[c])
                       for s in range(n_buffers) for c in range(len(self.chunks))}
        # Averaged module buffers change in place during the next forward, long before the
        # fence: they are copied at once, on the main thread / stream, into an area of their own
        # (one per in-flight snapshot, like the found_inf flags).
        buf_bytes = layout.buffers_nbytes
        self.buffer_staging = [torch.empty(buf_bytes, dtype=torch.uint8, pin_memory=self.cuda)
                               for _ in range(self.capacity if buf_bytes else 0)]
        buf_chunks = layout.plan(max(buf_bytes, 1), buffers=True)
        self._buffer_views = [self._make_views(t, buf_chunks[0]) for t in self.buffer_staging]
        self._flags = torch.zeros(self.capacity, dtype=torch.float32, pin_memory=self.cuda)
        self._tickets: Deque[int] = collections.deque(range(self.capacity))
        # Host staging in all (pinned on a GPU): the parameter buffers within the budget, plus the
        # averaged module buffers' small area.
        self.staging_nbytes = sum(t.numel() for t in self.staging + self.buffer_staging)
        self._free: Deque[int] = collections.deque(range(n_buffers))
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

    def _copy(self, views, job: Optional[Job] = None) -> None:
        """Copies the live tensors into staging views (async on the current stream when they
        are on a GPU; then ``job`` keeps the sources alive until the copy has completed)."""
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
        with torch.no_grad():  # no autograd nodes for FSDP2's to_local() / slices
            if dynamic:
                srcs = list(srcs)
                for i, part in dynamic:
                    t = local_tensor(part.entry.tensor).detach()
                    srcs[i] = t if part.whole else t.reshape(-1)[part.start:part.end]
            torch._foreach_copy_(dsts, srcs, non_blocking=self.cuda)
        if job is not None and self.cuda:
            job.sources.extend(s.detach() for s in srcs)  # the storages as read now

    # ---- main thread ----------------------------------------------------------------------
    def busy(self) -> bool:
        with self.cond:
            return self.in_flight >= self.capacity

    def wait_capacity(self) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.in_flight < self.capacity or self.error is not None)

    def submit(self, job: Job) -> None:
        """Hands a snapshot to the engine. The caller has checked capacity. If this raises
        (e.g. out of memory while issuing a copy), nothing of the job remains: its staging and
        ticket are returned and the fence does not wait for it."""
        with self.cond:
            if self.in_flight >= self.capacity:
                raise RuntimeError("submit called with no staging free (check busy() first)")
            self.in_flight += 1
            job.ticket = self._tickets.popleft()
            if self.cuda and len(self.chunks) == 1:
                job.held.append(self._free.popleft())
        try:
            self._issue(job)
        except BaseException:
            with self.cond:
                self._free.extend(job.held)
                job.held.clear()
                self._tickets.append(job.ticket)
                self.in_flight -= 1
                self.cond.notify_all()
            raise
        self.stats_add("bytes_copied", self.layout.nbytes)
        self._unfenced = job
        self._queue.put(job)

    def _issue(self, job: Job) -> None:
        """The training thread's part of a snapshot: what must happen on the main stream now."""
        main = torch.cuda.current_stream(self.device) if self.cuda else None
        if self.cuda and job.found_inf is not None:
            # On the main stream, after the step that computed it; read by the worker after
            # flag_event (no host sync here).
            flag = self._flags[job.ticket:job.ticket + 1]
            flag.copy_(job.found_inf.detach().reshape(-1)[:1], non_blocking=True)
            job.flag_event = torch.cuda.Event(blocking=True)
            job.flag_event.record(main)
        if self._buffer_views:
            # On the current stream: ordered after the optimizer step and before the next forward
            # that updates the buffers in place.
            self._copy(self._buffer_views[job.ticket])
            if self.cuda:
                job.buffers_event = torch.cuda.Event(blocking=True)
                job.buffers_event.record(main)
        if not self.chunks:  # this rank averages no parameters (DDP): nothing to copy
            job.issued.set()
            return
        if not self.cuda:
            return  # the worker copies (and the fence waits for it)
        ready = torch.cuda.Event()
        ready.record(main)  # after the optimizer step's kernels
        if len(self.chunks) > 1:
            job.ready_event = ready  # the worker issues the chunks as buffers free up
            return
        buf = job.held[0]
        # The copy must start only after the optimizer step has written the parameters.
        self.side.wait_event(ready)
        start, done = self._copy_on_side(self._views[(buf, 0)], job)
        job.prepared = [(0, buf, start, done)]
        job.copy_event = done
        job.issued.set()

    def _copy_on_side(self, views, job: Job):
        """Records a start event, issues the copy and records a done event on the side stream."""
        with torch.cuda.stream(self.side):
            start = torch.cuda.Event(enable_timing=True, blocking=True)
            done = torch.cuda.Event(enable_timing=True, blocking=True)
            start.record(self.side)
            self._copy(views, job)
            done.record(self.side)
        return start, done

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
        self.stats_add("fence_wait_seconds", time.perf_counter() - t0)

    def run_after(self, fn) -> None:
        """Runs ``fn()`` on the worker after every snapshot submitted so far is applied (it sees
        the averages at a consistent step). ``fn`` reports its own errors."""
        with self.cond:
            self.pending_calls += 1
        self._queue.put(fn)

    def flush(self) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.in_flight == 0 and self.pending_calls == 0)

    def stats_add(self, key: str, value: float) -> None:
        with self.cond:
            self.stats[key] += value

    def stats_snapshot(self) -> Tuple[Dict[str, float], int]:
        """(a copy of the counters, snapshots in flight), read together under the lock."""
        with self.cond:
            return dict(self.stats), self.in_flight

    def close(self) -> None:
        """Applies what is in flight, stops the worker and releases the staging. Idempotent;
        safe from the worker itself (a garbage collection there): it then only asks it to stop."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join()
        self._release_staging()

    def _release_staging(self) -> None:
        self._copy_plans.clear()
        self._views.clear()
        self._buffer_views.clear()
        self.staging = []
        self.buffer_staging = []

    # ---- worker thread ----------------------------------------------------------------------
    def _run(self) -> None:
        if self.cuda:
            torch.cuda.set_device(self.device)
        if _per_thread_intraop():
            # The worker's own torch ops (staging copies) are small; run them on this thread
            # instead of waking an OpenMP team that competes with training for the cores. The
            # kernels use offload_ema's own threads.
            torch.set_num_threads(1)
        while True:
            job = self._queue.get()
            if job is None:
                return
            if not isinstance(job, Job):
                try:
                    job()
                finally:
                    # A run_after callable may hold its Averager: not kept while idle, or a
                    # dropped Averager could never be collected (and this thread never end).
                    job = None
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
                    self._tickets.append(job.ticket)
                    job.sources = []
                    job.issued.set()  # nobody may wait on a copy that will never be issued
                    self.in_flight -= 1
                    self.cond.notify_all()
                job = None

    def _process(self, job: Job) -> None:
        for st in job.lawas:  # the ring entry this snapshot fills: the oldest once full
            job.lawa_pos[id(st)] = st.next_pos
        if self._buffer_views:
            if job.buffers_event is not None:
                job.buffers_event.synchronize()  # the module buffers' bytes are in staging
            self._update(job, self._buffer_views[job.ticket])
        if job.prepared is not None:
            for chunk, buf, start, done in job.prepared:
                self._apply(job, chunk, buf, start, done)
        else:
            issued: Deque[Tuple[int, int, object, object]] = collections.deque()
            last = len(self.chunks) - 1
            for chunk in range(len(self.chunks)):
                while not self._free:
                    self._apply(job, *issued.popleft())
                with self.cond:
                    buf = self._free.popleft()
                    job.held.append(buf)
                if self.cuda:
                    if chunk == 0:
                        self.side.wait_event(job.ready_event)  # after the optimizer step
                    start, done = self._copy_on_side(self._views[(buf, chunk)], job)
                    issued.append((chunk, buf, start, done))
                    if chunk == last:
                        job.copy_event = done
                else:
                    t0 = time.perf_counter()
                    self._copy(self._views[(buf, chunk)])
                    job.copy_s += time.perf_counter() - t0
                    issued.append((chunk, buf, None, None))
                if chunk == last:
                    job.issued.set()
            while issued:
                self._apply(job, *issued.popleft())
        self._complete(job)

    def _release(self, job: Job, buf: int) -> None:
        with self.cond:
            job.held.remove(buf)
            self._free.append(buf)
            self.cond.notify_all()

    def _apply(self, job: Job, chunk: int, buf: int, start=None, done=None) -> None:
        """Updates every average the job feeds from one chunk in a buffer, then frees it."""
        if done is not None:
            # The buffer's bytes are valid only once its copy has landed. A blocking-sync event:
            # the worker sleeps instead of spinning a core that training's data loader needs.
            done.synchronize()
            job.copy_s += start.elapsed_time(done) / 1e3
        self._update(job, self._views[(buf, chunk)])
        self._release(job, buf)

    def _is_dropped(self, job: Job) -> bool:
        """Whether the job's step had non-finite gradients (its optimizer skipped the update)."""
        if job.dropped is None:
            if job.found_inf is None:
                job.dropped = False
            elif self.cuda:
                # The flag's bytes have landed (long since, if a parameter copy already has).
                job.flag_event.synchronize()
                job.dropped = bool(self._flags[job.ticket].item() != 0)
            else:
                job.dropped = bool(job.found_inf.reshape(-1)[0].item() != 0)
        return job.dropped

    def _update(self, job: Job, views) -> None:
        if self._is_dropped(job):
            return
        t0 = time.perf_counter()
        for piece, flat, _ in views:
            g, lo, hi = piece.group, piece.start, piece.end
            accs, weights = [], []
            for state, w in job.emas:
                acc = state.acc[g][lo:hi]
                if state.applied == 0:
                    acc.copy_(flat)  # the first applied snapshot initialises the EMA exactly
                else:
                    accs.append(acc)
                    weights.append(w)
            if accs:
                ops.ema_update_multi_(accs, flat, weights)
            for state in job.lawas:
                state.ring_entry(job.lawa_pos[id(state)])[g][lo:hi].copy_(flat)
        job.update_s += time.perf_counter() - t0

    def _complete(self, job: Job) -> None:
        dropped = self._is_dropped(job)  # also on a rank with nothing to copy (DDP)
        with self.cond:
            st = self.stats
            if dropped:
                st["snapshots_dropped_nonfinite"] += 1
                return
            for state, _ in job.emas:
                state.applied += 1
                state.last_step = job.step
            for state in job.lawas:
                pos = job.lawa_pos[id(state)]
                state.order.append(pos)
                state.next_pos = (pos + 1) % state.spec.window
                state.applied += 1
                state.last_step = job.step
            st["snapshots_applied"] += 1
            st["update_seconds"] += job.update_s
            st["copy_seconds"] += job.copy_s
            st["last_applied_step"] = job.step
            lag = time.perf_counter() - job.submitted
            st["lag_seconds_last"] = lag
            st["lag_seconds_max"] = max(st["lag_seconds_max"], lag)
