"""The public entry point: ``Averager`` keeps EMA / LAWA averages of a model in host memory."""
from __future__ import annotations

import atexit
import contextlib
import copy
import time
import weakref
from typing import Dict, Iterator, Mapping, Optional, Union

import torch
from torch import nn

from offload_ema import ops
from offload_ema._version import __version__
from offload_ema.averages import EMA, LAWA
from offload_ema.engine import _BUSY_POLICIES, AverageState, Engine, Job
from offload_ema.layout import Layout

__all__ = ["Averager"]

_STATE_FORMAT = 1
_open_averagers: "weakref.WeakSet[Averager]" = weakref.WeakSet()


@atexit.register
def _close_open_averagers():
    # Drain and stop workers before the interpreter tears torch down under them.
    for avg in list(_open_averagers):
        try:
            avg.close()
        except Exception as exc:  # the process is exiting: report, never raise
            print(f"offload_ema: error while closing an Averager at exit: {exc!r}")


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
                 buffers: str = "copy", num_threads: Optional[int] = None):
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
        if on_busy not in _BUSY_POLICIES:
            raise ValueError(f"on_busy must be one of {', '.join(_BUSY_POLICIES)}, got {on_busy!r}")
        if num_threads is not None:
            ops.set_num_threads(num_threads)
        self._layout = Layout(model, buffers=buffers)
        if not self._layout.entries:
            raise ValueError("model has no trainable floating-point parameters to average")
        self.on_busy = on_busy
        self._states: Dict[str, AverageState] = {
            name: AverageState(name, spec, self._layout) for name, spec in averages.items()}
        self._engine = Engine(self._layout, staging_bytes)
        self._step = 0
        self._counts = {"snapshots_taken": 0, "snapshots_skipped": 0, "snapshots_coalesced": 0}
        self._busy_wait = 0.0
        self._hooks = []
        self._closed = False
        _open_averagers.add(self)

    # ---- taking snapshots -----------------------------------------------------------------
    def attach(self, optimizer: torch.optim.Optimizer) -> "Averager":
        """Takes snapshots after every ``optimizer.step()`` and fences the copy before the next.

        Steps skipped by the optimizer (e.g. by ``GradScaler`` on inf/NaN gradients) are not
        counted."""
        self._check_open()
        if self._hooks:
            raise RuntimeError("this Averager is already attached to an optimizer")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        self._hooks = [
            optimizer.register_step_pre_hook(lambda *_: self.fence()),
            optimizer.register_step_post_hook(lambda *_: self.step(fence=False)),
        ]
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
        self._check_open()
        self._raise_worker_error()
        self._step += 1
        s = self._step
        due = [st for st in self._states.values() if st.spec.is_due(s)]
        if due:
            self._take(s, due)
        if fence:
            self.fence()

    def fence(self) -> None:
        """Orders the last snapshot's copy before any later change of the parameters."""
        self._engine.fence()

    def _take(self, step: int, due) -> None:
        eng = self._engine
        for e in self._layout.entries:
            if e.tensor.shape != e.shape:
                self._layout.check_unchanged()  # raises with the name and both shapes
        if eng.busy():
            if self.on_busy == "skip":
                self._counts["snapshots_skipped"] += 1
                return
            if self.on_busy == "coalesce":
                for st in due:
                    st.pending += 1
                self._counts["snapshots_coalesced"] += 1
                return
            t0 = time.perf_counter()
            eng.wait_capacity()
            self._busy_wait += time.perf_counter() - t0
            self._raise_worker_error()
        emas, lawas = [], []
        for st in due:
            if isinstance(st.spec, EMA):
                periods, st.pending = 1 + st.pending, 0
                emas.append((st, None if st.scheduled == 0 else st.spec.weight(periods)))
            else:
                st.pending = 0
                lawas.append((st, st.next_pos))
                st.next_pos = (st.next_pos + 1) % st.spec.window
            st.scheduled += 1
        self._counts["snapshots_taken"] += 1
        eng.submit(Job(step, emas, lawas))

    # ---- waiting, errors, shutdown ------------------------------------------------------------
    def flush(self) -> None:
        """Waits until every snapshot taken so far is applied; re-raises a worker error."""
        self._check_open()
        self._engine.flush()
        self._raise_worker_error()

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
        self._engine.close()
        if not self._engine.error_reported:
            self._raise_worker_error()

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

    # ---- reading the averages ---------------------------------------------------------------
    @property
    def names(self):
        return list(self._states)

    @property
    def step_count(self) -> int:
        return self._step

    def _state(self, name: str) -> AverageState:
        if name not in self._states:
            raise ValueError(f"no average named {name!r}; this Averager has: "
                             f"{', '.join(self._states)}")
        st = self._states[name]
        if st.applied == 0:
            raise RuntimeError(f"average {name!r} has no snapshot yet (first due after step "
                               f"{st.spec.start + st.spec.every}, now at step {self._step})")
        return st

    def _entry_values(self, st: AverageState) -> Iterator:
        """(entry, float32 CPU tensor of its average); LAWA means computed on the fly."""
        if isinstance(st.spec, EMA):
            for e in self._layout.entries:
                yield e, st.acc[e.group][e.offset:e.offset + e.numel].view(e.shape)
        else:
            slots = [st.slots[pos] for pos in st.order]
            for e in self._layout.entries:
                out = torch.empty(e.shape, dtype=torch.float32)
                ops.mean_(out.view(-1),
                          [s[e.group][e.offset:e.offset + e.numel] for s in slots])
                yield e, out

    def averaged_state_dict(self, name: str) -> Dict[str, torch.Tensor]:
        """The average ``name`` as ``{state_dict name: CPU tensor}``: float32 for averaged and
        other floating-point entries, the own dtype for integer buffers. Tensors are copies."""
        self.flush()
        st = self._state(name)
        self._layout.check_unchanged()
        out: Dict[str, torch.Tensor] = {}
        for e, value in self._entry_values(st):
            t = value.clone() if isinstance(st.spec, EMA) else value
            out[e.name] = t
            for alias in e.aliases:
                out[alias] = t
        for pname, t in self._layout.passthrough.items():
            t = t.detach().to("cpu", copy=True)
            out[pname] = t.float() if t.is_floating_point() else t
        return {n: out[n] for n in self._layout.names}

    @contextlib.contextmanager
    def swapped(self, model: nn.Module, name: str):
        """Puts the average ``name`` into ``model``'s parameters in place (same storage, so a
        compiled model sees it) and restores the exact previous values on exit, also when the
        body raises. Flushes first."""
        self.flush()
        st = self._state(name)
        targets = self._layout.resolve(model)
        backups = []
        try:
            with torch.no_grad():
                for (e, value), t in zip(self._entry_values(st), targets):
                    backups.append((t, t.detach().to("cpu", copy=True)))
                    t.copy_(value)
            yield model
        finally:
            with torch.no_grad():
                for t, saved in backups:
                    t.copy_(saved)

    # ---- introspection and persistence -----------------------------------------------------------
    def stats(self) -> Dict[str, float]:
        """Counters and timings: snapshots taken / applied / skipped / coalesced, bytes copied,
        copy, update, fence-wait and busy-wait seconds, lag, staging sizes."""
        eng = self._engine
        with eng.cond:
            s = dict(eng.stats)
            in_flight = eng.in_flight
        applied_step = int(s.pop("last_applied_step", 0))
        return {
            "step": self._step,
            **self._counts,
            "snapshots_applied": int(s.get("snapshots_applied", 0)),
            "in_flight": in_flight,
            "lag_steps": self._step - applied_step if applied_step else 0,
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
            "staging_slots": len(eng.slots),
            "chunks_per_snapshot": len(eng.chunks),
            "device": str(self._layout.device),
            "kernels": ops.backend(),
        }

    def state_dict(self) -> dict:
        """Everything needed to resume exactly: step counter, schedules' progress, EMA
        accumulators, LAWA slots and their order. Flushes first; tensors are copies."""
        self.flush()
        averages = {}
        for name, st in self._states.items():
            d = {"config": st.spec.config(), "scheduled": st.scheduled, "pending": st.pending,
                 "applied": st.applied, "last_step": st.last_step}
            if isinstance(st.spec, EMA):
                d["acc"] = [a.clone() for a in st.acc]
            else:
                d["slots"] = {pos: [t.clone() for t in st.slots[pos]] for pos in st.order}
                d["order"] = list(st.order)
                d["next_pos"] = st.next_pos
            averages[name] = d
        return {"format": _STATE_FORMAT, "version": __version__, "step": self._step,
                "layout": self._layout.signature(), "averages": averages,
                "counts": dict(self._counts)}

    def load_state_dict(self, state: dict) -> None:
        """Restores :meth:`state_dict` output into an Averager built for the same model and
        averages. Raises ValueError naming what does not match."""
        self.flush()
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise ValueError("state is not an offload_ema Averager state_dict (format "
                             f"{_STATE_FORMAT})")
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
            st.scheduled, st.pending = d["scheduled"], d["pending"]
            st.applied, st.last_step = d["applied"], d["last_step"]
            if isinstance(st.spec, EMA):
                for a, saved in zip(st.acc, d["acc"]):
                    a.copy_(saved)
            else:
                st.slots = [None] * st.spec.window
                st.order.clear()
                for pos in d["order"]:
                    for t, saved in zip(st.slot(pos), d["slots"][pos]):
                        t.copy_(saved)
                    st.order.append(pos)
                st.next_pos = d["next_pos"]
        self._step = int(state["step"])
        self._counts = dict(state.get("counts", self._counts))
        if self._step:
            with self._engine.cond:
                self._engine.stats["last_applied_step"] = max(
                    (st.last_step for st in self._states.values()), default=0)

    def __repr__(self) -> str:
        avgs = ", ".join(f"{n}={st.spec}" for n, st in self._states.items())
        return (f"Averager({avgs}, step={self._step}, device={self._layout.device}, "
                f"on_busy={self.on_busy!r})")
