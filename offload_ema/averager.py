"""The public entry point: ``Averager`` keeps EMA / LAWA averages of a model in host memory.

A facade over parts with one job each: ``schedule.Schedule`` (what is due, busy policy, counts;
training thread), ``engine.Engine`` (staging, copies, fence, worker, the averages),
``sharding`` (local / DDP owner-sharded / FSDP2 local shards), ``writer.SnapshotWriter`` (files).
"""
from __future__ import annotations

import contextlib
import os
import threading
import weakref
from typing import Dict, Mapping, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from offload_ema import ops, resume, sharding
from offload_ema.averages import EMA, LAWA
from offload_ema.engine import Engine
from offload_ema.hooks import OptimizerHooks, close_at_exit, release, step_hooks
from offload_ema.layout import Layout, normalise_name, unwrap_model
from offload_ema.schedule import Schedule
from offload_ema.snapshots import SnapshotFuture
from offload_ema.writer import SnapshotWriter

__all__ = ["Averager"]

class Averager:
    """Weight averages of ``model``, kept in host memory and updated asynchronously.

    Trainable floating-point parameters (and floating-point buffers with ``buffers="average"``)
    are snapshotted at each step where an average is due; one snapshot feeds every average due.

    Args:
        model (nn.Module): the model under training, on one device (CPU or one GPU). Wrappers
            from ``torch.compile`` and DDP are looked through; names are those of the unwrapped
            model's ``state_dict()``.
        averages (Mapping[str, EMA | LAWA]): the averages to keep, by name.
        on_busy (str, default "block"): a due step while the worker is busy: ``"block"`` waits
            (exact), ``"skip"`` drops the snapshot, ``"coalesce"`` drops it and gives the next
            snapshot the elapsed-steps decay ``beta ** periods``; counted in :meth:`stats`.
        staging_bytes (int, optional): pinned host staging budget; default two snapshots
            (``2 * fold`` with ``fold``). Less than one: snapshots move in chunks and the fence
            waits (``fence_wait_seconds``).
        fold (int or "auto", default 1): staged snapshots applied per pass over the
            accumulators, with the same bits as one by one: the worker holds up to ``fold``
            (1 to 16; staging for at least ``fold + 1`` whole snapshots) and moves 2 + 8/fold
            bytes per parameter and step instead of 10 (bf16, one EMA). Every read (state dicts, swaps,
            saves, ``flush``) applies what is held first. ``"auto"`` holds nothing while the
            worker keeps up and folds a backlog of up to every staged snapshot (default staging
            eight snapshots); on a CPU-only model it is 1 (the fence lets no backlog form).
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
    """

    def __init__(self, model: nn.Module, averages: Mapping[str, Union[EMA, LAWA]], *,
                 on_busy: str = "block", staging_bytes: Optional[int] = None,
                 buffers: str = "copy", num_threads: Optional[int] = None,
                 shard: Optional[bool] = None, process_group=None,
                 fold: Union[int, str] = 1):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self._schedule = Schedule(averages, on_busy)  # checks the averages and on_busy
        if num_threads is not None:
            ops.set_num_threads(num_threads)
        self._strategy = sharding.choose(model, shard, process_group)
        self._layout = Layout(model, buffers=buffers, rank=self._strategy.rank,
                              world=self._strategy.world)
        if not self._layout.all_entries:
            raise ValueError("model has no trainable floating-point parameters to average")
        self._engine = Engine(self._layout, averages, staging_bytes, fold)
        self._writer = SnapshotWriter(self._engine, self._layout, self._strategy)
        self._hooks: Optional[OptimizerHooks] = None
        self._model = weakref.ref(model)  # as given (a compiled / DDP wrapper: its forward hook)
        self._closed = False
        self._training_thread = threading.get_ident()
        # Dropped without close(): its threads stop and its staging is freed when it is
        # garbage-collected (neither the worker nor the writer refers to this object).
        self._finalizer = weakref.finalize(self, release, self._engine, self._writer)
        self._finalizer.atexit = False  # at exit, close_at_exit closes it and reports errors
        close_at_exit(self)

    @property
    def on_busy(self) -> str:
        return self._schedule.on_busy

    # ---- taking snapshots -----------------------------------------------------------------
    def attach(self, *optimizers) -> "Averager":
        """Takes a snapshot once every given optimizer has stepped (several optimizers over one
        model, e.g. Muon + AdamW, count as one step), and fences the copy before the next step
        of any of them. A step that ``GradScaler`` skips is not averaged (plain optimizers: not
        counted; fused ones: counted, snapshot dropped as ``snapshots_dropped_nonfinite``).
        DeepSpeed: pass the engine (``avg.attach(engine)``); a snapshot follows each real
        optimizer step (gradient-accumulation boundaries), none after an fp16 overflow.

        Several optimizers: when GradScaler skips some of them (their own gradients were not
        finite) but not all, the step still counts; its snapshot (what the others wrote) is
        taken when the next step begins (the next optimizer step, or a forward of the model
        given to the Averager, comes first), or at ``flush`` / a read on this thread.

        Raises:
            ValueError / RuntimeError: an optimizer updates tensors that are not the averaged
                parameters (the model was moved, converted, sharded or re-created after the
                Averager was built), or some averaged parameter is updated by none of them.
        """
        self._check_open()
        if self._hooks is not None:
            raise RuntimeError("this Averager is already attached; detach() first, then attach "
                               "every optimizer in one call")
        self._hooks = step_hooks(self, optimizers, self._layout, self._model())
        return self

    def detach(self) -> None:
        """Removes the hooks installed by :meth:`attach` (after fencing the last copy)."""
        self.fence()
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None

    def step(self, *, fence: bool = True) -> None:
        """Counts one optimizer step and takes a snapshot if an average is due. With
        ``fence=False`` the copy overlaps with what follows, and :meth:`fence` must be called
        before the parameters change in place (``attach`` does this for you). If handing the
        snapshot over fails (e.g. out of memory), the error is raised and the step not counted."""
        self._step(fence, None)

    def _step(self, fence: bool, found_inf: Optional[torch.Tensor]) -> None:
        self._check_open()
        self._training_thread = threading.get_ident()  # state_dict() there reads the live state
        self._engine.check_not_capturing()
        self._engine.raise_error()
        s = self._schedule.advance(self._engine, found_inf)  # O(1) in the tensor count
        if fence:
            self.fence()
        self._writer.save_due(s, self._schedule)  # save_every's files
        self._raise_save_error()  # last: the step is counted even when a write failed earlier

    def fence(self) -> None:
        """Orders the last snapshot's copy before any later change of the parameters."""
        self._engine.check_not_capturing()
        self._engine.fence()

    # ---- waiting, errors, shutdown ------------------------------------------------------------
    def flush(self) -> None:
        """Waits until every snapshot taken so far is applied; re-raises a worker error."""
        self._check_open()
        self._settle_step()
        self._engine.flush()
        self._engine.raise_error()
        self._raise_save_error()

    def close(self) -> None:
        """Applies what is in flight, writes pending saves, stops the threads and removes the
        hooks. Idempotent. Re-raises a worker or save error not reported yet."""
        if self._closed:
            return
        with contextlib.suppress(Exception):  # (an error of the worker's: raised below)
            self._settle_step()
        self._closed = True
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None
        if self._finalizer.detach() is not None:  # not already run by garbage collection
            release(self._engine, self._writer, dropped=False)
        self._strategy.close()
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

    def _settle_step(self) -> None:
        """On the training thread: a training step whose snapshot waits for the next step to
        begin (some of several optimizers skipped by GradScaler) is taken now."""
        if self._hooks is not None and threading.get_ident() == self._training_thread:
            self._hooks.settle()

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
        """Writes the average ``name`` at this step to ``path`` in the background (sharded:
        per-rank files plus an index); ``dtype`` of the averaged tensors in the file;
        ``format="dcp"`` under FSDP2 writes a torch.distributed.checkpoint directory.

        Returns:
            SnapshotFuture: ``result()`` is the path once written, or raises the write's error
            (which the next ``step`` / ``flush`` also raises if nobody looked at it).
        """
        self._check_open()
        self._schedule.check_name(name)
        self._settle_step()
        if not self._schedule.scheduled[name]:
            self._schedule.raise_no_snapshot(name)
        return self._writer.save(name, self._schedule.specs[name], path, self._schedule.step,
                                 dtype=dtype, format=format)

    def save_pretrained(self, out_dir: str, name: str, *, model=None) -> SnapshotFuture:
        """Writes the average ``name`` as a model directory that the model class's
        ``from_pretrained`` loads (transformers ``PreTrainedModel``, diffusers ``ModelMixin``):
        the model's config and safetensors weights in the model's dtypes, tied weights as the
        model ties them. The copy is taken now (sharded: gathered to rank 0, a collective every
        rank must call; only rank 0 writes), the directory is written in the background.

        Args:
            out_dir: the directory to write (replaced once the new one is complete).
            name: the average.
            model: the model whose config and class describe the weights (default: the model
                this Averager was built on).

        Returns:
            SnapshotFuture: ``result()`` is the directory once written.
        """
        from offload_ema.writer import pretrained_kind

        self._check_open()
        self._schedule.check_name(name)
        target = unwrap_model(model if model is not None else self._layout.model)
        if getattr(target, "hf_quantizer", None) is not None:
            # transformers would write the live (quantized) weights instead of the state given.
            raise TypeError(f"save_pretrained cannot write the average of a quantized model "
                            f"({type(target).__name__}); use avg.save(path, {name!r})")
        if pretrained_kind(target) is None:
            raise TypeError(
                f"save_pretrained needs a model with save_pretrained() and a config (a "
                f"transformers PreTrainedModel or a diffusers ModelMixin); "
                f"{type(target).__name__} has not: use avg.save(path, {name!r}) for a "
                "snapshot file, or avg.averaged_state_dict() with your own saving")
        if not self._schedule.scheduled[name]:
            self._schedule.raise_no_snapshot(name)
        dtypes = {normalise_name(k): v.dtype for k, v in target.state_dict().items()}
        sharded = self._strategy.world > 1
        values = self.averaged_state_dict(name, rank=0 if sharded else None)
        # One writer per directory: rank 0 (sharded, it has the gathered average; replicated
        # under torch.distributed, every rank has the same one).
        global_rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if global_rank != 0 or (sharded and self._strategy.rank != 0):
            done = SnapshotFuture(os.path.abspath(os.fspath(out_dir)))
            done.set_running_or_notify_cancel()
            done.set_result(done.path)
            return done
        return self._writer.save_pretrained(out_dir, target, values, dtypes)

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
            self._schedule.check_name(n)
        self._writer.save_every(every, path_template, names, keep_last, dtype)

    # ---- reading the averages ---------------------------------------------------------------
    @property
    def names(self):
        return list(self._schedule.specs)

    @property
    def step_count(self) -> int:
        return self._schedule.published["step"]

    def ready(self, name: str) -> bool:
        """Whether the average ``name`` has a snapshot (taken, maybe not applied yet): whether
        ``swapped`` / ``averaged_state_dict`` / ``save`` can be used for it."""
        self._schedule.check_name(name)
        return self._schedule.published["scheduled"][name] > 0

    def _local_values(self, name: str) -> Dict[str, torch.Tensor]:
        """This rank's averaged entries as float32 CPU tensors of their own, taken on the worker
        once every snapshot taken so far is applied (consistent from any thread)."""
        self._check_open()
        self._schedule.check_name(name)
        self._layout.check_unchanged()
        self._settle_step()
        values = self._engine.read(lambda: self._engine.copies(name))
        self._engine.raise_error()
        self._raise_save_error()
        if values is None:
            self._schedule.raise_no_snapshot(name)
        return values

    def averaged_state_dict(self, name: str, *, rank: Optional[int] = None
                            ) -> Dict[str, torch.Tensor]:
        """The average ``name`` as ``{state_dict name: CPU tensor}``: float32 for averaged and
        other floating-point entries, the own dtype for integer buffers. Tensors are copies.

        Sharded (torch.distributed): every rank must call it; the full tensors are gathered on
        every rank, or with ``rank=k`` on rank ``k`` only (the others get ``{}``)."""
        values = self._strategy.gather(self._layout, self._local_values(name), rank)
        return {} if values is None else self._layout.full_state_dict(values)

    @contextlib.contextmanager
    def swapped(self, model: nn.Module, name: str):
        """Puts the average ``name`` into ``model``'s parameters in place (same storage, so a
        compiled model sees it) and restores the exact previous values on exit, also when the
        body raises. Sharded: every rank must enter it."""
        with self._strategy.swapped(model, self._layout, self._local_values(name)):
            yield model

    def _put(self, model: nn.Module, name: str) -> None:
        """Writes the average ``name`` into ``model``'s averaged tensors for good (``swapped``
        without the restore; sharded: every rank). For integrations that end on an average."""
        self._strategy.put(model, self._layout, self._local_values(name))

    # ---- introspection and persistence -----------------------------------------------------------
    def stats(self) -> Dict[str, float]:
        """Counters and timings: snapshots taken / applied / skipped / coalesced / dropped, bytes
        copied, copy, update, fence-wait and busy-wait seconds, lag, staging and host sizes,
        folding (``fold``, ``folds``: passes, ``snapshots_folded``; ``in_flight`` counts held
        snapshots)."""
        engine = self._engine.report()  # first: then nothing it counts is newer than the schedule
        sched = self._schedule.published
        applied_step = engine.pop("last_applied_step")
        return {"step": sched["step"], **sched["counts"],
                "busy_wait_seconds": sched["busy_wait_seconds"],
                "lag_steps": sched["step"] - applied_step if applied_step else 0,
                **engine, **self._writer.stats(),
                "rank": self._strategy.rank, "world": self._strategy.world,
                "kernels": ops.backend()}

    def state_dict(self) -> dict:
        """Everything needed to resume exactly (step counter, schedules, EMA accumulators, LAWA
        rings in order), each tensor under its global name: ``"<average>/<parameter>"`` (a LAWA
        slot: ``"<average>/slot<k>/<parameter>"``), whole, or a DTensor of this rank's shard
        under FSDP2, plus the metadata as one uint8 tensor (``"offload_ema"``); tensors are
        copies. So the Averager is a ``torch.distributed.checkpoint`` Stateful: ``dcp.save({...,
        "averager": avg})`` writes each rank's share, and ``dcp.load`` into an Averager built
        for the same model and averages fills it at any world size or parallelism (one process,
        DDP, FSDP2). ``torch.save`` of it works too (plain tensors but for FSDP2's DTensors).
        ZeRO-3 partitions are not mapped to global tensors yet: there it is this rank's state
        under a key naming the rank and the world size, resumed at the same world size.
        On the training thread: the state now (flushes first). From another thread: the state
        as of the last applied snapshot."""
        return resume.named(self._rank_state_dict(), self._schedule.specs, self._layout,
                            self._strategy)

    def _rank_state_dict(self) -> dict:
        """This rank's state as flat buffers (resume format 1): what the integrations save per
        rank and load at the same world size."""
        on_training_thread = threading.get_ident() == self._training_thread
        if on_training_thread:
            self.flush()
        self._check_open()
        return resume.export(self._schedule, self._engine, self._layout, self._strategy,
                             live=on_training_thread)

    def load_state_dict(self, state: dict) -> None:
        """Restores a :meth:`state_dict` (saved at any world size and parallelism, filled by
        ``dcp.load`` or loaded whole) or a rank's state of :meth:`_rank_state_dict` (the same
        rank) into an Averager built for the same model and averages. Raises ValueError naming
        what does not match; nothing changes then."""
        self.flush()
        state = resume.unnamed(state, self._schedule.specs, self._layout, self._strategy)
        resume.restore(state, self._schedule, self._engine, self._layout, self._strategy)

    def __repr__(self) -> str:
        avgs = ", ".join(f"{n}={spec}" for n, spec in self._schedule.specs.items())
        fold = f", fold={self._engine.fold}" if self._engine.fold > 1 else ""
        return (f"Averager({avgs}, step={self._schedule.step}, device={self._layout.device}, "
                f"on_busy={self.on_busy!r}{fold})")
