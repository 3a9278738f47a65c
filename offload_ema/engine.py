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

Streams, events and copies come from ``offload_ema.device`` (CUDA, host, or the simulated copy
engine of ``offload_ema.testing``). Staging is a fixed set of buffers allocated once (pinned on a
GPU). When one buffer holds a whole snapshot, up to ``len(buffers)`` snapshots are in flight.
When the byte budget is smaller than a snapshot, two buffers take it in chunks: the worker issues
the copies of later chunks as it frees buffers, and the fence must first wait on the host until
the last chunk's copy has been issued (``fence_wait_seconds``). On a CPU-only model there is no
copy engine: the worker reads parameters of at least ``INPLACE_MIN_BYTES`` in place (forward and
backward never write parameters) and copies the smaller ones into staging in one call, and the
fence waits until it has read them all.

Folding (``fold`` > 1): the worker holds up to ``fold`` staged snapshots (whole ones: their
staging buffers and tickets stay taken) and applies them in one pass per accumulator
(``ops.ema_fold_multi_``), with the bits of one-by-one updates; anything else it takes (a
``run_after`` callable, the stop) first applies what it holds. "auto" holds nothing while idle:
it folds the jobs already waiting, up to every staging buffer. Parameters read in place would
change before a held snapshot is applied, so a folding host engine copies them all.

Ownership: the worker thread alone writes the averages (:class:`AverageBuffers`); the training
thread alone calls ``busy`` / ``wait_capacity`` / ``submit`` / ``fence`` / ``recover``. They
share the tickets (one per snapshot in flight, a ``queue.SimpleQueue``) and the free staging
buffers (a deque): single atomic operations, no lock. The held jobs (``_held``) are the
worker's alone. The worker's counters (``_stats``, ``applied_schedule``, ``_error``) are guarded
by ``_lock``. The averages are read (``values``,
``export_state``) only while the worker is idle (after ``flush``) or from a ``run_after``
callable, which runs on the worker (``read`` does that for any thread). The issuer thread
(asynchronous devices) writes a job's ``prepared`` / ``copy_event`` before setting its
``issued`` event; the fence and the worker read them only after it is set (the fence waits on it;
the worker gets the job from the issuer afterwards).

Interrupts: a ``KeyboardInterrupt`` (or any exception) may land on any line of the training
thread's calls, so the step path holds no Python-level lock (an exception between acquire and
release would leave it held, and the worker waiting forever). Work in flight is counted by
tickets taken, each in one atomic operation, and a job is put in the queue together with
``_last_queued_step`` on one line: ``recover`` can tell whether the interrupted step's job
reached the worker (for an interrupt between the two statements, by asking the worker), and
give back what an unqueued job held.
"""
from __future__ import annotations

import collections
import numbers
import os
import queue
import threading
import time
from typing import Deque, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch

from offload_ema import device as device_mod
from offload_ema import ops
from offload_ema.averages import Decaying, check_int
from offload_ema.layout import ALIGN, Entry, Layout, is_sharded, local_tensor, staged_dtype


def _per_thread_intraop() -> bool:
    """Whether torch.set_num_threads in one thread leaves the others alone: true of the OpenMP
    backend (a per-thread setting), not of torch's native pool (process-wide)."""
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


# Small tensors cost more to copy one by one than their bytes do (a cudaMemcpyAsync is a few
# microseconds on the issuing thread and the copy engine; a kernel call on the host has a similar
# fixed cost). On a GPU, runs of whole tensors of at most PACK_TENSOR_BYTES each are packed into a
# device-side buffer of at most PACK_MAX_BYTES by one multi-tensor kernel and leave in one DMA.
# On a CPU-only model, parameters of at least INPLACE_MIN_BYTES are read in place by the worker
# (no staging copy); smaller ones are copied into staging together, in one call.
PACK_TENSOR_BYTES = 256 << 10
PACK_MAX_BYTES = 64 << 20
INPLACE_MIN_BYTES = 64 << 10
# fold="auto": the default staging is that of fold=AUTO_FOLD (2 x 4 snapshots); a backlog of up to
# every staged snapshot (at most ops.MAX_FOLD) is folded in one pass.
AUTO_FOLD = 4


def _pack_limit() -> int:
    """PACK_MAX_BYTES, or OFFLOAD_EMA_PACK_BYTES (0: no packing; bench/gpu_check.sh compares)."""
    raw = os.environ.get("OFFLOAD_EMA_PACK_BYTES")
    if raw is None:
        return PACK_MAX_BYTES
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"OFFLOAD_EMA_PACK_BYTES must be a byte count >= 0, got {raw!r}")
    return value


def _nothing() -> None:
    pass


# Job.claim["by"]: who issues a whole-snapshot job's copies.
FENCE, ISSUER, RELEASED = "fence", "issuer", "released"
# Waits on another thread's work look up every WAIT_POLL seconds whether that thread is still
# alive: a background thread that died must give an error, never a hang.
WAIT_POLL = 0.05


class CopyPlan:
    """How one chunk in one staging buffer is filled and read, built once at construction.

    ``dsts`` / ``srcs``: copies into staging (``srcs[i]`` is None where it is taken afresh each
    time: a slice, an FSDP2 shard; ``dynamic`` says how). ``pack_dsts`` / ``pack_srcs``: copies
    into views of the device-side pack buffer (one multi-tensor kernel), each run then leaving in
    one copy ``run_srcs[i]`` -> ``run_dsts[i]``. ``staged``: (group, lo, hi, staging view) the
    worker updates the averages from. ``inplace``: (group, lo, hi, part) read in place.
    """

    def __init__(self):
        self.dsts: List[torch.Tensor] = []
        self.srcs: List[Optional[torch.Tensor]] = []
        self.dynamic: List[Tuple[int, object]] = []
        # Per dtype: torch's multi-tensor copy takes its fast path (one kernel) only when every
        # tensor of a call has one dtype.
        self.pack_dsts: Dict[torch.dtype, List[torch.Tensor]] = {}
        self.pack_srcs: Dict[torch.dtype, List[torch.Tensor]] = {}
        self.run_dsts: List[torch.Tensor] = []
        self.run_srcs: List[torch.Tensor] = []
        self.staged: List[Tuple[int, int, int, torch.Tensor]] = []
        self.inplace: List[Tuple[int, int, int, object]] = []
        self.inplace_bytes = 0
        self.pack_bytes = 0


def _live(part) -> torch.Tensor:
    """The part's elements of the storage a snapshot reads, flat (read in place on the host)."""
    return part.entry.source.reshape(-1)[part.start:part.end]


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


class Engine:
    """Staging, copies, the copy fence, the worker thread and the averages' host memory.

    Training thread: ``busy``, ``wait_capacity``, ``submit``, ``fence``. Any thread: ``run_after``
    (a callable run on the worker once everything submitted before it is applied), ``flush``,
    ``close``, ``stats``, ``raise_error``. Reads of the averages: ``applied``, ``values``,
    ``export_state`` / ``import_state``, ``host_bytes`` (worker idle, or from ``run_after``).
    """

    def __init__(self, layout: Layout, specs: Mapping[str, object],
                 staging_bytes: Optional[int] = None, fold: Union[int, str] = 1):
        self.layout = layout
        self._ops = device_mod.ops_for(layout.device)
        self.asynchronous = self._ops.asynchronous
        auto = isinstance(fold, str) and fold == "auto"
        if not auto:
            if isinstance(fold, bool) or not isinstance(fold, numbers.Integral) or \
                    not 1 <= fold <= ops.MAX_FOLD:
                raise ValueError(f"fold must be an int from 1 to {ops.MAX_FOLD} or 'auto', "
                                 f"got {fold!r}")
            fold = int(fold)
        elif not self.asynchronous:
            # On the host the fence holds the training thread until the worker has read each
            # snapshot, so no backlog forms for "auto" to fold: it is one snapshot per pass.
            auto, fold = False, 1
        # A rank that owns no tensor (DDP with fewer tensors than ranks) still runs the schedule;
        # its staging is the minimum, so that every size below stays valid.
        snapshot = max(layout.nbytes, ALIGN)
        if staging_bytes is None:
            # K snapshots folded while the next K arrive (two for one snapshot per pass).
            staging_bytes = 2 * (AUTO_FOLD if auto else fold) * snapshot
        staging_bytes = check_int(staging_bytes, "staging_bytes", 2 * ALIGN)
        if staging_bytes >= snapshot:
            n_buffers, buffer_bytes = staging_bytes // snapshot, snapshot
        else:
            n_buffers, buffer_bytes = 2, staging_bytes // 2
        self._chunks = layout.plan(buffer_bytes)
        whole = len(self._chunks) <= 1
        if auto:
            # As many as the budget holds (chunked snapshots cannot be held). Unlike a fixed K,
            # "auto" holds only jobs already queued, each with its ticket: folding all of them
            # takes no ticket a queued job would not hold anyway.
            fold = min(ops.MAX_FOLD, n_buffers) if whole else 1
        elif fold > 1 and (not whole or n_buffers < fold + 1):
            raise ValueError(
                f"fold={fold} needs staging_bytes for at least fold + 1 = {fold + 1} whole "
                f"snapshots ({(fold + 1) * snapshot} bytes; default {2 * fold} snapshots), got "
                f"{staging_bytes}")
        # Snapshots applied per pass over the accumulators: up to ``fold`` staged ones are held
        # by the worker; "auto" holds none while idle, folding only a backlog (it keeps up).
        self.fold = fold
        self._fold_auto = auto
        # Snapshots in flight at once: one per buffer when a buffer holds a snapshot; one in
        # chunked mode (its chunks take both buffers in turn).
        self.capacity = n_buffers if len(self._chunks) <= 1 else 1
        buf_bytes = layout.buffers_nbytes
        # One host allocation carved into every staging area (pinned exactly on a GPU: no
        # per-buffer rounding up to a power of two).
        areas = self._ops.alloc_host([buffer_bytes] * n_buffers + [buf_bytes] * (
            self.capacity if buf_bytes else 0) + [4 * self.capacity])
        self._staging = areas[:n_buffers]
        # Every chunk's copies and reads, planned once here: a snapshot's per-tensor work is then
        # a few foreach calls (one pack kernel, one batch of copies) on the issuing thread.
        self._pack_limit = _pack_limit() if self._ops.asynchronous else 0
        # A held snapshot must be a copy: parameters read in place change at the next step.
        self._inplace = not self._ops.asynchronous and self.fold == 1
        self._plans = {(s, c): self._build_plan(self._staging[s], self._chunks[c])
                       for s in range(n_buffers) for c in range(len(self._chunks))}
        pack_bytes = max([p.pack_bytes for p in self._plans.values()] + [0])
        # The device-side pack buffer: one for every chunk and snapshot, since its writes (the
        # pack kernel) and reads (the DMA) all run on the side stream, in order.
        self._pack = self._ops.alloc_device(pack_bytes) if pack_bytes else None
        self.device_pack_nbytes = pack_bytes
        for plan in self._plans.values():
            self._bind_pack(plan)
        self.read_in_place_nbytes = sum(self._plans[(0, c)].inplace_bytes
                                        for c in range(len(self._chunks)))
        # Averaged module buffers change in place during the next forward, long before the
        # fence: they are copied at once, on the main stream, into an area of their own (one per
        # in-flight snapshot, like the found_inf flags).
        self._buffer_staging = areas[n_buffers:-1]
        buf_chunks = layout.plan(max(buf_bytes, 1), buffers=True)
        self._buffer_plans = [self._build_plan(t, buf_chunks[0], buffers=True)
                              for t in self._buffer_staging]
        self._flags = areas[-1].view(torch.float32)
        self._flags.zero_()
        self.staging_nbytes = sum(t.numel() for t in self._staging + self._buffer_staging)
        self.pinned_nbytes = self._ops.pinned_nbytes
        self.n_staging = n_buffers
        self.chunks_per_snapshot = len(self._chunks)

        self.averages: Dict[str, AverageBuffers] = {
            n: AverageBuffers(spec, layout) for n, spec in specs.items()}  # worker-owned
        self._lock = threading.Lock()
        self._free: Deque[int] = collections.deque(range(n_buffers))        # atomic ops only
        self._tickets: "queue.SimpleQueue[int]" = queue.SimpleQueue()       # atomic ops only
        for t in range(self.capacity):
            self._tickets.put(t)
        self._ticket_back = threading.Event()  # set by the worker when it returns a ticket
        self._error: Optional[BaseException] = None  # set once by the worker (under _lock)
        self._fence_wait = 0.0                                              # training thread
        self._error_reported = False                                        # training thread
        self._stats: Dict[str, float] = collections.defaultdict(float)     # under _lock
        self.applied_schedule = None  # schedule state of the last job done      (under _lock)
        self._unfenced: Optional[Job] = None                                # training thread
        self._last_main_event = None  # the last event the engine recorded on the main stream
        self._fence_thread: Optional[int] = None  # the thread that fences (training's)
        self._dirty = False  # a recover() that has not finished: finished before the next job
        self._submitting: Optional[Job] = None                              # training thread
        self._last_queued_step = 0                                          # training thread
        self._queue: "queue.SimpleQueue" = queue.SimpleQueue()  # Job, callable, None (stop)
        self._held: List[Job] = []  # staged jobs waiting to be folded             (worker)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="offload_ema-worker", daemon=True)
        self._thread.start()
        # Asynchronous devices: the issuer thread takes every job and call first, issues a
        # whole-snapshot job's copies on the side stream (off the training thread: one copy per
        # tensor or pack run costs microseconds each) and passes everything on to the worker in
        # the order received. Its own queue is the engine's inbox, so a run_after callable
        # still runs after every job submitted before it.
        self._issuer: Optional[threading.Thread] = None
        self._inbox = self._queue
        # Whole snapshots (one chunk) on an asynchronous device: their copies are the issuer's
        # (or the fence's, first come); chunked ones the worker's, as buffers free up.
        self._issuer_copies = self.asynchronous and len(self._chunks) == 1
        if self.asynchronous:
            self._inbox = queue.SimpleQueue()
            self._issuer = threading.Thread(target=self._run_issuer, name="offload_ema-issuer",
                                            daemon=True)
            self._issuer.start()

    # ---- copy plans ----------------------------------------------------------------------
    def _build_plan(self, buf: torch.Tensor, chunk, buffers: bool = False) -> CopyPlan:
        """The copies and reads of one chunk in one staging buffer (see :class:`CopyPlan`).
        Module buffers are copied on the main stream: never packed (the pack buffer belongs to
        the side stream) nor read in place (the next forward changes them)."""
        plan = CopyPlan()
        for piece in chunk.pieces:
            g = self.layout.groups[piece.group]
            n = piece.end - piece.start
            size = torch.empty((), dtype=g.dtype).element_size()
            flat = buf[piece.byte_offset:piece.byte_offset + n * size].view(g.dtype)
            kinds = [self._kind(part, size, buffers) for part in piece.parts]
            run: List[object] = []  # consecutive parts of kind "pack"
            for i, (part, kind) in enumerate(zip(piece.parts, kinds)):
                if kind == "pack":
                    run.append(part)
                    if i + 1 < len(kinds) and kinds[i + 1] == "pack":
                        continue
                    self._plan_run(plan, run, flat, size)
                    run = []
                elif kind == "inplace":
                    lo = piece.start + part.dst
                    plan.inplace.append((piece.group, lo, lo + part.end - part.start, part))
                    plan.inplace_bytes += (part.end - part.start) * size
                else:
                    self._plan_direct(plan, part, flat)
            # What the worker reads from staging: the piece less the parts read in place.
            lo = None
            for part, kind in zip(piece.parts + [None], kinds + ["inplace"]):
                if kind != "inplace" and lo is None:
                    lo = part.dst
                elif kind == "inplace" and lo is not None:
                    hi = part.dst if part is not None else n
                    plan.staged.append((piece.group, piece.start + lo, piece.start + hi,
                                        flat[lo:hi]))
                    lo = None
        return plan

    def _kind(self, part, size: int, buffers: bool) -> str:
        t, nbytes = part.entry.tensor, (part.end - part.start) * size
        if buffers:
            return "direct"
        same = staged_dtype(part.entry.dtype) == part.entry.dtype  # no conversion on the way
        if self._inplace:  # the kernels read float32 / bfloat16 / float16 sources as they are
            src = part.entry.source  # (None: a shard, resolved per copy)
            return "inplace" if (same and nbytes >= INPLACE_MIN_BYTES and src is not None and
                                 src.is_contiguous()) else "direct"
        plain = part.whole and not is_sharded(t) and t.is_contiguous()
        return "pack" if (plain and same and self._pack_limit
                          and nbytes <= PACK_TENSOR_BYTES) else "direct"

    def _plan_direct(self, plan: CopyPlan, part, flat: torch.Tensor) -> None:
        t = part.entry.tensor
        dst = flat[part.dst:part.dst + part.end - part.start]
        plan.dsts.append(dst.view(part.entry.shape) if part.whole else dst)
        src = part.entry.source  # the bound storage: in-place updates show through
        if src is not None and part.whole:
            plan.srcs.append(src)
        elif src is not None and src.is_contiguous():
            plan.srcs.append(src.reshape(-1)[part.start:part.end])  # a view, made once
        else:  # a slice of a non-contiguous tensor (a copy: made per snapshot, on the copy's
            # stream), an FSDP2 shard, a ZeRO-3 partition: taken afresh each time
            plan.dynamic.append((len(plan.srcs), part))
            plan.srcs.append(None)

    def _plan_run(self, plan: CopyPlan, run: List[object], flat: torch.Tensor, size: int) -> None:
        """Packs a run of small whole tensors (adjacent in staging) if it pays and fits."""
        lo, hi = run[0].dst, run[-1].dst + run[-1].entry.numel
        nbytes = -(-(hi - lo) * size // 64) * 64
        if len(run) < 2 or plan.pack_bytes + nbytes > self._pack_limit:
            for part in run:
                self._plan_direct(plan, part, flat)
            return
        # Offsets into the pack buffer now; the views are bound once it is allocated.
        for part in run:
            plan.pack_srcs.setdefault(flat.dtype, []).append(part.entry.source)
            plan.pack_dsts.setdefault(flat.dtype, []).append(
                (plan.pack_bytes + (part.dst - lo) * size, part.entry))
        plan.run_dsts.append(flat[lo:hi])
        plan.run_srcs.append((plan.pack_bytes, hi - lo, flat.dtype))
        plan.pack_bytes += nbytes

    def _bind_pack(self, plan: CopyPlan) -> None:
        def view(offset: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
            size = torch.empty((), dtype=dtype).element_size()
            return self._pack[offset:offset + numel * size].view(dtype)
        plan.pack_dsts = {dt: [view(off, e.numel, e.dtype).view(e.shape) for off, e in views]
                          for dt, views in plan.pack_dsts.items()}
        plan.run_srcs = [view(*r) for r in plan.run_srcs]

    def _copy(self, plan: CopyPlan, stream=None, job: Optional[Job] = None) -> None:
        """Issues the plan's copies into staging on ``stream`` (deferred when the device is
        asynchronous; then ``job`` keeps the sources alive until the copy is done). Changes no
        thread state (grad mode, current stream) here: the fence runs this on the training
        thread, where an interrupt may land between any two bytecodes."""
        srcs, ranges = plan.srcs, None
        if plan.dynamic:
            srcs = list(srcs)
            ranges = [(-1, -1)] * len(srcs)
            for i, part in plan.dynamic:
                e = part.entry
                t = e.source if e.source is not None else local_tensor(e.tensor).detach()
                if part.whole:
                    srcs[i] = t
                elif t.is_contiguous():
                    srcs[i] = t.view(-1)[part.start:part.end]
                else:  # a kernel: the device runs it on the copy's stream, before the copy
                    srcs[i], ranges[i] = t, (part.start, part.end)
                if job is not None and self.asynchronous:
                    # The very tensor the deferred copy reads: a storage swapped meanwhile
                    # must not be freed while the copy reads it.
                    job.sources.append(t)
        try:
            for dt, dsts in plan.pack_dsts.items():  # device to device: one kernel per dtype
                self._ops.copy(stream, dsts, plan.pack_srcs[dt])
            if plan.dsts or plan.run_dsts:
                self._ops.copy(stream, plan.dsts + plan.run_dsts, srcs + plan.run_srcs,
                               None if ranges is None else
                               ranges + [(-1, -1)] * len(plan.run_srcs))
        except RuntimeError as exc:
            self.layout.check_shapes(during_copy=True)  # says which tensor, if one changed
            raise RuntimeError(
                f"copying the parameters into staging failed ({exc}): did a parameter change "
                "shape or storage while its snapshot was being copied? Call avg.fence() before "
                "changing parameters in place") from exc

    # ---- training thread --------------------------------------------------------------------
    def busy(self) -> bool:
        if self._dirty:  # an interrupted recover(): finished now (no job is submitted since)
            self.read(_nothing)
            self._refill()
            self._dirty = False
        return self._tickets.empty()

    def wait_capacity(self) -> None:
        # Re-checks the real condition each time: a wake-up lost between wait() and clear()
        # costs at most the timeout.
        while self._tickets.empty() and self._error is None:
            self._ticket_back.wait(WAIT_POLL)
            self._ticket_back.clear()
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
        self._inbox.put(job); self._last_queued_step = step  # noqa: E702 (one line: see doc)
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
        self.read(_nothing)
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
        self._refill()
        self._dirty = False
        return queued

    def _refill(self) -> None:
        """Every ticket and staging buffer free again; only while no job is in flight (the
        worker idle, nothing submitted since)."""
        while True:
            try:
                self._tickets.get_nowait()
            except queue.Empty:
                break
        for t in range(self.capacity):
            self._tickets.put(t)
        self._free.clear()
        self._free.extend(range(self.n_staging))
        self._ticket_back.set()

    def _drain(self) -> None:
        """Waits until no copy the engine issued can still run: the side stream's and the
        training thread's on the main stream (module buffers, found_inf flags)."""
        self._ops.drain()
        event = self._last_main_event
        if event is not None:
            self._ops.host_wait(event)

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
            job.flag_event = self._last_main_event = dev.record(main)
        if self._buffer_plans:
            # Ordered after the optimizer step and before the next forward, which updates the
            # module buffers in place.
            self._copy(self._buffer_plans[job.ticket], main)
            if self.asynchronous:
                job.buffers_event = self._last_main_event = dev.record(main)
        if not self._chunks:  # this rank averages no parameters (DDP): nothing to copy
            job.issued.set()
            return
        if self.asynchronous:
            # After the optimizer step's kernels. The issuer thread (one chunk) or the worker
            # (chunks, as buffers free up) makes the side stream wait on it and issues the copies;
            # the host copies or reads on the worker. The fence waits until they are issued.
            job.ready_event = dev.record(main)

    def _copy_on_side(self, plan: CopyPlan, job: Job):
        dev = self._ops
        start = dev.record(dev.side, timing=True)
        self._copy(plan, dev.side, job)
        return start, dev.record(dev.side, timing=True)

    def fence(self) -> None:
        """Makes the parameters safe to change: the last snapshot's copy is complete (host) or
        ordered before anything later on the main stream (asynchronous devices)."""
        job = self._unfenced
        if job is None:
            return
        t0 = time.perf_counter()
        self._fence_thread = threading.get_ident()
        if self._issuer_copies and job.ready_event is not None and self._ops.claim_policy != ISSUER:
            try:  # the claim inside the try: an interrupt right after it is handled below
                # (FENCE already: this thread's own earlier fence, abandoned by an interrupt
                # that also skipped the hand-back below: issued from the start.)
                if job.claim.setdefault("by", FENCE) == FENCE and not job.issued.is_set():
                    self._issue_copies(job)  # not yet taken by the issuer: no hand-off
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
        self.read(_nothing)

    def _wait_for(self, event: threading.Event) -> None:
        """``event.wait()``, raising instead of waiting forever if a thread that would set it
        has stopped."""
        while not event.wait(WAIT_POLL):
            self._check_threads()

    def _check_threads(self) -> None:
        for thread in (self._thread, self._issuer):
            if thread is not None and not thread.is_alive():
                if self._closed:
                    raise RuntimeError("this Averager's engine is closed")
                raise RuntimeError(f"the Averager's {thread.name} thread stopped unexpectedly "
                                   "(see the error it ended with); build a new Averager"
                                   ) from self._error

    def stats(self) -> Tuple[Dict[str, float], int]:
        """(a copy of the counters, snapshots in flight), read together under the lock."""
        with self._lock: s = dict(self._stats)  # noqa: E701 (one line: the lock is never left held)
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
            # Folding: the most snapshots per pass ("auto": what the staging holds), passes
            # made and the snapshots they applied (their mean size says how far "auto" folded).
            "fold": self.fold, "folds": int(s.get("folds", 0)),
            "snapshots_folded": int(s.get("snapshots_folded", 0)),
            **{k: s.get(k, 0.0) for k in ("copy_seconds", "update_seconds", "fence_wait_seconds",
                                          "lag_seconds_last", "lag_seconds_max")},
            "snapshot_bytes": self.layout.nbytes, "staging_bytes": self.staging_nbytes,
            "pinned_bytes": self.pinned_nbytes, "staging_buffers": self.n_staging,
            "chunks_per_snapshot": self.chunks_per_snapshot, "host_bytes": self.host_bytes(),
            "device_pack_bytes": self.device_pack_nbytes,
            "read_in_place_bytes": self.read_in_place_nbytes,
            "averaged_tensors": len(self.layout.entries), "device": str(self.layout.device),
        }

    def set_last_applied_step(self, step: int) -> None:
        with self._lock:
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
        self._release_abandoned_claim()
        self._closed = True
        self._inbox.put(None)  # the issuer passes it on to the worker
        if threading.current_thread() in (self._thread, self._issuer):
            return  # a garbage collection on our own thread: it stops once this returns
        forwarded = False
        while self._thread.is_alive():
            self._thread.join(WAIT_POLL)
            if not forwarded and self._issuer is not None and not self._issuer.is_alive():
                self._queue.put(None)  # the issuer died: nobody passes the stop on
                forwarded = True
        if self._issuer is not None:
            self._issuer.join()
        try:
            self._drain()  # no copy may still write into the host memory freed below
        finally:
            self._plans.clear()
            self._buffer_plans.clear()
            self._staging, self._buffer_staging, self._flags, self._pack = [], [], None, None
            self._ops.free_host()
            for e in self.layout.all_entries:  # storage the model may have given up: freed
                e.source = None

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
        with self._lock:
            return self.staging_nbytes + sum(b.nbytes() for b in self.averages.values())

    # ---- issuer thread (asynchronous devices) ------------------------------------------------
    def _run_issuer(self) -> None:
        try:
            self._ops.thread_init()  # this device, the side stream, thread-local capture mode
        except BaseException as exc:  # reported by the worker; jobs are still passed on
            self._record_error(exc)
        while True:
            item = self._inbox.get()
            try:
                if isinstance(item, Job) and item.ready_event is not None and \
                        self._issuer_copies:
                    self._claim_and_issue(item)
            except BaseException as exc:  # never ends this thread: the worker reports it
                if isinstance(item, Job):
                    item.issue_error = exc
                    item.issued.set()
                else:
                    self._record_error(exc)
            self._queue.put(item)  # in the order received (run_after callables included)
            if item is None:
                return
            item = None  # a job or callable may hold an Averager: not kept while idle

    def _claim_and_issue(self, job: Job) -> None:
        """Issues a whole-snapshot job's copies unless the training thread's fence does; if the
        fence hands its claim back (interrupted), issues them from the start."""
        if self._ops.claim_policy == FENCE:
            # Deterministic tests: the fence issues whenever it comes before the next item
            # (bounded: a training thread that never fences must not stall the engine).
            deadline = time.monotonic() + 1.0
            while "by" not in job.claim and self._inbox.empty() and not job.issued.is_set() \
                    and time.monotonic() < deadline:
                time.sleep(0.0005)
        while not job.issued.is_set():
            by = job.claim.setdefault("by", ISSUER)
            if by == RELEASED:
                job.claim["by"] = by = ISSUER  # only this thread takes a released claim
            if by == ISSUER:
                try:
                    self._issue_copies(job)
                except BaseException as exc:  # reaches the user through the worker
                    job.issue_error = exc
                job.issued.set()
                return
            job.issued.wait(0.001)  # the fence is issuing it (or gives it back)

    def _issue_copies(self, job: Job) -> None:
        """One whole-snapshot job: the side stream waits for the optimizer step, then copies
        the parameters into the job's staging buffer. The caller sets ``job.issued``."""
        dev = self._ops
        if self._error is None:  # after a worker error nothing more is applied
            buf = job.held[0]
            dev.stream_wait(dev.side, job.ready_event)  # reads what the step wrote
            start, done = self._copy_on_side(self._plans[(buf, 0)], job)
            job.prepared = [(0, buf, start, done)]
            job.copy_event = done

    def _record_error(self, exc: BaseException) -> None:
        with self._lock:
            if self._error is None:
                self._error = exc

    # ---- worker thread ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._ops.thread_init()
            if _per_thread_intraop():
                # The worker's own torch ops (staging copies) are small; run them on this
                # thread instead of waking an OpenMP team that competes with training for the
                # cores. The kernels use offload_ema's own threads.
                torch.set_num_threads(1)
        except BaseException as exc:  # nothing is applied; reads, flush and close are served
            self._fail(exc)
        while True:
            item = self._queue.get()
            try:
                if isinstance(item, Job):
                    self._take(item)
                    continue
                # A callable (a read, flush's marker) or the stop: the snapshots held for
                # folding are applied first, so that it sees every snapshot submitted before it.
                self._settle()
                if item is None:
                    return
                item()
            except BaseException as exc:  # never ends this thread: reads and close wait on it
                self._fail(exc)
            finally:
                # A job or run_after callable may hold its Averager: not kept while idle, or a
                # dropped Averager could never be collected (and this thread never end).
                item = None

    def _take(self, job: Job) -> None:
        """Applies a job, or (folding) holds it staged until ``fold`` are, or no more wait."""
        job.taken = True
        held = False
        try:
            if self._error is None:
                held = self._process(job)
            else:
                # Nothing more is applied, but copies issued for this job (the issuer may have
                # checked for an error just before it was set) must land before its staging
                # and sources are given back.
                self._ops.drain()
        except BaseException as exc:  # reaches the user at the next step / flush / close
            held = False
            self._fail(exc)
        finally:
            if not held:
                self._release(job)
        if held:
            self._held.append(job)
        # After an error nothing more is applied: what is held is given back now.
        if self._held and (len(self._held) >= self.fold or self._error is not None or
                           (self._fold_auto and self._queue.empty())):
            self._settle()

    def _settle(self) -> None:
        """Applies the snapshots held for folding (in one pass) and releases them."""
        jobs, self._held = self._held, []
        if not jobs:
            return
        try:
            if self._error is None:
                self._fold(jobs)
        except BaseException as exc:
            self._fail(exc)
        finally:
            for job in jobs:
                self._release(job)

    def _fail(self, exc: BaseException) -> None:
        self._record_error(exc)
        # Copies of the job may still be running: its staging and sources are released next,
        # so wait for them first. A drain that fails as well (a sticky CUDA error: nothing runs
        # any more) must not end the worker: reads, flush and close wait on it.
        try:
            self._ops.drain()
        except BaseException:
            pass

    def _release(self, job: Job) -> None:
        """Gives back what a finished (applied, dropped or failed) job held."""
        with self._lock:
            self._free.extend(job.held)
            job.held = []
            self._tickets.put(job.ticket)
            self._ticket_back.set()
            job.sources = []
            job.issued.set()  # nobody may wait on a copy that will never be issued
            # (Parameters read in place are not copied.)
            self._stats["bytes_copied"] += self.layout.nbytes - self.read_in_place_nbytes
            if job.schedule is not None:
                self.applied_schedule = job.schedule

    def _process(self, job: Job) -> bool:
        """Applies ``job``; folding, only stages it and returns True (``_fold`` applies it)."""
        if job.issue_error is not None:
            raise job.issue_error
        if self.fold > 1:
            self._stage(job)
            return True
        job.weights = [b.spec.weight(b.periods, p) for b, p in job.emas]
        # A parameter replaced, frozen or added since the Averager was built: stop with a clear
        # error instead of averaging a tensor training no longer changes.
        self.layout.check_model()
        for b in job.lawas:  # the ring entry this snapshot fills: the oldest once full
            job.lawa_pos[id(b)] = b.next_pos
        if self._buffer_plans:
            if job.buffers_event is not None:
                self._ops.host_wait(job.buffers_event)  # the buffers' bytes are in staging
            self._update(job, self._buffer_plans[job.ticket].staged)
        if job.prepared is not None:  # issued by the issuer thread
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
                plan = self._plans[(buf, chunk)]
                if self.asynchronous:
                    if chunk == 0:  # after the optimizer step
                        self._ops.stream_wait(self._ops.side, job.ready_event)
                    start, done = self._copy_on_side(plan, job)
                    issued.append((chunk, buf, start, done))
                    if chunk == last:
                        job.copy_event = done
                else:
                    self._copy_on_host(job, plan)  # the small parameters, into staging together
                    # The large ones are read where they are: the fence holds the next
                    # optimizer step until this is done.
                    self._update(job, [(g, lo, hi, _live(part)) for g, lo, hi, part in plan.inplace])
                    issued.append((chunk, buf, None, None))
                if chunk == last:
                    job.issued.set()
            while issued:
                self._apply(job, *issued.popleft())
        self._complete(job)
        return False

    # ---- folding: several staged snapshots per pass over the accumulators --------------------
    def _stage(self, job: Job) -> None:
        """Waits until the job's whole snapshot is in its staging buffer (on the host: copies
        it there); ``_fold`` applies it later."""
        if job.prepared is not None:  # issued by the issuer thread (or the fence)
            for _, _, start, done in job.prepared:
                self._landed(job, start, done)
        elif self._chunks:  # the host: copied here while the fence holds the training thread
            # Every job in flight holds a ticket and at most one buffer, and there are as
            # many tickets as buffers: one is free.
            buf = self._free.popleft()
            job.held.append(buf)
            self._copy_on_host(job, self._plans[(buf, 0)])
        if job.buffers_event is not None:
            self._ops.host_wait(job.buffers_event)
        job.issued.set()  # the host's fence may go on: the parameters are read
        job.sources = []  # every copy has landed: its sources may be freed

    def _segments(self, job: Job) -> List[Tuple[int, int, int, torch.Tensor]]:
        """A staged job's (group, lo, hi, staging view); the same ranges, in the same order,
        for every job (the plans of all buffers and tickets are built alike)."""
        segments = list(self._buffer_plans[job.ticket].staged) if self._buffer_plans else []
        if job.held:
            segments += self._plans[(job.held[0], 0)].staged
        return segments

    def _fold(self, jobs: List[Job]) -> None:
        """Applies staged snapshots in order, with the results of applying them one by one:
        per accumulator its updates in one pass over memory (``ops.ema_fold_multi_`` applies
        them in order per element: the same roundings), LAWA entries copied per snapshot."""
        # A parameter replaced, frozen or added since the Averager was built: stop with a clear
        # error instead of averaging a tensor training no longer changes.
        self.layout.check_model()
        t0 = time.perf_counter()
        live = [j for j in jobs if not self._is_dropped(j)]
        segments = [self._segments(j) for j in live]
        # Per accumulator: the snapshot that initialises it (its first applied one, copied),
        # then the snapshots folded in with their weights, each from the periods applied
        # before it. Accumulators fed by the same snapshots share one pass.
        per_acc: Dict[int, list] = {}
        for k, job in enumerate(live):
            for b, p in job.emas:
                a = per_acc.setdefault(id(b), [b, None, [], [], b.periods])
                if b.applied == 0 and a[1] is None:
                    a[1] = k
                else:
                    a[2].append(k)
                    a[3].append(b.spec.weight(a[4], p))
                a[4] += p
        groups: Dict[Tuple[Optional[int], Tuple[int, ...]], list] = {}
        for b, init, ks, weights, _ in per_acc.values():
            groups.setdefault((init, tuple(ks)), []).append((b, weights))
        for (init, ks), members in groups.items():
            for i, (g, lo, hi, _) in enumerate(segments[0] if segments else []):
                accs = [b.acc[g][lo:hi] for b, _ in members]
                if init is not None:
                    for acc in accs:
                        acc.copy_(segments[init][i][3])
                if ks:
                    ops.ema_fold_multi_(accs, [segments[k][i][3] for k in ks],
                                        [w for _, w in members])
        elapsed = time.perf_counter() - t0
        live_segments = iter(segments)
        for job in jobs:  # snapshot by snapshot: LAWA entries, then the counters
            if not job.dropped:
                t1 = time.perf_counter()
                segs = next(live_segments)
                for b in job.lawas:  # the entry this snapshot fills: the oldest once full
                    job.lawa_pos[id(b)] = b.next_pos  # (_complete moves next_pos on)
                    entry = b.ring_entry(b.next_pos)
                    for g, lo, hi, src in segs:
                        entry[g][lo:hi].copy_(src)
                elapsed += time.perf_counter() - t1
            self._complete(job)
        with self._lock:
            self._stats["update_seconds"] += elapsed
            self._stats["folds"] += 1
            self._stats["snapshots_folded"] += len(live)

    def _landed(self, job: Job, start, done) -> None:
        """Waits until a copy into staging has landed (its bytes are valid only then)."""
        self._ops.host_wait(done)
        job.copy_s += self._ops.elapsed_seconds(start, done)

    def _copy_on_host(self, job: Job, plan: CopyPlan) -> None:
        t0 = time.perf_counter()
        self._copy(plan)
        job.copy_s += time.perf_counter() - t0

    def _apply(self, job: Job, chunk: int, buf: int, start=None, done=None) -> None:
        """Updates every average the job feeds from one chunk in a buffer, then frees it."""
        if done is not None:
            self._landed(job, start, done)
        self._update(job, self._plans[(buf, chunk)].staged)
        with self._lock:
            job.held.remove(buf)
            self._free.append(buf)

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

    def _update(self, job: Job, segments) -> None:
        """Updates every average the job feeds from ``segments``: (group, lo, hi, source),
        elements [lo, hi) of a group, read from staging or in place."""
        if self._is_dropped(job):
            return
        t0 = time.perf_counter()
        for g, lo, hi, src in segments:
            accs, weights = [], []
            for (b, _), w in zip(job.emas, job.weights):
                acc = b.acc[g][lo:hi]
                if b.applied == 0:
                    acc.copy_(src)  # the first applied snapshot initialises the EMA exactly
                else:
                    accs.append(acc)
                    weights.append(w)
            if accs:
                ops.ema_update_multi_(accs, src, weights)
            for b in job.lawas:
                b.ring_entry(job.lawa_pos[id(b)])[g][lo:hi].copy_(src)
        job.update_s += time.perf_counter() - t0

    def _complete(self, job: Job) -> None:
        dropped = self._is_dropped(job)  # also on a rank with nothing to copy (DDP)
        with self._lock:
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
