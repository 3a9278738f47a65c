"""The asynchronous path of a snapshot: parameters -> staging -> averages in host memory.

    optimizer.step() on the main stream
      -> submit (training thread): record E_ready; the side stream waits on it and copies the
         parameters (non_blocking) into a staging buffer, then records E_copied
      -> worker thread: waits for E_copied, then the ops kernels update every average due at
         that step from the staging buffer, and the buffer is freed
      -> fence (training thread, before the next in-place change of the parameters): the main
         stream waits on E_copied (a stream wait, not a host block), so the copy never reads
         half-updated weights

Streams, events and copies come from ``offload_ema.device`` (CUDA, host, or the simulated copy
engine of ``offload_ema.testing``). Staging is a fixed set of buffers allocated once (pinned on a
GPU). When one buffer holds a whole snapshot, up to ``len(buffers)`` snapshots are in flight.
When the byte budget is smaller than a snapshot, two buffers take it in chunks: the worker issues
the copies of later chunks as it frees buffers, and the fence must first wait on the host until
the last chunk's copy has been issued (``fence_wait_seconds``). On a CPU-only model the worker
does the copy itself (host memcpy) and the fence waits until it has.

Ownership: the worker thread alone writes the averages (:class:`AverageBuffers`); the training
thread alone calls ``busy`` / ``wait_capacity`` / ``submit`` / ``fence`` / ``recover``. They
share the tickets (one per snapshot in flight, a ``queue.SimpleQueue``) and the free staging
buffers (a deque): single atomic operations, no lock. The worker's counters (``_stats``,
``_pending_calls``) are guarded by ``_cond``. The averages are read (``values``,
``export_state``) only while the worker is idle (after ``flush``) or from a ``run_after``
callable, which runs on the worker (``read`` does that for any thread).

Interrupts: a ``KeyboardInterrupt`` (or any exception) may land on any line of the training
thread's calls, so the step path holds no Python-level lock (an exception between acquire and
release would leave it held, and the worker waiting forever). Work in flight is counted by
tickets taken, each in one atomic operation, and a job is put in the queue together with
``_last_queued_step`` on one line: ``recover`` can tell whether the interrupted step's job
reached the worker, and give back what an unqueued job held.
"""
from __future__ import annotations

import collections
import queue
import threading
import time
from typing import Deque, Dict, Iterator, List, Mapping, Optional, Tuple

import torch

from offload_ema import device as device_mod
from offload_ema import ops
from offload_ema.averages import Decaying, check_int
from offload_ema.layout import ALIGN, Entry, Layout, is_dtensor, local_tensor


def _per_thread_intraop() -> bool:
    """Whether torch.set_num_threads in one thread leaves the others alone: true of the OpenMP
    backend (a per-thread setting), not of torch's native pool (process-wide)."""
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


class AverageBuffers:
    """One average's host memory and the counters that go with it. Worker-owned."""

    def __init__(self, spec, layout: Layout):
        self.spec = spec
        self.applied = 0     # snapshots applied
        self.periods = 0     # due periods they stood for (accumulators; > applied if coalesced)
        self.last_step = 0   # step of the last applied snapshot
        self._layout = layout
        if isinstance(spec, Decaying):
            self.acc = [torch.zeros(g.numel, dtype=torch.float32) for g in layout.groups]
        else:
            # The LAWA ring: ``window`` entries, allocated as the window fills. The worker picks
            # the entry to overwrite when it applies a snapshot (the oldest once full), so a
            # dropped snapshot (non-finite gradients) leaves no hole or stale entry in the mean.
            self.ring: List[Optional[List[torch.Tensor]]] = [None] * spec.window
            self.order: Deque[int] = collections.deque(maxlen=spec.window)  # oldest first
            self.next_pos = 0

    def ring_entry(self, pos: int) -> List[torch.Tensor]:
        if self.ring[pos] is None:
            self.ring[pos] = [torch.empty(g.numel, dtype=g.dtype) for g in self._layout.groups]
        return self.ring[pos]

    def nbytes(self) -> int:
        """Host bytes held; read under the engine's lock (``order`` changes under it)."""
        if isinstance(self.spec, Decaying):
            return sum(a.numel() * 4 for a in self.acc)
        entry = sum(g.numel * torch.empty((), dtype=g.dtype).element_size()
                    for g in self._layout.groups)
        return len(self.order) * entry


class Job:
    """One snapshot: the step, what it feeds, and its copies."""

    def __init__(self, step: int, emas, lawas, found_inf: Optional[torch.Tensor]):
        self.step = step
        # (buffers, periods): accumulators and the due periods this snapshot stands for. The
        # worker turns them into weights from the periods it has applied (exact under drops and
        # coalescing); the first snapshot applied initialises an accumulator (a copy).
        self.emas: List[Tuple[AverageBuffers, int]] = emas
        self.weights: List[float] = []
        self.lawas: List[AverageBuffers] = lawas
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
        self.issued = threading.Event()  # every copy issued (async) / done (host)
        self.held: List[int] = []   # staging buffers this job holds
        self.schedule = None        # the schedule's state once this job was taken
        # Sources of deferred copies, kept alive until the copy has completed: a parameter whose
        # storage is replaced meanwhile (model.half(), load_state_dict(assign=True), FSDP2
        # resharding) would otherwise return its block to the caching allocator, which can hand
        # it to the main stream while the side stream still reads it.
        self.sources: List[torch.Tensor] = []
        self.submitted = time.perf_counter()
        self.copy_s = 0.0
        self.update_s = 0.0


class Engine:
    """Staging, copies, the copy fence, the worker thread and the averages' host memory.

    Training thread: ``busy``, ``wait_capacity``, ``submit``, ``fence``. Any thread: ``run_after``
    (a callable run on the worker once everything submitted before it is applied), ``flush``,
    ``close``, ``stats``, ``raise_error``. Reads of the averages: ``applied``, ``values``,
    ``export_state`` / ``import_state``, ``host_bytes`` (worker idle, or from ``run_after``).
    """

    def __init__(self, layout: Layout, specs: Mapping[str, object],
                 staging_bytes: Optional[int] = None):
        self.layout = layout
        self._ops = device_mod.ops_for(layout.device)
        self.asynchronous = self._ops.asynchronous
        # A rank that owns no tensor (DDP with fewer tensors than ranks) still runs the schedule;
        # its staging is the minimum, so that every size below stays valid.
        snapshot = max(layout.nbytes, ALIGN)
        if staging_bytes is None:
            staging_bytes = 2 * snapshot
        staging_bytes = check_int(staging_bytes, "staging_bytes", 2 * ALIGN)
        if staging_bytes >= snapshot:
            n_buffers, buffer_bytes = staging_bytes // snapshot, snapshot
        else:
            n_buffers, buffer_bytes = 2, staging_bytes // 2
        self._chunks = layout.plan(buffer_bytes)
        # Snapshots in flight at once: one per buffer when a buffer holds a snapshot; one in
        # chunked mode (its chunks take both buffers in turn).
        self.capacity = n_buffers if len(self._chunks) <= 1 else 1
        buf_bytes = layout.buffers_nbytes
        # One host allocation carved into every staging area (pinned exactly on a GPU: no
        # per-buffer rounding up to a power of two).
        areas = self._ops.alloc_host([buffer_bytes] * n_buffers + [buf_bytes] * (
            self.capacity if buf_bytes else 0) + [4 * self.capacity])
        self._staging = areas[:n_buffers]
        self._copy_plans: Dict[int, tuple] = {}  # id(views) -> what _copy needs, built once
        self._views = {(s, c): self._make_views(self._staging[s], self._chunks[c])
                       for s in range(n_buffers) for c in range(len(self._chunks))}
        # Averaged module buffers change in place during the next forward, long before the
        # fence: they are copied at once, on the main stream, into an area of their own (one per
        # in-flight snapshot, like the found_inf flags).
        self._buffer_staging = areas[n_buffers:-1]
        buf_chunks = layout.plan(max(buf_bytes, 1), buffers=True)
        self._buffer_views = [self._make_views(t, buf_chunks[0]) for t in self._buffer_staging]
        self._flags = areas[-1].view(torch.float32)
        self._flags.zero_()
        self.staging_nbytes = sum(t.numel() for t in self._staging + self._buffer_staging)
        self.pinned_nbytes = self._ops.pinned_nbytes
        self.n_staging = n_buffers
        self.chunks_per_snapshot = len(self._chunks)

        self.averages: Dict[str, AverageBuffers] = {
            n: AverageBuffers(spec, layout) for n, spec in specs.items()}  # worker-owned
        self._cond = threading.Condition()
        self._free: Deque[int] = collections.deque(range(n_buffers))        # atomic ops only
        self._tickets: "queue.SimpleQueue[int]" = queue.SimpleQueue()       # atomic ops only
        for t in range(self.capacity):
            self._tickets.put(t)
        self._ticket_back = threading.Event()  # set by the worker when it returns a ticket
        self._pending_calls = 0                                             # under _cond
        self._error: Optional[BaseException] = None  # set once by the worker (under _cond)
        self._fence_wait = 0.0                                              # training thread
        self._error_reported = False                                        # training thread
        self._stats: Dict[str, float] = collections.defaultdict(float)     # under _cond
        self.applied_schedule = None  # schedule state of the last job done      (under _cond)
        self._unfenced: Optional[Job] = None                                # training thread
        self._submitting: Optional[Job] = None                              # training thread
        self._last_queued_step = 0                                          # training thread
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

    def _copy(self, views, stream=None, job: Optional[Job] = None) -> None:
        """Copies the live tensors into staging views, on ``stream`` (deferred when the
        device is asynchronous; then ``job`` keeps the sources alive until the copy is done)."""
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
        # No autograd nodes for FSDP2's to_local() or slices. On the copy's stream: reshape(-1)
        # of a non-contiguous parameter (channels_last) runs a kernel whose output the copy
        # reads; on another stream nothing would order the two. One line: an interrupt cannot
        # leave grad mode off or the stream switched on the training thread.
        with torch.no_grad(), self._ops.stream_context(stream): self._copy_plan(plan, stream, job)  # noqa: E701,E501

    def _copy_plan(self, plan, stream, job: Optional[Job]) -> None:
        dsts, srcs, dynamic = plan
        if dynamic:
            srcs = list(srcs)
            for i, part in dynamic:
                t = local_tensor(part.entry.tensor).detach()
                srcs[i] = t if part.whole else t.reshape(-1)[part.start:part.end]
        if job is not None and self.asynchronous:
            # Taken before the copy is issued: a storage swapped in between must not be freed
            # while the deferred copy reads it.
            srcs = [s.detach() for s in srcs]
            job.sources.extend(srcs)
        try:
            self._ops.copy(stream, dsts, srcs)
        except RuntimeError as exc:
            self.layout.check_shapes(during_copy=True)  # says which tensor, if one changed
            raise RuntimeError(
                f"copying the parameters into staging failed ({exc}): did a parameter change "
                "shape or storage while its snapshot was being copied? Call avg.fence() before "
                "changing parameters in place") from exc

    # ---- training thread --------------------------------------------------------------------
    def busy(self) -> bool:
        return self._tickets.empty()

    def wait_capacity(self) -> None:
        # Re-checks the real condition each time: a wake-up lost between wait() and clear()
        # costs at most the timeout.
        while self._tickets.empty() and self._error is None:
            self._ticket_back.wait(0.05)
            self._ticket_back.clear()

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
        periods it stands for) and
        the LAWAs ``lawas``; ``schedule`` is the schedule's state once this job is taken (what a
        consistent read reports with the averages). The caller has checked ``busy()``. If this
        raises (out of memory while issuing a copy, an interrupt), call ``recover(step)``."""
        job = Job(step, [(self.averages[n], p) for n, p in emas],
                  [self.averages[n] for n in lawas], found_inf)
        job.schedule = schedule
        self._submitting = job
        try:
            job.ticket = self._tickets.get_nowait()
        except queue.Empty:
            raise RuntimeError("submit called with no staging free (check busy() first)") from None
        if self.asynchronous and len(self._chunks) == 1:
            job.held = [self._free.popleft()]
        self._issue(job)
        self._unfenced = job
        self._queue.put(job); self._last_queued_step = step  # noqa: E702 (one line: see doc)
        self._submitting = None

    def recover(self, step: int) -> bool:
        """After ``submit`` (or the step around it) raised: whether the job of ``step`` reached
        the worker. If it did not, what it held is given back and the fence forgets it."""
        job, self._submitting = self._submitting, None
        if self._last_queued_step == step:
            return True
        if job is not None:
            self._ops.drain()  # copies it issued may still read its sources / write its staging
            self._free.extend(job.held)
            job.held = []
            if job.ticket is not None:
                self._tickets.put(job.ticket)
                job.ticket = None
            self._ticket_back.set()
            with self._cond: self._cond.notify_all()  # noqa: E701 (one line: no lock left held)
            job.issued.set()
            if self._unfenced is job:
                self._unfenced = None
        return False

    def _issue(self, job: Job) -> None:
        """The training thread's part of a snapshot: what must be ordered on the main stream."""
        dev = self._ops
        main = dev.main_stream() if self.asynchronous else None
        if self.asynchronous and job.found_inf is not None:
            # After the step that computed it; read by the worker after flag_event (no host sync
            # on this thread).
            # On this device's main stream (a copy from another device would run on that
            # device's stream, which flag_event does not cover).
            flag = job.found_inf.detach().reshape(-1)[:1].to(self.layout.device, non_blocking=True)
            dev.copy(main, [self._flags[job.ticket:job.ticket + 1]], [flag])
            job.flag_event = dev.record(main)
        if self._buffer_views:
            # Ordered after the optimizer step and before the next forward, which updates the
            # module buffers in place.
            self._copy(self._buffer_views[job.ticket], main)
            if self.asynchronous:
                job.buffers_event = dev.record(main)
        if not self._chunks:  # this rank averages no parameters (DDP): nothing to copy
            job.issued.set()
            return
        if not self.asynchronous:
            return  # the worker copies (and the fence waits for it)
        ready = dev.record(main)  # after the optimizer step's kernels
        if len(self._chunks) > 1:
            job.ready_event = ready  # the worker issues the chunks as buffers free up
            return
        buf = job.held[0]
        dev.stream_wait(dev.side, ready)  # the copy reads what the optimizer step wrote
        start, done = self._copy_on_side(self._views[(buf, 0)], job)
        job.prepared = [(0, buf, start, done)]
        job.copy_event = done
        job.issued.set()

    def _copy_on_side(self, views, job: Job):
        dev = self._ops
        start = dev.record(dev.side, timing=True)
        self._copy(views, dev.side, job)
        return start, dev.record(dev.side, timing=True)

    def fence(self) -> None:
        """Makes the parameters safe to change: the last snapshot's copy is complete (host) or
        ordered before anything later on the main stream (asynchronous devices)."""
        job = self._unfenced
        if job is None:
            return
        t0 = time.perf_counter()
        job.issued.wait()  # chunked / host: the worker issues (host: performs) the copies
        if self.asynchronous and job.copy_event is not None:
            # Stream wait, not a host block: the next optimizer step's kernels queue behind the
            # copy; forward and backward before it already overlapped with it.
            self._ops.stream_wait(self._ops.main_stream(), job.copy_event)
        # Forgotten only now: an interrupted wait leaves the fence to the next call.
        self._unfenced = None
        self._fence_wait += time.perf_counter() - t0

    # ---- any thread ---------------------------------------------------------------------------
    def run_after(self, fn) -> None:
        """Runs ``fn()`` on the worker after every snapshot submitted so far is applied (it sees
        the averages at a consistent step). ``fn`` reports its own errors."""
        # One line: an interrupt can leave neither a call counted but not queued, nor the lock
        # held.
        with self._cond: self._queue.put(fn); self._pending_calls += 1  # noqa: E701,E702

    def read(self, fn):
        """``fn()``'s result, computed on the worker after every snapshot submitted so far is
        applied and before any later one: a consistent read from any thread."""
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
        done.wait()
        ok, value = result[0]
        if not ok:
            raise value
        return value

    def flush(self) -> None:
        with self._cond: self._cond.wait_for(self._idle)  # noqa: E701 (see run_after)

    def _idle(self) -> bool:
        return self._tickets.qsize() == self.capacity and self._pending_calls == 0

    def stats(self) -> Tuple[Dict[str, float], int]:
        """(a copy of the counters, snapshots in flight), read together under the lock."""
        with self._cond: s = dict(self._stats)  # noqa: E701 (see run_after)
        s["fence_wait_seconds"] = self._fence_wait
        return s, self.capacity - self._tickets.qsize()

    def report(self) -> Dict[str, object]:
        """The engine's part of ``Averager.stats()``, read under the lock."""
        s, in_flight = self.stats()
        return {
            "snapshots_applied": int(s.get("snapshots_applied", 0)),
            "snapshots_dropped_nonfinite": int(s.get("snapshots_dropped_nonfinite", 0)),
            "in_flight": in_flight, "last_applied_step": int(s.get("last_applied_step", 0)),
            "bytes_copied": int(s.get("bytes_copied", 0)),
            **{k: s.get(k, 0.0) for k in ("copy_seconds", "update_seconds", "fence_wait_seconds",
                                          "lag_seconds_last", "lag_seconds_max")},
            "snapshot_bytes": self.layout.nbytes, "staging_bytes": self.staging_nbytes,
            "pinned_bytes": self.pinned_nbytes, "staging_buffers": self.n_staging,
            "chunks_per_snapshot": self.chunks_per_snapshot, "host_bytes": self.host_bytes(),
            "averaged_tensors": len(self.layout.entries), "device": str(self.layout.device),
        }

    def set_last_applied_step(self, step: int) -> None:
        with self._cond:
            self._stats["last_applied_step"] = step

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
        """Applies what is in flight, stops the worker and releases the staging. Idempotent;
        from the worker itself (a garbage collection there) it only asks it to stop."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join()
        self._copy_plans.clear()
        self._views.clear()
        self._buffer_views.clear()
        self._staging, self._buffer_staging, self._flags = [], [], None
        self._ops.free_host()

    # ---- reading the averages (worker idle, or on the worker) -------------------------------
    def applied(self, name: str) -> int:
        return self.averages[name].applied

    def values(self, name: str) -> Iterator[Tuple[Entry, torch.Tensor]]:
        """(entry, float32 CPU tensor of its average) for this rank's entries: EMA accumulators
        as views, LAWA means computed now."""
        b = self.averages[name]
        if isinstance(b.spec, Decaying):
            for e in self.layout.entries:
                yield e, b.acc[e.group][e.offset:e.offset + e.numel].view(e.shape)
        else:
            ring = [b.ring[pos] for pos in b.order]
            for e in self.layout.entries:
                out = torch.empty(e.shape, dtype=torch.float32)
                ops.mean_(out.view(-1), [r[e.group][e.offset:e.offset + e.numel] for r in ring])
                yield e, out

    def copies(self, name: str) -> Optional[Dict[str, torch.Tensor]]:
        """This rank's averaged entries as float32 tensors of their own (None before the first
        applied snapshot)."""
        if self.averages[name].applied == 0:
            return None
        copy = isinstance(self.averages[name].spec, Decaying)  # values are the accumulators
        return {e.name: (v.clone() if copy else v) for e, v in self.values(name)}

    def export_state(self, name: str) -> dict:
        """One average's state (copies), with the counters it goes with."""
        b = self.averages[name]
        d = {"applied": b.applied, "last_step": b.last_step, "periods": b.periods}
        if isinstance(b.spec, Decaying):
            d["acc"] = [a.clone() for a in b.acc]
        else:
            d["slots"] = {pos: [t.clone() for t in b.ring[pos]] for pos in b.order}
            d["order"] = list(b.order)
            d["next_pos"] = b.next_pos
        return d

    def import_state(self, name: str, d: dict) -> None:
        b = self.averages[name]
        b.applied, b.last_step = d["applied"], d["last_step"]
        b.periods = d.get("periods", b.applied)  # states saved before periods were counted
        if isinstance(b.spec, Decaying):
            for a, saved in zip(b.acc, d["acc"]):
                a.copy_(saved)
        else:
            b.ring = [None] * b.spec.window
            b.order.clear()
            for pos in d["order"]:
                for t, saved in zip(b.ring_entry(pos), d["slots"][pos]):
                    t.copy_(saved)
                b.order.append(pos)
            b.next_pos = d["next_pos"]

    def host_bytes(self) -> int:
        """Host memory held: averages (LAWA entries filled so far) and staging."""
        with self._cond:
            return self.staging_nbytes + sum(b.nbytes() for b in self.averages.values())

    # ---- worker thread ----------------------------------------------------------------------
    def _run(self) -> None:
        self._ops.thread_init()
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
                    with self._cond:
                        self._pending_calls -= 1
                        self._cond.notify_all()
                continue
            try:
                if self._error is None:
                    self._process(job)
            except BaseException as exc:  # reaches the user at the next step / flush / close
                with self._cond:
                    if self._error is None:
                        self._error = exc
                # Copies of this job may still be running: its staging and sources are released
                # below, so wait for them first.
                self._ops.drain()
            finally:
                with self._cond:
                    self._free.extend(job.held)
                    job.held = []
                    self._tickets.put(job.ticket)
                    self._ticket_back.set()
                    job.sources = []
                    job.issued.set()  # nobody may wait on a copy that will never be issued
                    self._stats["bytes_copied"] += self.layout.nbytes
                    if job.schedule is not None:
                        self.applied_schedule = job.schedule
                    self._cond.notify_all()
                job = None

    def _process(self, job: Job) -> None:
        job.weights = [b.spec.weight(b.periods, p) for b, p in job.emas]
        # A parameter replaced, frozen or added since the Averager was built: stop with a clear
        # error instead of averaging a tensor training no longer changes.
        self.layout.check_model()
        for b in job.lawas:  # the ring entry this snapshot fills: the oldest once full
            job.lawa_pos[id(b)] = b.next_pos
        if self._buffer_views:
            if job.buffers_event is not None:
                self._ops.host_wait(job.buffers_event)  # the buffers' bytes are in staging
            self._update(job, self._buffer_views[job.ticket])
        if job.prepared is not None:
            for chunk, buf, start, done in job.prepared:
                self._apply(job, chunk, buf, start, done)
        else:
            issued: Deque[Tuple[int, int, object, object]] = collections.deque()
            last = len(self._chunks) - 1
            for chunk in range(len(self._chunks)):
                while not self._free:
                    self._apply(job, *issued.popleft())
                buf = self._free.popleft()
                job.held.append(buf)
                if self.asynchronous:
                    if chunk == 0:  # after the optimizer step
                        self._ops.stream_wait(self._ops.side, job.ready_event)
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

    def _apply(self, job: Job, chunk: int, buf: int, start=None, done=None) -> None:
        """Updates every average the job feeds from one chunk in a buffer, then frees it."""
        if done is not None:
            self._ops.host_wait(done)  # the buffer's bytes are valid only once the copy landed
            job.copy_s += self._ops.elapsed_seconds(start, done)
        self._update(job, self._views[(buf, chunk)])
        with self._cond:
            job.held.remove(buf)
            self._free.append(buf)
            self._cond.notify_all()

    def _is_dropped(self, job: Job) -> bool:
        """Whether the job's step had non-finite gradients (its optimizer skipped the update)."""
        if job.dropped is None:
            if job.found_inf is None:
                job.dropped = False
            elif self.asynchronous:
                # The flag's bytes have landed (long since, if a parameter copy already has).
                self._ops.host_wait(job.flag_event)
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
            for (b, _), w in zip(job.emas, job.weights):
                acc = b.acc[g][lo:hi]
                if b.applied == 0:
                    acc.copy_(flat)  # the first applied snapshot initialises the EMA exactly
                else:
                    accs.append(acc)
                    weights.append(w)
            if accs:
                ops.ema_update_multi_(accs, flat, weights)
            for b in job.lawas:
                b.ring_entry(job.lawa_pos[id(b)])[g][lo:hi].copy_(flat)
        job.update_s += time.perf_counter() - t0

    def _complete(self, job: Job) -> None:
        dropped = self._is_dropped(job)  # also on a rank with nothing to copy (DDP)
        with self._cond:
            st = self._stats
            if dropped:
                st["snapshots_dropped_nonfinite"] += 1
                return
            for b, p in job.emas:
                b.periods += p
                b.applied += 1
                b.last_step = job.step
            for b in job.lawas:
                pos = job.lawa_pos[id(b)]
                b.order.append(pos)
                b.next_pos = (pos + 1) % b.spec.window
                b.applied += 1
                b.last_step = job.step
            st["snapshots_applied"] += 1
            st["update_seconds"] += job.update_s
            st["copy_seconds"] += job.copy_s
            st["last_applied_step"] = job.step
            lag = time.perf_counter() - job.submitted
            st["lag_seconds_last"] = lag
            st["lag_seconds_max"] = max(st["lag_seconds_max"], lag)
