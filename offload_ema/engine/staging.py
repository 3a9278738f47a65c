"""Staging: the host memory snapshots are copied into, and the copies that fill it.

Planned once, at construction: the staging areas (one host allocation, pinned exactly on a GPU),
each chunk's copies into each staging buffer (:class:`CopyPlan`), the device-side pack buffer
for runs of small tensors, the module buffers' areas and the found_inf flags. A snapshot's
per-tensor work is then a few calls: one pack kernel and one batch of copies.

Whoever issues a snapshot's copies calls :meth:`Staging.copy`: the issuer thread, the training
thread's fence (first come, by ``Job.claim``), the worker (chunked snapshots, host copies). It
changes no thread state (grad mode, current stream): the fence may be interrupted at any
bytecode. The plans are read-only after construction.

:class:`Pools` is the hand-off of free staging between the training thread (takes) and the
worker (gives back): tickets (one per snapshot in flight) and staging buffers, each taken or
given in one atomic operation.
"""
from __future__ import annotations

import collections
import numbers
import os
import queue
import threading
from dataclasses import dataclass
from typing import Deque, Dict, List, Optional, Tuple, Union

import torch

from offload_ema import ops
from offload_ema.averages import check_int
from offload_ema.layout import ALIGN, Layout, is_sharded, local_tensor, staged_dtype

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


@dataclass
class Sizing:
    """How staging is cut: ``n_buffers`` of ``buffer_bytes``, each snapshot in ``chunks``
    (one when a buffer holds it whole), ``fold`` snapshots per pass, ``capacity`` snapshots in
    flight."""
    n_buffers: int
    buffer_bytes: int
    chunks: list
    fold: int
    fold_auto: bool
    capacity: int


def size_staging(layout: Layout, asynchronous: bool, staging_bytes: Optional[int],
                 fold: Union[int, str]) -> Sizing:
    """Checks ``staging_bytes`` and ``fold`` and cuts the staging they describe."""
    auto = isinstance(fold, str) and fold == "auto"
    if not auto:
        if isinstance(fold, bool) or not isinstance(fold, numbers.Integral) or \
                not 1 <= fold <= ops.MAX_FOLD:
            raise ValueError(f"fold must be an int from 1 to {ops.MAX_FOLD} or 'auto', "
                             f"got {fold!r}")
        fold = int(fold)
    elif not asynchronous:
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
    chunks = layout.plan(buffer_bytes)
    whole = len(chunks) <= 1
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
    # Snapshots in flight at once: one per buffer when a buffer holds a snapshot; one in
    # chunked mode (its chunks take both buffers in turn).
    capacity = n_buffers if whole else 1
    return Sizing(n_buffers, buffer_bytes, chunks, fold, auto, capacity)


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
        self.entries: List[object] = []  # the entry dsts[i] is a part of
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
        # Host: the static copies of dsts / srcs in one native call (ops.host_copy_plan), with
        # its lists, to plan it again if a storage is reallocated in place.
        self.native = None
        self.native_dsts: List[torch.Tensor] = []
        self.native_srcs: List[torch.Tensor] = []
        self.native_entries: List[object] = []


def live(part) -> torch.Tensor:
    """The part's elements of the storage a snapshot reads, flat (read in place on the host)."""
    return part.entry.source.reshape(-1)[part.start:part.end]


class Pools:
    """Free staging, handed between the training thread (takes) and the worker (gives back):
    tickets, one per snapshot in flight (a job's flag and module-buffer areas), and staging
    buffers. Each take or give is one atomic operation (no lock an interrupt could leave held);
    ``refill`` restores both whole while nothing is in flight."""

    def __init__(self, capacity: int, n_buffers: int):
        self.capacity, self.n_buffers = capacity, n_buffers
        self.free: Deque[int] = collections.deque(range(n_buffers))
        self.tickets: "queue.SimpleQueue[int]" = queue.SimpleQueue()
        for t in range(capacity):
            self.tickets.put(t)
        self.ticket_back = threading.Event()  # set when a ticket is given back (a waiter wakes)

    def refill(self) -> None:
        while True:
            try:
                self.tickets.get_nowait()
            except queue.Empty:
                break
        for t in range(self.capacity):
            self.tickets.put(t)
        self.free.clear()
        self.free.extend(range(self.n_buffers))
        self.ticket_back.set()

    def give_back(self, job) -> None:
        """What a finished or forgotten job held."""
        self.free.extend(job.held)
        job.held = []
        if job.ticket is not None:
            self.tickets.put(job.ticket)
            job.ticket = None
        self.ticket_back.set()


class Staging:
    """The staging areas and every copy plan (see the module doc)."""

    def __init__(self, layout: Layout, dev, sizing: Sizing):
        self.layout, self._ops = layout, dev
        self.asynchronous = dev.asynchronous
        self.chunks = sizing.chunks
        n_buffers, capacity = sizing.n_buffers, sizing.capacity
        buf_bytes = layout.buffers_nbytes
        # One host allocation carved into every staging area (pinned exactly on a GPU: no
        # per-buffer rounding up to a power of two).
        areas = dev.alloc_host([sizing.buffer_bytes] * n_buffers + [buf_bytes] * (
            capacity if buf_bytes else 0) + [4 * capacity])
        self.buffers = areas[:n_buffers]
        # Every chunk's copies and reads, planned once here: a snapshot's per-tensor work is then
        # a few foreach calls (one pack kernel, one batch of copies) on the issuing thread.
        self._pack_limit = _pack_limit() if dev.asynchronous else 0
        # A held snapshot must be a copy: parameters read in place change at the next step.
        self._inplace = not dev.asynchronous and sizing.fold == 1
        self.plans = {(s, c): self._build_plan(self.buffers[s], self.chunks[c])
                      for s in range(n_buffers) for c in range(len(self.chunks))}
        if not self.asynchronous:  # (on a copy engine the copies are issued, not run, here)
            for plan in self.plans.values():
                self._plan_native(plan)
        pack_bytes = max([p.pack_bytes for p in self.plans.values()] + [0])
        # The device-side pack buffer: one for every chunk and snapshot, since its writes (the
        # pack kernel) and reads (the DMA) all run on the side stream, in order.
        self._pack = dev.alloc_device(pack_bytes) if pack_bytes else None
        self.device_pack_nbytes = pack_bytes
        for plan in self.plans.values():
            self._bind_pack(plan)
        self.read_in_place_nbytes = sum(self.plans[(0, c)].inplace_bytes
                                        for c in range(len(self.chunks)))
        # Averaged module buffers change in place during the next forward, long before the
        # fence: they are copied at once, on the main stream, into an area of their own (one per
        # in-flight snapshot, like the found_inf flags).
        self.buffer_areas = areas[n_buffers:-1]
        buf_chunks = layout.plan(max(buf_bytes, 1), buffers=True)
        self.buffer_plans = [self._build_plan(t, buf_chunks[0], buffers=True)
                             for t in self.buffer_areas]
        self.flags = areas[-1].view(torch.float32)
        self.flags.zero_()
        self.nbytes = sum(t.numel() for t in self.buffers + self.buffer_areas)

    def free(self) -> None:
        """After every copy into it has completed (the engine drained the streams)."""
        self.plans.clear()
        self.buffer_plans.clear()
        self.buffers, self.buffer_areas, self.flags, self._pack = [], [], None, None
        self._ops.free_host()

    def copy_on_side(self, plan: CopyPlan, job):
        """``plan``'s copies on the side stream, between two timing events."""
        dev = self._ops
        start = dev.record(dev.side, timing=True)
        self.copy(plan, dev.side, job)
        return start, dev.record(dev.side, timing=True)

    def issue_whole(self, job) -> None:
        """One whole-snapshot job: the side stream waits for the optimizer step, then copies
        the parameters into the job's staging buffer. The caller sets ``job.issued``."""
        dev = self._ops
        buf = job.held[0]
        dev.stream_wait(dev.side, job.ready_event)  # reads what the step wrote
        start, done = self.copy_on_side(self.plans[(buf, 0)], job)
        job.prepared = [(0, buf, start, done)]
        job.copy_event = done

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
        dst = flat[part.dst:part.dst + part.end - part.start]
        plan.dsts.append(dst.view(part.entry.shape) if part.whole else dst)
        plan.entries.append(part.entry)
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

    def _plan_native(self, plan: CopyPlan) -> None:
        """Host: moves the plan's static copies (a source bound once, contiguous, no conversion)
        into one native multi-tensor copy. ``torch._foreach_copy_`` on CPU costs about a
        microsecond per tensor: 9 ms a snapshot for 10,000 small parameters."""
        keep = [i for i, (d, s) in enumerate(zip(plan.dsts, plan.srcs))
                if s is None or s.dtype != d.dtype or not (s.is_contiguous() and d.is_contiguous())]
        if len(keep) == len(plan.dsts):
            return
        moved = sorted(set(range(len(plan.dsts))) - set(keep))
        plan.native_dsts = [plan.dsts[i] for i in moved]
        plan.native_srcs = [plan.srcs[i] for i in moved]
        plan.native_entries = [plan.entries[i] for i in moved]
        plan.native = self._host_copy(plan)
        if plan.native is None:  # the pure-torch fallback: every copy stays in the foreach call
            plan.native_dsts, plan.native_srcs, plan.native_entries = [], [], []
            return
        new_index = {old: new for new, old in enumerate(keep)}
        plan.dynamic = [(new_index[i], part) for i, part in plan.dynamic]
        plan.dsts = [plan.dsts[i] for i in keep]
        plan.srcs = [plan.srcs[i] for i in keep]
        plan.entries = [plan.entries[i] for i in keep]

    def _host_copy(self, plan: CopyPlan):
        try:
            return ops.host_copy_plan(plan.native_dsts, plan.native_srcs)
        except ValueError as exc:  # a source's storage freed or shrunk in place: name it
            bad = next((e.name for s, e in zip(plan.native_srcs, plan.native_entries)
                        if s.numel() and s.untyped_storage().nbytes() <
                        (s.storage_offset() + s.numel()) * s.element_size()), "?")
            raise RuntimeError(f"parameter {bad!r} no longer has the memory it had when the "
                               "Averager was built (its storage was freed or shrunk in place): "
                               f"it cannot be copied into staging ({exc})") from exc

    def copy(self, plan: CopyPlan, stream=None, job=None) -> None:
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
        if plan.native is not None and plan.native.run() >= 0:  # (host only: runs now)
            # A storage reallocated in place (same storage, new memory; the foreach copies
            # follow it too): planned again, here on the worker, the host plans' only user.
            plan.native = self._host_copy(plan)
            moved = plan.native.run()
            if moved >= 0:  # reallocated again meanwhile: by another thread, during a step
                raise RuntimeError(
                    f"parameter {plan.native_entries[moved].name!r} was reallocated while its "
                    "snapshot was being copied: call avg.fence() before changing parameters")
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
