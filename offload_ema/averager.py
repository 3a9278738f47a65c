"""The public entry point: ``Averager`` keeps EMA / LAWA averages of a model in host memory.

A facade over parts with one job each: ``schedule.Schedule`` (what is due, busy policy, counts;
training thread), ``engine.Engine`` (staging, copies, fence, worker, the averages),
``sharding`` (local / DDP owner-sharded / FSDP2 local shards), ``writer.SnapshotWriter`` (files).
"""
from __future__ import annotations

import atexit
import contextlib
import os
import sys
import warnings
import weakref
from typing import Dict, Mapping, Optional, Union

import torch
from torch import nn

from offload_ema import ops, resume, sharding
from offload_ema.averages import EMA, LAWA
from offload_ema.engine import Engine
from offload_ema.layout import Layout, local_tensor
from offload_ema.schedule import Schedule
from offload_ema.snapshots import Retention, SnapshotFuture
from offload_ema.writer import SnapshotWriter

__all__ = ["Averager"]

_open_averagers: "weakref.WeakSet[Averager]" = weakref.WeakSet()


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
    """Stops the threads of an Averager garbage-collected unclosed (holds no reference to it)."""
    engine.close()
    writer.close()
    if engine.unreported_error() is not None:
        warnings.warn(f"an offload_ema Averager was dropped unclosed with an unreported worker "
                      f"error: {engine.unreported_error()!r}", RuntimeWarning)


def _compiler_disable(fn):
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return disable(fn) if disable is not None else fn


class Averager:
    """Weight averages of ``model``, kept in host memory and updated asynchronously.

    Every averaged tensor (trainable floating-point parameters; floating-point buffers too with
    ``buffers="average"``) is snapshotted at each step where an average is due; one snapshot
    feeds every average due at that step. Frozen parameters are not averaged: averaged state
    dicts report their current value, like copied buffers.

    Args:
        model (nn.Module): the model under training, on one device (CPU or one GPU). Wrappers
            from ``torch.compile`` and DDP are looked through; names are those of the unwrapped
            model's ``state_dict()``.
        averages (Mapping[str, EMA | LAWA]): the averages to keep, by name.
        on_busy (str, default "block"): a due step while the worker is busy: ``"block"`` waits
            (exact), ``"skip"`` drops the snapshot, ``"coalesce"`` drops it and gives the next
            snapshot the elapsed-steps decay ``beta ** periods``; counted in :meth:`stats`.
        staging_bytes (int, optional): pinned host staging budget; default two snapshots. Less
            than one: snapshots move in chunks and the fence waits (``fence_wait_seconds``).
        buffers (str, default "copy"): ``"copy"`` reports buffers with their current value;
            ``"average"`` averages floating-point buffers like parameters.
        num_threads (int, optional): threads of the averaging kernels (``ops.set_num_threads``).
        shard (bool, optional): under torch.distributed, average a disjoint share of replicated
            parameters per rank (DDP); default: on with more than one process. FSDP2 (DTensor)
            parameters are always averaged per local shard.
        process_group (optional): the group to shard over (default: the default group).

    Example:
        >>> avg = oe.Averager(model, {"ema": oe.EMA(0.999), "lawa": oe.LAWA(10, every=100)})
        >>> avg.attach(optimizer)
        >>> with avg.swapped(model, "ema"):
        ...     evaluate(model)

    .. note::
        With :meth:`attach`, snapshots are taken by ``optimizer.step`` post-hooks and the copy
        fence runs in its pre-hook. Calling :meth:`step` by hand instead: right after
        ``optimizer.step()``; ``fence=False`` overlaps the copy with what follows, and then
        :meth:`fence` must run before anything changes the parameters in place again.
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
        self._schedule = Schedule(averages, on_busy)
        if num_threads is not None:
            ops.set_num_threads(num_threads)
        self._strategy = sharding.choose(model, shard, process_group)
        self._layout = Layout(model, buffers=buffers, rank=self._strategy.rank,
                              world=self._strategy.world)
        if not self._layout.all_entries:
            raise ValueError("model has no trainable floating-point parameters to average")
        self._engine = Engine(self._layout, averages, staging_bytes)
        self._writer = SnapshotWriter(self._engine, self._layout, self._strategy)
        self._hooks = []
        self._closed = False
        # Dropped without close(): its threads stop and its staging is freed when it is
        # garbage-collected (neither the worker nor the writer refers to this object).
        self._finalizer = weakref.finalize(self, _release, self._engine, self._writer)
        self._finalizer.atexit = False  # at exit, _close_open_averagers reports errors instead
        _open_averagers.add(self)

    @property
    def on_busy(self) -> str:
        return self._schedule.on_busy

    # ---- taking snapshots -----------------------------------------------------------------
    def attach(self, *optimizers: torch.optim.Optimizer) -> "Averager":
        """Takes a snapshot once every given optimizer has stepped (several optimizers over one
        model, e.g. Muon + AdamW, count as one step), and fences the copy before the next step
        of any of them.

        Steps skipped by the optimizer are not averaged: ``GradScaler`` does not call a plain
        optimizer's ``step`` on inf/NaN gradients (not counted); a fused one steps with
        ``found_inf`` set: counted, and the worker drops its snapshot
        (``snapshots_dropped_nonfinite``), with no host sync on the training thread.

        Raises:
            ValueError / RuntimeError: an optimizer updates tensors that are not the averaged
                parameters (the model was moved, converted, sharded or re-created after the
                Averager was built), or some averaged parameter is updated by none of them.
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
        # Weak: hooks left on a live optimizer do not keep a dropped Averager alive.
        me, expected, stepped = weakref.ref(self), len(optimizers), {}

        # Disabled for torch.compile: a compiled optimizer step runs the hooks eagerly instead of
        # tracing the engine's lock, queue and timers into its graph.
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
            if len(stepped) == expected:
                flags = [f for f in stepped.values() if isinstance(f, torch.Tensor)]
                stepped.clear()
                found_inf = flags[0] if len(flags) == 1 else torch.stack(
                    [f.reshape(-1)[0].to(flags[0].device) for f in flags]).sum() if flags else None
                avg._step(False, found_inf)

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
        """Counts one optimizer step and takes a snapshot if an average is due. With
        ``fence=False`` the copy overlaps with what follows, and :meth:`fence` must be called
        before the parameters change in place (``attach`` does this for you). If handing the
        snapshot over fails (e.g. out of memory), the error is raised and the step not counted."""
        self._step(fence, None)

    def _step(self, fence: bool, found_inf: Optional[torch.Tensor]) -> None:
        self._check_open()
        self._check_not_capturing()
        self._engine.raise_error()
        sched = self._schedule
        s = sched.step + 1
        due = sched.due(s)
        if due:
            self._layout.check_shapes()
            sched.take(self._engine, s, due, found_inf)
        sched.step = s
        if fence:
            self.fence()
        for name, path, dtype, retention in self._writer.due(s):
            if sched.scheduled[name]:
                self._writer.save(name, sched.specs[name], path, s, dtype=dtype,
                                  retention=retention)
        self._raise_save_error()  # last: the step is counted even when a write failed earlier

    def fence(self) -> None:
        """Orders the last snapshot's copy before any later change of the parameters."""
        self._check_not_capturing()
        self._engine.fence()

    def _check_not_capturing(self) -> None:
        if self._engine.is_capturing():
            raise RuntimeError(
                "an Averager cannot run inside CUDA graph capture (its copies, events and worker "
                "live outside the graph, and a replay would take no snapshot): capture forward "
                "and backward only and run optimizer.step() outside the graph, or call "
                "avg.step() after each replay instead of attach()")

    # ---- waiting, errors, shutdown ------------------------------------------------------------
    def flush(self) -> None:
        """Waits until every snapshot taken so far is applied; re-raises a worker error."""
        self._check_open()
        self._engine.flush()
        self._engine.raise_error()
        self._raise_save_error()

    def close(self) -> None:
        """Applies what is in flight, writes pending saves, stops the threads and removes the
        hooks. Idempotent. Re-raises a worker or save error not reported yet."""
        if self._closed:
            return
        self._closed = True
        _open_averagers.discard(self)
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._finalizer()
        self._engine.raise_error(only_unreported=True)
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

    def _raise_save_error(self) -> None:
        error = self._writer.unseen_error()
        if error is not None:
            raise error

    # ---- snapshots on disk ----------------------------------------------------------------------
    def save(self, path: str, name: str, *, dtype: torch.dtype = torch.float32,
             format: str = "safetensors") -> SnapshotFuture:
        """Writes the average ``name`` to a safetensors file, in the background: the worker
        copies it once every snapshot taken so far is applied; a writer thread writes a
        temporary file, fsyncs it and renames it over ``path``.

        Args:
            path (str): the final file name (sharded: per-rank files plus an index).
            name (str): which average.
            dtype (torch.dtype, default float32): dtype of the averaged tensors in the file.
            format (str, default "safetensors"): under FSDP2 also ``"dcp"`` (a
                torch.distributed.checkpoint directory at ``path``).

        Returns:
            SnapshotFuture: ``result()`` is the path once written, or raises the write's error
            (which the next ``step`` / ``flush`` also raises if nobody looked at it).
        """
        self._check_open()
        self._check_name(name)
        if not self._schedule.scheduled[name]:
            raise RuntimeError(self._no_snapshot_yet(name))
        return self._writer.save(name, self._schedule.specs[name], path, self._schedule.step,
                                 dtype=dtype, format=format)

    def save_every(self, every: int, path_template: str, *, names=None,
                   keep_last: Optional[int] = None, dtype: torch.dtype = torch.float32) -> None:
        """Saves averages every ``every`` steps to ``path_template`` (with ``{name}`` and
        ``{step}``), keeping the ``keep_last`` newest files per average (all when None).

        Example:
            >>> avg.save_every(1000, "ckpt/{name}-{step:08d}.safetensors", keep_last=3)
        """
        self._check_open()
        names = list(self._schedule.specs) if names is None else list(names)
        for n in names:
            self._check_name(n)
        self._writer.save_every(every, path_template, names, keep_last, dtype)

    # ---- reading the averages ---------------------------------------------------------------
    @property
    def names(self):
        return list(self._schedule.specs)

    @property
    def step_count(self) -> int:
        return self._schedule.step

    def ready(self, name: str) -> bool:
        """Whether the average ``name`` has a snapshot (taken, maybe not applied yet): whether
        ``swapped`` / ``averaged_state_dict`` / ``save`` can be used for it."""
        self._check_name(name)
        return self._schedule.scheduled[name] > 0

    def _check_name(self, name: str) -> None:
        if name not in self._schedule.specs:
            raise ValueError(f"no average named {name!r}; this Averager has: "
                             f"{', '.join(self._schedule.specs)}")

    def _no_snapshot_yet(self, name: str) -> str:
        spec = self._schedule.specs[name]
        return (f"average {name!r} has no snapshot yet (first due after step "
                f"{spec.start + spec.every}, now at step {self._schedule.step})")

    def _local_values(self, name: str) -> Dict[str, torch.Tensor]:
        """Flushes, then this rank's averaged entries as float32 CPU tensors of their own."""
        self.flush()
        self._check_name(name)
        if self._engine.applied(name) == 0:
            raise RuntimeError(self._no_snapshot_yet(name))
        self._layout.check_unchanged()
        copy = isinstance(self._schedule.specs[name], EMA)  # EMA values are the accumulators
        return {e.name: (v.clone() if copy else v) for e, v in self._engine.values(name)}

    def averaged_state_dict(self, name: str, *, rank: Optional[int] = None
                            ) -> Dict[str, torch.Tensor]:
        """The average ``name`` as ``{state_dict name: CPU tensor}``: float32 for averaged and
        other floating-point entries, the own dtype for integer buffers. Tensors are copies.

        Sharded (torch.distributed): every rank must call it; the full tensors are gathered on
        every rank, or with ``rank=k`` on rank ``k`` only (the others get ``{}``)."""
        values = self._strategy.gather(self._layout, self._local_values(name), rank)
        if values is None:
            return {}
        out: Dict[str, torch.Tensor] = {}
        for e in self._layout.all_entries:
            for n in [e.name, *e.aliases]:
                out[n] = values[e.name]
        for n, t in self._layout.passthrough.items():
            t = t.detach().to("cpu", copy=True)
            out[n] = t.float() if t.is_floating_point() else t
        return {n: out[n] for n in self._layout.names}

    @contextlib.contextmanager
    def swapped(self, model: nn.Module, name: str):
        """Puts the average ``name`` into ``model``'s parameters in place (same storage, so a
        compiled model sees it) and restores the exact previous values on exit, also when the
        body raises. Sharded: every rank must enter it."""
        values = self._local_values(name)
        self._strategy.before_swap(model)
        entries = self._layout.all_entries
        targets = self._layout.resolve(model, entries)
        backups = []
        try:
            with torch.no_grad():
                for e, t in zip(entries, targets):
                    t = local_tensor(t)  # FSDP2: this rank's shard
                    backups.append((t, t.detach().to("cpu", copy=True)))
                    if e.name in values:
                        t.copy_(values[e.name])
            self._strategy.after_write(self._layout, targets)
            yield model
        finally:
            with torch.no_grad():
                for t, saved in backups:
                    t.copy_(saved)
            self._strategy.after_restore(model)

    # ---- introspection and persistence -----------------------------------------------------------
    def stats(self) -> Dict[str, float]:
        """Counters and timings: snapshots taken / applied / skipped / coalesced / dropped, bytes
        copied, copy, update, fence-wait and busy-wait seconds, lag, staging and host sizes."""
        eng, sched = self._engine, self._schedule
        s, in_flight = eng.stats()
        applied_step = int(s.get("last_applied_step", 0))
        return {
            "step": sched.step, **sched.counts,
            "snapshots_applied": int(s.get("snapshots_applied", 0)),
            "snapshots_dropped_nonfinite": int(s.get("snapshots_dropped_nonfinite", 0)),
            "in_flight": in_flight,
            "lag_steps": sched.step - applied_step if applied_step else 0,
            "bytes_copied": int(s.get("bytes_copied", 0)),
            **{k: s.get(k, 0.0) for k in ("copy_seconds", "update_seconds", "fence_wait_seconds")},
            "busy_wait_seconds": sched.busy_wait_seconds,
            "lag_seconds_last": s.get("lag_seconds_last", 0.0),
            "lag_seconds_max": s.get("lag_seconds_max", 0.0),
            "snapshot_bytes": self._layout.nbytes,
            "staging_bytes": eng.staging_nbytes, "pinned_bytes": eng.pinned_nbytes,
            "staging_buffers": eng.n_staging, "chunks_per_snapshot": eng.chunks_per_snapshot,
            "host_bytes": eng.host_bytes(), **self._writer.stats(),
            "rank": self._strategy.rank, "world": self._strategy.world,
            "averaged_tensors": len(self._layout.entries),
            "device": str(self._layout.device), "kernels": ops.backend(),
        }

    def state_dict(self) -> dict:
        """Everything needed to resume exactly (step counter, schedules, EMA accumulators, LAWA
        ring and its order). Flushes first; tensors are copies."""
        self.flush()
        return resume.export(self._schedule, self._engine, self._layout, self._strategy)

    def load_state_dict(self, state: dict) -> None:
        """Restores :meth:`state_dict` output into an Averager built for the same model and
        averages (the same rank, sharded). Raises ValueError naming what does not match."""
        self.flush()
        resume.restore(state, self._schedule, self._engine, self._layout, self._strategy)

    def __repr__(self) -> str:
        avgs = ", ".join(f"{n}={spec}" for n, spec in self._schedule.specs.items())
        return (f"Averager({avgs}, step={self._schedule.step}, device={self._layout.device}, "
                f"on_busy={self.on_busy!r})")
