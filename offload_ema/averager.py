"""The public entry point: ``Averager`` keeps EMA / LAWA averages of a model in host memory."""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import sys
import time
import warnings
import weakref
from typing import Dict, Iterator, Mapping, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from offload_ema import ops
from offload_ema.distributed import (broadcast_into, dim0_offsets, full_tensor, gather_entries,
                                     group_info)
from offload_ema._version import __version__
from offload_ema.averages import EMA, LAWA
from offload_ema.engine import BUSY_POLICIES, AverageState, Engine, Job
from offload_ema.layout import Layout, is_dtensor, local_tensor
from offload_ema.snapshots import (Retention, SnapshotFuture, metadata, shard_paths, write_atomic,
                                   write_dcp, write_index)
from offload_ema.writer import SnapshotWriter

__all__ = ["Averager"]

_STATE_FORMAT = 1
_open_averagers: "weakref.WeakSet[Averager]" = weakref.WeakSet()


def _compiler_disable(fn):
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return disable(fn) if disable is not None else fn


@atexit.register
def _close_open_averagers():
    # Drain and stop workers, and finish pending saves, before the interpreter tears torch down
    # under them. A snapshot that could not be written must not end in a silent exit status 0.
    failed = False
    for avg in list(_open_averagers):
        try:
            avg.close()
        except BaseException as exc:  # the process is exiting: report, never raise
            failed = True
            print(f"offload_ema: an Averager failed while closing at exit (a pending snapshot "
                  f"may be missing): {exc!r}", file=sys.stderr)
    if failed:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


def _release(engine: Engine, writer: SnapshotWriter) -> None:
    """Stops the worker and the writer of an Averager that was garbage-collected unclosed; holds
    no reference to the Averager itself."""
    engine.close()
    writer.close()
    if engine.error is not None and not engine.error_reported:
        warnings.warn(f"an offload_ema Averager was dropped unclosed with an unreported worker "
                      f"error: {engine.error!r}", RuntimeWarning)


class Averager:
    """Weight averages of ``model``, kept in host memory and updated asynchronously.

    Every averaged tensor (trainable floating-point parameters; floating-point buffers too with
    ``buffers="average"``) is snapshotted at each step where an average is due; one snapshot
    feeds every average due at that step. Frozen parameters (``requires_grad=False``) are not
    averaged: averaged state dicts report their current value, like copied buffers.

    Args:
        model (nn.Module): the model under training, on one device (CPU or one GPU). Wrappers
            from ``torch.compile`` and DDP are looked through; names are those of the unwrapped
            model's ``state_dict()``.
        averages (Mapping[str, EMA | LAWA]): the averages to keep, by name.
        on_busy (str, default "block"): what a due step does when the worker is still busy with
            earlier snapshots: ``"block"`` waits (exact, may stall the step), ``"skip"`` drops the
            snapshot, ``"coalesce"`` drops it and gives the next snapshot the elapsed-steps decay
            ``beta ** periods``. Skipped and coalesced snapshots are counted in :meth:`stats`.
        staging_bytes (int, optional): pinned host staging budget. Default: two snapshots, so one
            can be copied while the other is averaged. Smaller than one snapshot: the snapshot
            moves in chunks, and the copy fence waits for the worker (see ``fence_wait_seconds``).
        buffers (str, default "copy"): ``"copy"`` reports buffers with their current value;
            ``"average"`` averages floating-point buffers like parameters.
        num_threads (int, optional): threads of the averaging kernels (``ops.set_num_threads``).
        shard (bool, optional): under torch.distributed, average a disjoint share of replicated
            parameters per rank (DDP). Default: on when torch.distributed is initialised with
            more than one process. FSDP2 (DTensor) parameters are always averaged per local shard.
        process_group (optional): the group to shard over (default: the default group).

    Example:
        >>> avg = oe.Averager(model, {"ema": oe.EMA(0.999), "lawa": oe.LAWA(10, every=100)})
        >>> avg.attach(optimizer)
        >>> for batch in loader:
        ...     loss(model, batch).backward(); optimizer.step(); optimizer.zero_grad()
        >>> with avg.swapped(model, "ema"):
        ...     evaluate(model)

    .. note::
        With :meth:`attach`, snapshots are taken by an ``optimizer.step`` post-hook and the copy
        fence runs in its pre-hook. Calling :meth:`step` by hand instead: call it right after
        ``optimizer.step()``; by default it fences at once (the current CUDA stream waits for the
        copy). Pass ``fence=False`` to overlap the copy with the next forward and backward, and
        then call :meth:`fence` before anything changes the parameters in place again.
    """

    def __init__(self, model: nn.Module, averages: Mapping[str, Union[EMA, LAWA]], *,
                 on_busy: str = "block", staging_bytes: Optional[int] = None,
                 buffers: str = "copy", num_threads: Optional[int] = None,
                 shard: Optional[bool] = None, process_group=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(averages, Mapping) or not averages:
            raise ValueError("averages must be a non-empty mapping of name -> EMA or LAWA, got "
                             f"{averages!r}")
        for name, spec in averages.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"average names must be non-empty strings, got {name!r}")
            if not isinstance(spec, (EMA, LAWA)):
                raise TypeError(f"averages[{name!r}] must be an EMA or LAWA, got "
                                f"{type(spec).__name__}")
        if on_busy not in BUSY_POLICIES:
            raise ValueError(f"on_busy must be one of {', '.join(BUSY_POLICIES)}, got {on_busy!r}")
        if num_threads is not None:
            ops.set_num_threads(num_threads)
        if shard is None:
            shard = dist.is_available() and dist.is_initialized() and \
                dist.get_world_size(process_group) > 1
        if shard and not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("shard=True needs torch.distributed to be initialised first")
        self._group = process_group
        self._dist = bool(shard)
        self._rank, self._world = group_info(process_group) if shard else (0, 1)
        self._layout = Layout(model, buffers=buffers, rank=self._rank, world=self._world)
        if not self._layout.all_entries:
            raise ValueError("model has no trainable floating-point parameters to average")
        # FSDP2: parameters are DTensors and each rank averages its local shards.
        self._fsdp = self._layout.sharded_tensors
        self._dcp_mesh = self._dcp_group = None
        if self._fsdp:
            self._dist = False
            self._rank, self._world = group_info(process_group)
            self._dcp_group, self._dcp_mesh = _writer_mesh(process_group)
        self.on_busy = on_busy
        self._states: Dict[str, AverageState] = {
            name: AverageState(name, spec, self._layout) for name, spec in averages.items()}
        self._engine = Engine(self._layout, staging_bytes)
        self._step_count = 0
        self._counts = {"snapshots_taken": 0, "snapshots_skipped": 0, "snapshots_coalesced": 0}
        self._busy_wait = 0.0
        self._hooks = []
        self._closed = False
        self._writer = SnapshotWriter()
        self._periodic = None           # (every, Retention, names, dtype)
        # Dropped without close(): the worker and the writer (which hold no reference to this
        # object) are stopped and the staging released when it is garbage-collected.
        self._finalizer = weakref.finalize(self, _release, self._engine, self._writer)
        self._finalizer.atexit = False  # at exit, _close_open_averagers reports errors instead
        _open_averagers.add(self)

    # ---- taking snapshots -----------------------------------------------------------------
    def attach(self, *optimizers: torch.optim.Optimizer) -> "Averager":
        """Takes a snapshot once every given optimizer has stepped, and fences the copy before
        the next step of any of them.

        Several optimizers over one model (e.g. Muon for matrices and AdamW for the rest) are
        attached together: ``attach(opt_a, opt_b)``; their steps count as one step.

        Steps skipped by the optimizer are not averaged: ``GradScaler`` does not call a plain
        optimizer's ``step`` on inf/NaN gradients (the step is not counted), and a fused one
        (``fused=True``) steps with ``found_inf`` set: that step is counted but its snapshot is
        dropped by the worker (``snapshots_dropped_nonfinite`` in :meth:`stats`), with no host
        sync on the training thread.

        Raises:
            ValueError: an optimizer updates tensors that are not the averaged parameters (the
                model was moved, re-wrapped or sharded after the Averager was built), or some
                averaged parameter is updated by none of the given optimizers.
        """
        self._check_open()
        if self._hooks:
            raise RuntimeError("this Averager is already attached; detach() first, then attach "
                               "every optimizer in one call")
        if not optimizers:
            raise TypeError("attach needs at least one optimizer")
        for i, opt in enumerate(optimizers):
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(f"optimizers[{i}] must be a torch.optim.Optimizer, got "
                                f"{type(opt).__name__}")
        self._layout.check_optimizers(optimizers)
        # Weak: hooks left on a live optimizer must not keep a dropped Averager (its worker and
        # pinned staging) alive; they do nothing once it is gone.
        me = weakref.ref(self)
        waiting = {id(o) for o in optimizers}
        stepped: Dict[int, Optional[torch.Tensor]] = {}

        # Out of compiled graphs: a compiled optimizer step runs the hooks eagerly (graph break)
        # instead of tracing the engine's threads and events into the graph.
        @_compiler_disable
        def pre_hook(opt, args, kwargs):
            avg = me()
            if avg is not None and not avg._closed:
                avg.fence()

        @_compiler_disable
        def post_hook(opt, args, kwargs):
            avg = me()
            if avg is None or avg._closed:
                return
            stepped[id(opt)] = getattr(opt, "found_inf", None)  # set by GradScaler if fused
            if len(stepped) < len(waiting):
                return
            flags = [f for f in stepped.values() if isinstance(f, torch.Tensor)]
            stepped.clear()
            found_inf = None
            if flags:
                found_inf = flags[0] if len(flags) == 1 else torch.stack(
                    [f.reshape(-1)[0].to(flags[0].device) for f in flags]).sum()
            avg._step(fence=False, found_inf=found_inf)

        for opt in optimizers:
            self._hooks += [opt.register_step_pre_hook(pre_hook),
                            opt.register_step_post_hook(post_hook)]
        return self

    def detach(self) -> None:
        """Removes the hooks installed by :meth:`attach` (after fencing the last copy)."""
        self.fence()
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def step(self, *, fence: bool = True) -> None:
        """Counts one optimizer step and takes a snapshot if an average is due.

        Args:
            fence (bool, default True): make the parameters safe to change at once. With
                ``False`` the copy overlaps with what follows, and :meth:`fence` must be called
                before the parameters change in place (``attach`` does this for you).
        """
        self._step(fence=fence, found_inf=None)

    def _step(self, *, fence: bool, found_inf: Optional[torch.Tensor]) -> None:
        self._check_open()
        self._check_not_capturing()
        self._raise_worker_error()
        s = self._step_count + 1
        due = [st for st in self._states.values() if st.spec.is_due(s)]
        if due:
            self._take(s, due, found_inf)  # raises with nothing taken and the step not counted
        self._step_count = s
        if fence:
            self.fence()
        if self._periodic is not None and s % self._periodic[0] == 0:
            every, retention, names, dtype = self._periodic
            for name in names:
                if self._states[name].scheduled:
                    self.save(retention.template.format(name=name, step=s), name, dtype=dtype,
                              _retention=retention)
        # Last, so that the step is counted and snapshotted even when a write failed earlier.
        self._raise_save_error()

    def fence(self) -> None:
        """Orders the last snapshot's copy before any later change of the parameters."""
        self._check_not_capturing()
        self._engine.fence()

    def _check_not_capturing(self) -> None:
        if self._engine.cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "an Averager cannot run inside CUDA graph capture (its copies, events and worker "
                "live outside the graph, and a replay would not take snapshots): capture the "
                "forward/backward only and run optimizer.step() outside the graph, or call "
                "avg.step() after each replay instead of attach()")

    def _take(self, step: int, due, found_inf: Optional[torch.Tensor]) -> None:
        eng = self._engine
        self._layout.check_shapes()
        if eng.busy():
            if self.on_busy == "skip":
                self._counts["snapshots_skipped"] += 1
                return
            if self.on_busy == "coalesce":
                for st in due:
                    st.coalesced += 1
                self._counts["snapshots_coalesced"] += 1
                return
            t0 = time.perf_counter()
            eng.wait_capacity()
            self._busy_wait += time.perf_counter() - t0
            self._raise_worker_error()
        # The schedule moves on only once the engine has taken the job: a failed submit leaves
        # it as it was (the caller may catch the error and go on training).
        emas = [(st, st.spec.weight(1 + st.coalesced)) for st in due if isinstance(st.spec, EMA)]
        lawas = [st for st in due if not isinstance(st.spec, EMA)]
        eng.submit(Job(step, emas, lawas, found_inf))
        for st in due:
            st.coalesced = 0
            st.scheduled += 1
        self._counts["snapshots_taken"] += 1

    # ---- waiting, errors, shutdown ------------------------------------------------------------
    def flush(self) -> None:
        """Waits until every snapshot taken so far is applied; re-raises a worker error."""
        self._check_open()
        self._engine.flush()
        self._raise_worker_error()
        self._raise_save_error()

    def close(self) -> None:
        """Applies what is in flight, stops the worker and removes the hooks. Idempotent.
        Re-raises a worker error not reported yet."""
        if self._closed:
            return
        self._closed = True
        _open_averagers.discard(self)
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._finalizer()  # the worker applies what is queued, the writer writes every file
        if not self._engine.error_reported:
            self._raise_worker_error()
        self._raise_save_error()

    def __enter__(self) -> "Averager":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # do not mask the body's exception with a worker error
            with contextlib.suppress(Exception):
                self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this Averager is closed")

    def _raise_worker_error(self) -> None:
        eng = self._engine
        if eng.error is None:
            return
        if not eng.error_reported:
            eng.error_reported = True
            raise eng.error  # carries the worker's traceback
        raise RuntimeError("the Averager's worker failed earlier (see the first error); build a "
                           "new Averager") from eng.error

    def _raise_save_error(self) -> None:
        error = self._writer.unseen_error()
        if error is not None:
            raise error

    # ---- snapshots on disk ----------------------------------------------------------------------
    def save(self, path: str, name: str, *, dtype: torch.dtype = torch.float32,
             format: str = "safetensors", _retention: Optional[Retention] = None
             ) -> SnapshotFuture:
        """Writes the average ``name`` to a safetensors file, in the background.

        The worker takes a copy of the average once every snapshot taken so far is applied (the
        training loop does not wait for it); a writer thread writes it to a temporary file in
        the same directory, fsyncs it, renames it over ``path`` and fsyncs the directory.

        Args:
            path (str): the final file name.
            name (str): which average.
            dtype (torch.dtype, default float32): dtype of the averaged tensors in the file.
            format (str, default "safetensors"): under FSDP2 also ``"dcp"``: a
                torch.distributed.checkpoint directory at ``path`` (every rank writes its
                shards; ``offload-ema consolidate`` turns it into one safetensors file).

        Returns:
            SnapshotFuture: ``result()`` is ``path`` once written, or raises the write's error
            (which the next ``step`` / ``flush`` also raises if nobody looked at it).
        """
        self._check_open()
        if format not in ("safetensors", "dcp"):
            raise ValueError(f"format must be 'safetensors' or 'dcp', got {format!r}")
        if format == "dcp" and not self._fsdp:
            raise ValueError("format='dcp' is for FSDP2 (DTensor) averages; elsewhere tensors "
                             "are whole on one rank and safetensors files hold them")
        if name not in self._states:
            self._state(name)  # raises: unknown name
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        st = self._states[name]
        if st.scheduled == 0:
            raise RuntimeError(f"average {name!r} has no snapshot yet (first due after step "
                               f"{st.spec.start + st.spec.every}, now at step {self._step_count})")
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"directory of the snapshot path does not exist: {directory}")
        sharded = self._dist or self._fsdp
        file_path, index_path = (shard_paths(path, self._rank, self._world) if sharded
                                 else (path, None))
        if format == "dcp":
            file_path, index_path = path, None
            self._dcp_seq = seq = getattr(self, "_dcp_seq", 0) + 1  # equal on every rank
        weight_map = self._weight_map(path) if sharded else None
        split = self._split_map() if self._fsdp else {}
        fut = SnapshotFuture(file_path)
        fut.set_running_or_notify_cancel()
        self._writer.track(fut)
        # Not averaged entries are taken now, on this thread: they may change at the next step.
        # Sharded, rank 0 writes them.
        others = {k: t.detach().to("cpu", copy=True) for k, t in self._layout.passthrough.items()
                  if self._rank == 0}
        step = self._step_count

        def take_copy():  # on the worker: the averages are at `step` here
            try:
                tensors = self._copy_average(st, dtype, others)
                meta = metadata(name, st.spec.config(), step, st.applied, dtype)
                if sharded:
                    meta.update(rank=str(self._rank), world=str(self._world))
                if split:
                    # Where this rank's part of each split tensor sits in the full tensor.
                    meta["shards"] = json.dumps({n: v[self._rank] for n, v in split.items()})
            except BaseException as exc:
                fut.set_exception(exc)
                return
            self._writer.submit(fut, lambda: write(tensors, meta))

        def write(tensors, meta) -> int:  # on the writer thread
            if format == "dcp":
                return write_dcp(file_path, self._as_dtensors(tensors), meta, self._dcp_group,
                                 self._rank, f"{step}-{seq}")
            nbytes = write_atomic(file_path, tensors, meta)
            if index_path is not None and self._rank == 0:
                write_index(index_path, weight_map, meta, split)
            if _retention is not None:
                _retention.prune(name)
            return nbytes

        self._engine.run_after(take_copy)
        return fut

    def _weight_map(self, path: str) -> Dict[str, object]:
        """state_dict name -> file (base name) holding it, for the sharded-files index; a
        tensor split across ranks (FSDP2) maps to the list of every rank's file."""
        files = [os.path.basename(shard_paths(path, r, self._world)[0]) for r in range(self._world)]
        out: Dict[str, object] = {}
        for e in self._layout.all_entries:
            where = files if is_dtensor(e.tensor) else files[self._layout.owner[e.name]
                                                              if self._dist else 0]
            for n in [e.name, *e.aliases]:
                out[n] = where
        for n in self._layout.passthrough:
            out[n] = files[0]
        return {n: out[n] for n in self._layout.names}

    def _as_dtensors(self, tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """FSDP2 averages for torch.distributed.checkpoint: split tensors as DTensors on the CPU
        mesh (from this rank's blocks); whole ones (rank 0's) as plain tensors."""
        from offload_ema.layout import DTensor
        by_name = {}
        for e in self._layout.all_entries:
            for n in [e.name, *e.aliases]:
                by_name[n] = e
        out = {}
        for n, t in tensors.items():
            e = by_name.get(n)
            if e is not None and is_dtensor(e.tensor):
                out[n] = DTensor.from_local(t, self._dcp_mesh, e.tensor.placements,
                                            run_check=False, shape=e.tensor.shape,
                                            stride=e.tensor.stride())
            else:
                out[n] = t
        return out

    def _split_map(self) -> Dict[str, list]:
        """FSDP2: for each split tensor (and alias), per rank [first row, global shape]."""
        out = {}
        for e in self._layout.all_entries:
            if not is_dtensor(e.tensor):
                continue
            rows = dim0_offsets(e.tensor)
            for n in [e.name, *e.aliases]:
                out[n] = [[r, list(e.tensor.shape)] for r in rows]
        return out

    def save_every(self, every: int, path_template: str, *, names=None,
                   keep_last: Optional[int] = None, dtype: torch.dtype = torch.float32) -> None:
        """Saves averages every ``every`` steps to ``path_template`` (with ``{name}`` and
        ``{step}``), keeping the ``keep_last`` newest files per average (all when None).

        Example:
            >>> avg.save_every(1000, "ckpt/{name}-{step:08d}.safetensors", keep_last=3)
        """
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int)
                                      or keep_last < 1):
            raise ValueError(f"keep_last must be None or an int >= 1, got {keep_last!r}")
        names = list(self._states) if names is None else list(names)
        for n in names:
            if n not in self._states:
                self._state(n)  # raises: unknown name
        if len(names) > 1 and "{name}" not in path_template:
            raise ValueError("path template must contain {name} when several averages are saved")
        try:
            path_template.format(name="x", step=0)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"path template {path_template!r} must use only {{name}} and "
                             f"{{step}}: {exc}") from exc
        self._periodic = (every, Retention(path_template, keep_last), names, dtype)

    def _copy_average(self, st: AverageState, dtype: torch.dtype, others) -> Dict[str, torch.Tensor]:
        out = {}
        for e, value in self._entry_values(st):
            if self._fsdp and not is_dtensor(e.tensor) and self._rank != 0:
                continue  # replicated under FSDP2: rank 0 writes it
            t = value.to(dtype, copy=True) if (isinstance(st.spec, EMA) or dtype != torch.float32) \
                else value
            out[e.name] = t
            for alias in e.aliases:
                out[alias] = t.clone()  # a file holds no two names for one memory
        for k, t in others.items():
            out[k] = t.to(dtype) if t.is_floating_point() else t
        return {n: out[n].contiguous() for n in self._layout.names if n in out}

    # ---- reading the averages ---------------------------------------------------------------
    @property
    def names(self):
        return list(self._states)

    @property
    def step_count(self) -> int:
        return self._step_count

    def ready(self, name: str) -> bool:
        """Whether the average ``name`` has a snapshot (taken, maybe not applied yet): whether
        ``swapped`` / ``averaged_state_dict`` / ``save`` can be used for it."""
        if name not in self._states:
            self._state(name)  # raises: unknown name
        return self._states[name].scheduled > 0

    def _state(self, name: str) -> AverageState:
        if name not in self._states:
            raise ValueError(f"no average named {name!r}; this Averager has: "
                             f"{', '.join(self._states)}")
        st = self._states[name]
        if st.applied == 0:
            raise RuntimeError(f"average {name!r} has no snapshot yet (first due after step "
                               f"{st.spec.start + st.spec.every}, now at step {self._step_count})")
        return st

    def _entry_values(self, st: AverageState) -> Iterator:
        """(entry, float32 CPU tensor of its average); LAWA means computed on the fly."""
        if isinstance(st.spec, EMA):
            for e in self._layout.entries:
                yield e, st.acc[e.group][e.offset:e.offset + e.numel].view(e.shape)
        else:
            ring = [st.ring[pos] for pos in st.order]
            for e in self._layout.entries:
                out = torch.empty(e.shape, dtype=torch.float32)
                ops.mean_(out.view(-1),
                          [r[e.group][e.offset:e.offset + e.numel] for r in ring])
                yield e, out

    def _local_values(self, st: AverageState) -> Dict[str, torch.Tensor]:
        """This rank's averaged entries as float32 CPU tensors of their own (copies)."""
        return {e.name: (v.clone() if isinstance(st.spec, EMA) else v)
                for e, v in self._entry_values(st)}

    def averaged_state_dict(self, name: str, *, rank: Optional[int] = None
                            ) -> Dict[str, torch.Tensor]:
        """The average ``name`` as ``{state_dict name: CPU tensor}``: float32 for averaged and
        other floating-point entries, the own dtype for integer buffers. Tensors are copies.

        Sharded (torch.distributed): every rank must call it; the full tensors are gathered from
        their owners on every rank, or with ``rank=k`` on rank ``k`` only (the others get ``{}``).
        """
        self.flush()
        st = self._state(name)
        self._layout.check_unchanged()
        values = self._local_values(st)
        if self._fsdp:
            values = {e.name: (full_tensor(values[e.name], e.tensor) if is_dtensor(e.tensor)
                               else values[e.name])
                      for e in self._layout.all_entries}
            if rank is not None and rank != self._rank:
                return {}
        elif self._dist:
            values = gather_entries(self._layout.all_entries, self._layout.owner, values,
                                    self._rank, self._group, dst=rank, device=self._layout.device)
            if rank is not None and rank != self._rank:
                return {}
        out: Dict[str, torch.Tensor] = {}
        for e in self._layout.all_entries:
            out[e.name] = values[e.name]
            for alias in e.aliases:
                out[alias] = values[e.name]
        for pname, t in self._layout.passthrough.items():
            t = t.detach().to("cpu", copy=True)
            out[pname] = t.float() if t.is_floating_point() else t
        return {n: out[n] for n in self._layout.names}

    @contextlib.contextmanager
    def swapped(self, model: nn.Module, name: str):
        """Puts the average ``name`` into ``model``'s parameters in place (same storage, so a
        compiled model sees it) and restores the exact previous values on exit, also when the
        body raises. Flushes first. Sharded: every rank must enter it; each owner writes its
        share and broadcasts it into every replica."""
        self.flush()
        st = self._state(name)
        entries = self._layout.all_entries
        # FSDP2 keeps a module's gathered (unsharded) parameters after a forward that does not
        # reshard (the root's, by default): writing the local shards would not reach them, and
        # after restoring, training would go on with the average. Reshard before and after.
        fsdp_modules = _fsdp_modules(model) if self._fsdp else []
        _reshard(fsdp_modules)
        targets = self._layout.resolve(model, entries)
        backups = []
        try:
            with torch.no_grad():
                values = self._local_values(st)
                for e, t in zip(entries, targets):
                    t = local_tensor(t)  # FSDP2: this rank's shard
                    backups.append((t, t.detach().to("cpu", copy=True)))
                    if e.name in values:
                        t.copy_(values[e.name])
            if self._dist:
                broadcast_into(targets, [self._layout.owner[e.name] for e in entries],
                               self._group)
            yield model
        finally:
            with torch.no_grad():
                for t, saved in backups:
                    t.copy_(saved)
            _reshard(fsdp_modules)  # what the body gathered holds the average: drop it

    # ---- introspection and persistence -----------------------------------------------------------
    def stats(self) -> Dict[str, float]:
        """Counters and timings: snapshots taken / applied / skipped / coalesced, bytes copied,
        copy, update, fence-wait and busy-wait seconds, lag, staging sizes."""
        eng = self._engine
        s, in_flight = eng.stats_snapshot()
        applied_step = int(s.pop("last_applied_step", 0))
        return {
            "step": self._step_count,
            **self._counts,
            "snapshots_applied": int(s.get("snapshots_applied", 0)),
            "in_flight": in_flight,
            "lag_steps": self._step_count - applied_step if applied_step else 0,
            "bytes_copied": int(s.get("bytes_copied", 0)),
            "copy_seconds": s.get("copy_seconds", 0.0),
            "update_seconds": s.get("update_seconds", 0.0),
            "fence_wait_seconds": s.get("fence_wait_seconds", 0.0),
            "busy_wait_seconds": self._busy_wait,
            "lag_seconds_last": s.get("lag_seconds_last", 0.0),
            "lag_seconds_max": s.get("lag_seconds_max", 0.0),
            "snapshot_bytes": self._layout.nbytes,
            "staging_bytes": eng.staging_nbytes,
            "pinned_bytes": eng.staging_nbytes if eng.cuda else 0,
            "staging_buffers": len(eng.staging),
            "snapshots_dropped_nonfinite": int(s.get("snapshots_dropped_nonfinite", 0)),
            "host_bytes": self._host_bytes(),
            "chunks_per_snapshot": len(eng.chunks),
            **self._writer.stats(),
            "rank": self._rank,
            "world": self._world,
            "averaged_tensors": len(self._layout.entries),
            "device": str(self._layout.device),
            "kernels": ops.backend(),
        }

    def _host_bytes(self) -> int:
        """Host memory this Averager holds: accumulators, LAWA slots filled so far, staging."""
        total = self._engine.staging_nbytes
        for st in self._states.values():
            if isinstance(st.spec, EMA):
                total += sum(a.numel() * 4 for a in st.acc)
            else:
                total += sum(t.numel() * t.element_size() for entry in st.ring if entry
                             for t in entry)
        return total

    def state_dict(self) -> dict:
        """Everything needed to resume exactly: step counter, schedules' progress, EMA
        accumulators, LAWA slots and their order. Flushes first; tensors are copies."""
        self.flush()
        averages = {}
        for name, st in self._states.items():
            d = {"config": st.spec.config(), "scheduled": st.scheduled, "pending": st.coalesced,
                 "applied": st.applied, "last_step": st.last_step}
            if isinstance(st.spec, EMA):
                d["acc"] = [a.clone() for a in st.acc]
            else:
                d["slots"] = {pos: [t.clone() for t in st.ring[pos]] for pos in st.order}
                d["order"] = list(st.order)
                d["next_pos"] = st.next_pos
            averages[name] = d
        return {"format": _STATE_FORMAT, "version": __version__, "step": self._step_count,
                "layout": self._layout.signature(), "averages": averages,
                "counts": dict(self._counts), "rank": self._rank, "world": self._world}

    def load_state_dict(self, state: dict) -> None:
        """Restores :meth:`state_dict` output into an Averager built for the same model and
        averages. Raises ValueError naming what does not match."""
        self.flush()
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise ValueError("state is not an offload_ema Averager state_dict (format "
                             f"{_STATE_FORMAT})")
        saved_world, saved_rank = state.get("world", 1), state.get("rank", 0)
        if (saved_world, saved_rank) != (self._world, self._rank):
            raise ValueError(
                f"state was saved by rank {saved_rank} of {saved_world}; this Averager is rank "
                f"{self._rank} of {self._world}. Resume at the same world size, each rank with "
                "its own state (averages are sharded across ranks)")
        layout = [tuple(x[:1]) + (tuple(x[1]),) + tuple(x[2:]) for x in state["layout"]]
        mine = self._layout.signature()
        if layout != mine:
            diff = next(((a, b) for a, b in zip(layout, mine) if a != b), None)
            raise ValueError("state was saved for a different model: "
                             + (f"saved {diff[0]}, this model has {diff[1]}" if diff else
                                f"saved {len(layout)} averaged tensors, this model has {len(mine)}"))
        if set(state["averages"]) != set(self._states):
            raise ValueError(f"state holds averages {sorted(state['averages'])}, this Averager "
                             f"has {sorted(self._states)}")
        for name, d in state["averages"].items():
            st = self._states[name]
            if d["config"] != st.spec.config():
                raise ValueError(f"average {name!r} was saved as {d['config']}, this Averager "
                                 f"has {st.spec.config()}")
        for name, d in state["averages"].items():
            st = self._states[name]
            st.scheduled, st.coalesced = d["scheduled"], d["pending"]
            st.applied, st.last_step = d["applied"], d["last_step"]
            if isinstance(st.spec, EMA):
                for a, saved in zip(st.acc, d["acc"]):
                    a.copy_(saved)
            else:
                st.ring = [None] * st.spec.window
                st.order.clear()
                for pos in d["order"]:
                    for t, saved in zip(st.ring_entry(pos), d["slots"][pos]):
                        t.copy_(saved)
                    st.order.append(pos)
                st.next_pos = d["next_pos"]
        self._step_count = int(state["step"])
        self._counts = dict(state.get("counts", self._counts))
        if self._step_count:
            with self._engine.cond:  # the worker is idle (flushed); the lock orders the write
                self._engine.stats["last_applied_step"] = max(
                    (st.last_step for st in self._states.values()), default=0)

    def __repr__(self) -> str:
        avgs = ", ".join(f"{n}={st.spec}" for n, st in self._states.items())
        return (f"Averager({avgs}, step={self._step_count}, device={self._layout.device}, "
                f"on_busy={self.on_busy!r})")


def _writer_mesh(process_group):
    """A gloo group and a 1-D CPU mesh over it, of the Averager's own, for
    torch.distributed.checkpoint exports: they run on the writer thread, so their collectives
    must not run on training's group (NCCL on GPUs: init_device_mesh("cpu") over the world hands
    back the default group when its backend is not gloo, and the writer thread never set a CUDA
    device). Created at construction, where every rank is (creating a group is a collective)."""
    from torch.distributed.device_mesh import DeviceMesh

    ranks = dist.get_process_group_ranks(process_group or dist.group.WORLD)
    group = dist.new_group(ranks=ranks, backend="gloo")
    return group, DeviceMesh.from_group(group, "cpu")


def _fsdp_modules(model: nn.Module) -> list:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import FSDPModule
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _reshard(modules) -> None:
    for m in modules:
        m.reshard()
