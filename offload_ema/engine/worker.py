"""The worker thread: takes jobs (and callables) from its queue in order, waits for their copies
to land, applies them to the averages (:class:`~offload_ema.engine.store.AverageStore`) and
gives their staging back (:class:`~offload_ema.engine.staging.Pools`).

Folding (``fold`` > 1): it holds up to ``fold`` staged snapshots (whole ones: their staging
buffers and tickets stay taken) and applies them in one pass per accumulator; anything else it
takes (a ``run_after`` callable, the stop) first applies what it holds. "auto" holds nothing
while idle: it folds the jobs already waiting. Chunked snapshots (staging smaller than one) are
copied here, chunk by chunk, as buffers free up; on the host, parameters are read in place.

Owned by this thread: the held jobs, the averages' memory. Under ``lock``: the counters
(``stats``), the schedule of the last job done (``applied_schedule``), the LAWA rings' fill. A
failure is recorded in the :class:`ErrorSlot` and never ends the thread: reads, flush and close
wait on it.
"""
from __future__ import annotations

import collections
import queue
import threading
import time
from typing import Deque, Dict, List, Tuple

import torch

from offload_ema.engine.job import ErrorSlot, Job
from offload_ema.engine.staging import CopyPlan, live


def per_thread_intraop() -> bool:
    """Whether torch.set_num_threads in one thread leaves the others alone: true of the OpenMP
    backend (a per-thread setting), not of torch's native pool (process-wide)."""
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


class Worker:
    """The worker thread and what it owns (see the module doc)."""

    def __init__(self, layout, dev, staging, pools, store, errors: ErrorSlot, sizing):
        self.layout, self._ops, self._staging = layout, dev, staging
        self._pools, self._store, self._errors = pools, store, errors
        self.asynchronous = dev.asynchronous
        self.fold, self._fold_auto = sizing.fold, sizing.fold_auto
        self._chunks = sizing.chunks
        self.queue: "queue.SimpleQueue" = queue.SimpleQueue()  # Job, callable, None (stop)
        self._held: List[Job] = []  # staged jobs waiting to be folded
        self.lock = threading.Lock()
        self.stats: Dict[str, float] = collections.defaultdict(float)  # under lock
        self.applied_schedule = None  # schedule state of the last job done   (under lock)
        self.thread = threading.Thread(target=self._run, name="offload_ema-worker", daemon=True)
        self.thread.start()

    # ---- the loop -----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._ops.thread_init()
            if per_thread_intraop():
                # The worker's own torch ops (staging copies) are small; run them on this
                # thread instead of waking an OpenMP team that competes with training for the
                # cores. The kernels use offload_ema's own threads.
                torch.set_num_threads(1)
        except BaseException as exc:  # nothing is applied; reads, flush and close are served
            self._fail(exc)
        while True:
            item = self.queue.get()
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
            if self._errors.error is None:
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
        if self._held and (len(self._held) >= self.fold or self._errors.error is not None or
                           (self._fold_auto and self.queue.empty())):
            self._settle()

    def _settle(self) -> None:
        """Applies the snapshots held for folding (in one pass) and releases them."""
        jobs, self._held = self._held, []
        if not jobs:
            return
        try:
            if self._errors.error is None:
                self._fold(jobs)
        except BaseException as exc:
            self._fail(exc)
        finally:
            for job in jobs:
                self._release(job)

    def _fail(self, exc: BaseException) -> None:
        self._errors.record(exc)
        # Copies of the job may still be running: its staging and sources are released next,
        # so wait for them first. A drain that fails as well (a sticky CUDA error: nothing runs
        # any more) must not end the worker: reads, flush and close wait on it.
        try:
            self._ops.drain()
        except BaseException:
            pass

    def _release(self, job: Job) -> None:
        """Gives back what a finished (applied, dropped or failed) job held."""
        with self.lock:
            self._pools.give_back(job)
            job.sources = []
            job.issued.set()  # nobody may wait on a copy that will never be issued
            # (Parameters read in place are not copied.)
            self.stats["bytes_copied"] += self.layout.nbytes - self._staging.read_in_place_nbytes
            if job.schedule is not None:
                self.applied_schedule = job.schedule

    # ---- one snapshot at a time ---------------------------------------------------------------
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
        self._store.choose_entries(job)
        if self._staging.buffer_plans:
            if job.buffers_event is not None:
                self._ops.host_wait(job.buffers_event)  # the buffers' bytes are in staging
            self._update(job, self._staging.buffer_plans[job.ticket].staged)
        if job.prepared is not None:  # issued by the issuer thread (or the fence)
            for chunk, buf, start, done in job.prepared:
                self._apply(job, chunk, buf, start, done)
        else:
            self._copy_and_apply(job)
        self._complete(job)
        return False

    def _copy_and_apply(self, job: Job) -> None:
        """A chunked snapshot (issued here, chunk by chunk, as buffers free up), or the host's
        (the small parameters copied into staging, the large ones read where they are: the
        fence holds the next optimizer step until this is done)."""
        issued: Deque[Tuple[int, int, object, object]] = collections.deque()
        pools, plans, dev = self._pools, self._staging.plans, self._ops
        last = len(self._chunks) - 1
        for chunk in range(len(self._chunks)):
            while not pools.free:
                self._apply(job, *issued.popleft())
            buf = pools.free.popleft()
            job.held.append(buf)
            plan = plans[(buf, chunk)]
            if self.asynchronous:
                if chunk == 0:  # after the optimizer step
                    dev.stream_wait(dev.side, job.ready_event)
                start, done = self._staging.copy_on_side(plan, job)
                issued.append((chunk, buf, start, done))
                if chunk == last:
                    job.copy_event = done
            else:
                self._copy_on_host(job, plan)
                self._update(job, [(g, lo, hi, live(part)) for g, lo, hi, part in plan.inplace])
                issued.append((chunk, buf, None, None))
            if chunk == last:
                job.issued.set()
        while issued:
            self._apply(job, *issued.popleft())

    def _landed(self, job: Job, start, done) -> None:
        """Waits until a copy into staging has landed (its bytes are valid only then)."""
        self._ops.host_wait(done)
        job.copy_s += self._ops.elapsed_seconds(start, done)

    def _copy_on_host(self, job: Job, plan: CopyPlan) -> None:
        t0 = time.perf_counter()
        self._staging.copy(plan)
        job.copy_s += time.perf_counter() - t0

    def _apply(self, job: Job, chunk: int, buf: int, start=None, done=None) -> None:
        """Updates every average the job feeds from one chunk in a buffer, then frees it."""
        if done is not None:
            self._landed(job, start, done)
        self._update(job, self._staging.plans[(buf, chunk)].staged)
        with self.lock:
            job.held.remove(buf)
            self._pools.free.append(buf)

    def _is_dropped(self, job: Job) -> bool:
        """Whether the job's step had non-finite gradients (its optimizer skipped the update)."""
        if job.dropped is None:
            if job.found_inf is None:
                job.dropped = False
            elif self.asynchronous:
                # The flag's bytes have landed (long since, if a parameter copy already has).
                self._ops.host_wait(job.flag_event)
                job.dropped = bool(self._staging.flags[job.ticket].item() != 0)
            else:
                job.dropped = bool(job.found_inf.reshape(-1)[0].item() != 0)
        return job.dropped

    def _update(self, job: Job, segments) -> None:
        if self._is_dropped(job):
            return
        t0 = time.perf_counter()
        self._store.update(job, segments)
        job.update_s += time.perf_counter() - t0

    def _complete(self, job: Job) -> None:
        dropped = self._is_dropped(job)  # also on a rank with nothing to copy (DDP)
        with self.lock:
            st = self.stats
            if dropped:
                st["snapshots_dropped_nonfinite"] += 1
                return
            self._store.count(job)
            st["snapshots_applied"] += 1
            st["update_seconds"] += job.update_s
            st["copy_seconds"] += job.copy_s
            st["last_applied_step"] = job.step
            lag = time.perf_counter() - job.submitted
            st["lag_seconds_last"] = lag
            st["lag_seconds_max"] = max(st["lag_seconds_max"], lag)

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
            buf = self._pools.free.popleft()
            job.held.append(buf)
            self._copy_on_host(job, self._staging.plans[(buf, 0)])
        if job.buffers_event is not None:
            self._ops.host_wait(job.buffers_event)
        job.issued.set()  # the host's fence may go on: the parameters are read
        job.sources = []  # every copy has landed: its sources may be freed

    def _segments(self, job: Job) -> List[Tuple[int, int, int, torch.Tensor]]:
        """A staged job's (group, lo, hi, staging view); the same ranges, in the same order,
        for every job (the plans of all buffers and tickets are built alike)."""
        staging = self._staging
        segments = list(staging.buffer_plans[job.ticket].staged) if staging.buffer_plans else []
        if job.held:
            segments += staging.plans[(job.held[0], 0)].staged
        return segments

    def _fold(self, jobs: List[Job]) -> None:
        """Applies staged snapshots in order, with the results of applying them one by one
        (``AverageStore.fold``); LAWA entries copied per snapshot."""
        # A parameter replaced, frozen or added since the Averager was built: stop with a clear
        # error instead of averaging a tensor training no longer changes.
        self.layout.check_model()
        t0 = time.perf_counter()
        live_jobs = [j for j in jobs if not self._is_dropped(j)]
        segments = [self._segments(j) for j in live_jobs]
        self._store.fold(live_jobs, segments)
        elapsed = time.perf_counter() - t0
        live_segments = iter(segments)
        for job in jobs:  # snapshot by snapshot: LAWA entries, then the counters
            if not job.dropped:
                t1 = time.perf_counter()
                self._store.fill_ring(job, next(live_segments))
                elapsed += time.perf_counter() - t1
            self._complete(job)
        with self.lock:
            self.stats["update_seconds"] += elapsed
            self.stats["folds"] += 1
            self.stats["snapshots_folded"] += len(live_jobs)
