"""The snapshot writer: ``save`` and ``save_every`` of an Averager, on a thread of its own.

A save takes its copy of the average on the engine's worker, once every snapshot taken before it
is applied (the training loop does not wait), then this module's thread writes the file
(``snapshots.write_atomic``: temporary, fsync, rename, directory fsync), the sharded-files index
and, for periodic saves, prunes old files. Its future carries the result or the error; an error
nobody looked at is handed out once by :meth:`SnapshotWriter.unseen_error`.

The thread is our own, not a ``concurrent.futures`` pool: a pool refuses new work once the
interpreter starts shutting down (``threading._shutdown`` runs before ``atexit``), and a save
handed over while a script exits must still be written. ``close()`` writes everything queued.
"""
from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
import time
from typing import Callable, Dict, List, Optional

import torch

from offload_ema import ops
from offload_ema.averages import Decaying, check_int
from offload_ema.layout import Layout
from offload_ema.snapshots import (Retention, SnapshotFuture, metadata, write_atomic, write_dcp,
                                   write_directory, write_index)

__all__ = ["SnapshotWriter"]


@contextlib.contextmanager
def _worker_threads():
    """The worker runs its own torch ops on one thread (it leaves the cores to training); a
    save's copies are large and rare, and take the kernels' thread count meanwhile. Only where
    the setting is per thread (OpenMP); torch's native pool would change it for training too."""
    from offload_ema.engine import per_thread_intraop
    if not per_thread_intraop():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(ops.get_num_threads())
    try:
        yield
    finally:
        torch.set_num_threads(before)


class SnapshotWriter:
    """Writes an Averager's snapshot files. ``save`` / ``save_every`` / ``due`` / ``unseen_error``
    / ``close`` are called by the training thread; the copies run on the engine's worker; files
    are written by this writer's thread. Counters are guarded by ``_lock``; the futures list is
    the training thread's (appends from other threads are single atomic operations), so the step
    path takes no lock (an interrupt at any bytecode cannot leave one held)."""

    def __init__(self, engine, layout: Layout, strategy):
        self._engine, self._layout, self._strategy = engine, layout, strategy
        self._queue: "queue.SimpleQueue" = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False  # under _lock
        self._futures: List[SnapshotFuture] = []  # not yet known to be fine  (training thread)
        self._stats = {"saves_written": 0, "save_seconds": 0.0, "save_bytes": 0}  # under _lock
        # Started now, not at the first save: that save's write may be handed over inside the
        # exit's close, when Python 3.12.0-3.12.2 refuses to start a thread.
        self._thread = threading.Thread(target=self._run, name="offload_ema-writer", daemon=True)
        self._thread.start()
        self._dcp_seq = 0      # equal on every rank: the same saves in the same order
        self.periodic = None   # (every, Retention, names, dtype)                (training thread)

    # ---- training thread ------------------------------------------------------------------
    def save(self, name: str, spec, path: str, step: int, *, dtype: torch.dtype,
             format: str = "safetensors", retention: Optional[Retention] = None
             ) -> SnapshotFuture:
        """Queues the average ``name`` at ``step`` for writing; the caller checked the name."""
        if format not in ("safetensors", "dcp"):
            raise ValueError(f"format must be 'safetensors' or 'dcp', got {format!r}")
        if format == "dcp" and getattr(self._strategy, "dcp_group", None) is None:
            raise ValueError("format='dcp' is for FSDP2 (DTensor) averages; elsewhere (whole "
                             "tensors, ZeRO-3 partitions) safetensors files hold them")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise NotADirectoryError(f"the snapshot path's parent is a file, not a directory: "
                                     f"{directory}")
        os.makedirs(directory, exist_ok=True)  # (every rank may create it: exist_ok)
        strategy, layout = self._strategy, self._layout
        layout.check_unchanged()  # never a file of tensors the model no longer has
        file_path, index_path = strategy.file_paths(path)
        index = strategy.index(layout, path)
        if format == "dcp":
            file_path, index_path = path, None
            self._dcp_seq += 1
            tag = f"{step}-{self._dcp_seq}"
        fut = SnapshotFuture(file_path)
        fut.set_running_or_notify_cancel()
        self._futures.append(fut)
        # Buffers that are not averaged are taken now, on this thread: the next forward may
        # change them. Frozen parameters do not change: the worker copies them (under LoRA the
        # whole base model), not the training thread. Sharded, rank 0 writes them.
        writes = strategy.writes_passthrough()
        others = {k: t.detach().to("cpu", copy=True) for k, t in layout.passthrough.items()
                  if writes and k not in layout.frozen}

        def take_copy():  # on the worker: the averages are at `step` here
            try:
                with _worker_threads():
                    frozen = {k: layout.passthrough[k].detach().to("cpu", copy=True)
                              for k in layout.frozen} if writes else {}
                    tensors = self._copy_average(name, spec, dtype, {**others, **frozen})
                meta = metadata(name, spec.config(), step, self._engine.applied(name), dtype)
                # Entries that are not averaged (buffers, frozen parameters): post-hoc synthesis
                # takes them from one snapshot instead of combining them.
                meta["passthrough"] = json.dumps(sorted(layout.passthrough))
                meta.update(strategy.file_meta(layout))
            except BaseException as exc:
                fut.set_exception(exc)
                return
            self._submit(fut, lambda: write(tensors, meta))

        def write(tensors, meta) -> int:  # on the writer thread
            if format == "dcp":
                return write_dcp(file_path, strategy.as_dtensors(layout, tensors), meta,
                                 strategy.dcp_group, strategy.rank, tag)
            nbytes = write_atomic(file_path, tensors, meta)
            if index_path is not None and strategy.rank == 0:
                write_index(index_path, index, meta)
            if retention is not None:
                retention.prune(name, step)
            return nbytes

        self._engine.run_after(take_copy)
        return fut

    def save_pretrained(self, out_dir: str, model, values: Dict[str, torch.Tensor],
                        dtypes: Dict[str, torch.dtype]) -> SnapshotFuture:
        """Writes ``values`` (a full float32 state dict) as ``model``'s directory (config +
        safetensors weights in ``dtypes``, the model's), loadable with the model class's
        ``from_pretrained``. Written under a temporary name, then renamed into place (an older
        directory of that name is replaced only once the new one is complete)."""
        cast: Dict[int, torch.Tensor] = {}  # tied names keep sharing one tensor
        out = {}
        for k, t in values.items():
            if id(t) not in cast:
                cast[id(t)] = t.to(dtypes.get(k, t.dtype)) if t.is_floating_point() else t
            out[k] = cast[id(t)]
        values = out
        out_dir = os.path.abspath(os.fspath(out_dir))
        fut = SnapshotFuture(out_dir)
        fut.set_running_or_notify_cancel()
        self._futures.append(fut)
        self._submit(fut, lambda: _write_pretrained(out_dir, model, values))
        return fut

    def save_every(self, every: int, template: str, names: List[str], keep_last: Optional[int],
                   dtype: torch.dtype) -> None:
        check_int(every, "every", 1)
        if keep_last is not None:
            check_int(keep_last, "keep_last", 1)
        if len(names) > 1 and "{name}" not in template:
            raise ValueError("path template must contain {name} when several averages are saved")
        try:
            template.format(name="x", step=0)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"path template {template!r} must use only {{name}} and "
                             f"{{step}}: {exc}") from exc
        self.periodic = (every, Retention(template, keep_last), names, dtype)

    def save_due(self, step: int, schedule) -> None:
        """Queues the periodic saves due after ``step`` (of averages that have a snapshot)."""
        if self.periodic is None or step % self.periodic[0]:
            return
        _, retention, names, dtype = self.periodic
        for n in names:
            if schedule.scheduled[n]:
                self.save(n, schedule.specs[n], retention.template.format(name=n, step=step),
                          step, dtype=dtype, retention=retention)

    def _copy_average(self, name: str, spec, dtype: torch.dtype, others) -> Dict[str, torch.Tensor]:
        out = {}
        for e, value in self._engine.values(name):
            if not self._strategy.writes_entry(e):
                continue
            # Accumulator values are views of live memory: copied; LAWA means are fresh.
            value = self._strategy.file_value(e, value)
            t = value.to(dtype, copy=True) if (isinstance(spec, Decaying) or dtype != torch.float32) \
                else value
            out[e.name] = t
            for alias in e.aliases:
                out[alias] = t.clone()  # a file holds no two names for one memory
        for k, t in others.items():
            out[k] = t.to(dtype) if t.is_floating_point() else t
        return {n: out[n].contiguous() for n in self._layout.names if n in out}

    def unseen_error(self) -> Optional[BaseException]:
        """The first error of a finished save that nobody has looked at (marked seen now); saves
        known to be done are forgotten."""
        if not self._futures:  # every step asks
            return None
        error = None
        for fut in list(self._futures):  # a copy: a save on another thread may append
            if not fut.done():
                continue
            exc = None if fut.cancelled() else fut._exception_unseen()
            if exc is not None and error is None:
                error = exc
                fut.observed = True
            elif exc is not None:
                continue  # the next call reports it
            self._futures.remove(fut)
        return error

    def stats(self) -> Dict[str, float]:
        with self._lock:
            return dict(self._stats)

    def close(self) -> None:
        """Writes everything queued, then stops the thread. Idempotent; from the writer thread
        itself (a garbage collection there) it only asks it to stop."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._queue.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join()

    # ---- writer thread ----------------------------------------------------------------------
    def _submit(self, fut: SnapshotFuture, write: Callable[[], int]) -> None:
        with self._lock:
            if self._closed or not self._thread.is_alive():
                fut.set_exception(RuntimeError("the snapshot writer is closed"))
                return
            self._queue.put((fut, write))

    def _run(self) -> None:
        setup_error = None
        try:
            if self._layout.device.type == "cuda":
                # torch.distributed.checkpoint's writer syncs the current CUDA stream: this
                # device's, not device 0's (which would also get a context of this process).
                torch.cuda.set_device(self._layout.device)
        except BaseException as exc:  # every save fails with it: reported on the main thread
            setup_error = exc
        while True:
            item = self._queue.get()
            if item is None:
                return
            fut, write = item
            if setup_error is not None:
                fut.set_exception(RuntimeError(f"the snapshot writer thread could not start: "
                                               f"{setup_error!r}"))
                continue
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


def pretrained_kind(model) -> Optional[str]:
    """``"transformers"`` (a PreTrainedModel: ``save_pretrained(..., state_dict=...)``),
    ``"diffusers"`` (a ModelMixin: ``save_config`` + ``diffusion_pytorch_model.safetensors``), or
    None for a model that cannot be written as a ``from_pretrained`` directory."""
    import inspect
    save = getattr(model, "save_pretrained", None)
    if not callable(save) or getattr(model, "config", None) is None:
        return None
    try:
        params = inspect.signature(save).parameters
    except (TypeError, ValueError):
        return None
    if "state_dict" in params:
        return "transformers"
    if callable(getattr(model, "save_config", None)):
        return "diffusers"
    return None


def _write_pretrained(out_dir: str, model, values: Dict[str, torch.Tensor]) -> int:
    def write(tmp: str) -> None:
        if pretrained_kind(model) == "transformers":
            # Tied weights share one tensor in ``values``: transformers writes them once.
            model.save_pretrained(tmp, state_dict=values, safe_serialization=True)
            return
        import safetensors.torch
        model.save_config(tmp)
        seen: set = set()
        tensors = {}
        for k, t in values.items():  # a file holds no two names for one memory
            tensors[k] = t.clone() if id(t) in seen else t.contiguous()
            seen.add(id(t))
        safetensors.torch.save_file(
            tensors, os.path.join(tmp, "diffusion_pytorch_model.safetensors"),
            metadata={"format": "pt"})
    return write_directory(out_dir, write)
