"""The snapshot writer: one thread that writes snapshot files in the background, its futures and
its error reporting.

The thread is our own (not a ``concurrent.futures`` pool): a pool refuses new work once the
interpreter starts shutting down (``threading._shutdown`` runs before ``atexit``), and a save the
worker hands over while a script exits must still be written. ``close()`` writes everything
queued before it returns.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Dict, List, Optional

from offload_ema.snapshots import SnapshotFuture

__all__ = ["SnapshotWriter"]


class SnapshotWriter:
    """Writes snapshot files on a thread of its own, in submission order.

    Owned by the training thread (``track``, ``unseen_error``, ``close``); ``submit`` may also be
    called from the Averager's worker. Counters are written by the writer thread under ``_lock``.
    """

    def __init__(self):
        self._queue: "queue.SimpleQueue" = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self._closed = False
        self._futures: List[SnapshotFuture] = []  # not yet known to be fine (training thread)
        self._stats = {"saves_written": 0, "save_seconds": 0.0, "save_bytes": 0}

    def track(self, fut: SnapshotFuture) -> None:
        """Remembers a save's future, so that an error nobody looked at is raised later."""
        self._futures.append(fut)

    def submit(self, fut: SnapshotFuture, write: Callable[[], int]) -> None:
        """Runs ``write()`` (returns the bytes written) on the writer thread and settles ``fut``
        with its path, or with the error it raised."""
        with self._lock:
            if self._closed:
                fut.set_exception(RuntimeError("the snapshot writer is closed"))
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="offload_ema-writer",
                                                daemon=True)
                self._thread.start()
            self._queue.put((fut, write))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fut, write = item
            item = None  # write() may hold its Averager: not kept while idle (see close)
            t0 = time.perf_counter()
            try:
                nbytes = write()
            except BaseException as exc:
                fut.set_exception(exc)
                continue
            finally:
                write = None
            fut.seconds, fut.nbytes = time.perf_counter() - t0, nbytes
            with self._lock:
                self._stats["saves_written"] += 1
                self._stats["save_seconds"] += fut.seconds
                self._stats["save_bytes"] += nbytes
            fut.set_result(fut.path)

    def stats(self) -> Dict[str, float]:
        with self._lock:
            return dict(self._stats)

    def unseen_error(self) -> Optional[BaseException]:
        """The first error of a finished save that nobody has looked at (marked seen now), and
        forgets the saves known to be done."""
        keep, error = [], None
        for fut in self._futures:
            if not fut.done():
                keep.append(fut)
                continue
            exc = None if fut.cancelled() else fut._exception_unseen()
            if exc is not None and error is None:
                error = exc
                fut.observed = True
        self._futures = keep
        return error

    def close(self) -> None:
        """Writes everything queued, then stops the thread. Idempotent; from the writer thread
        itself (a garbage collection there) it only asks it to stop."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        if thread is None:
            return
        self._queue.put(None)
        if threading.current_thread() is not thread:
            thread.join()
