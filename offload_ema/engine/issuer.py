"""The issuer thread (asynchronous devices): the first to take every job and call from the
engine's inbox. For a whole-snapshot job it issues the copies on the side stream, off the
training thread (one copy per tensor or pack run costs microseconds each), unless the training
thread's fence got there first (``Job.claim``); then it passes everything on to the worker in
the order received, so a ``run_after`` callable still runs after every job submitted before it.
"""
from __future__ import annotations

import queue
import threading
import time

from offload_ema.engine.job import FENCE, ISSUER, RELEASED, ErrorSlot, Job


class Issuer:
    """Owns its thread; reads the inbox, writes the worker's queue."""

    def __init__(self, dev, staging, inbox: "queue.SimpleQueue", outbox: "queue.SimpleQueue",
                 errors: ErrorSlot, whole: bool):
        self._ops, self._staging, self._errors = dev, staging, errors
        self.inbox, self._outbox = inbox, outbox
        self._whole = whole  # whole snapshots: their copies are issued here (or by the fence)
        self.thread = threading.Thread(target=self._run, name="offload_ema-issuer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self._ops.thread_init()  # this device, the side stream, thread-local capture mode
        except BaseException as exc:  # reported by the worker; jobs are still passed on
            self._errors.record(exc)
        while True:
            item = self.inbox.get()
            try:
                if isinstance(item, Job) and item.ready_event is not None and self._whole:
                    self._claim_and_issue(item)
            except BaseException as exc:  # never ends this thread: the worker reports it
                if isinstance(item, Job):
                    item.issue_error = exc
                    item.issued.set()
                else:
                    self._errors.record(exc)
            self._outbox.put(item)  # in the order received (run_after callables included)
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
            while "by" not in job.claim and self.inbox.empty() and not job.issued.is_set() \
                    and time.monotonic() < deadline:
                time.sleep(0.0005)
        while not job.issued.is_set():
            by = job.claim.setdefault("by", ISSUER)
            if by == RELEASED:
                job.claim["by"] = by = ISSUER  # only this thread takes a released claim
            if by == ISSUER:
                try:
                    self.issue(job)
                except BaseException as exc:  # reaches the user through the worker
                    job.issue_error = exc
                job.issued.set()
                return
            job.issued.wait(0.001)  # the fence is issuing it (or gives it back)

    def issue(self, job: Job) -> None:
        """A whole snapshot's copies (here, or by the fence); the caller sets ``issued``."""
        if self._errors.error is None:  # after a worker error nothing more is applied
            self._staging.issue_whole(job)
