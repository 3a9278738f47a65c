"""What is due at each step, what a busy worker means (the busy policy), the weight of each
snapshot, and the counts. Owned by the training thread; other threads read only ``published``,
an immutable copy replaced (one assignment) after every step.
"""
from __future__ import annotations

import time
from types import MappingProxyType
from typing import Dict, List, Mapping, Optional

import torch

from offload_ema.averages import LAWA, Decaying

BUSY_POLICIES = ("block", "skip", "coalesce")


class Schedule:
    """The training thread's side of the averages: the step counter, for each average the
    snapshots handed to the engine (``scheduled``) and the due snapshots merged into the next
    one (``coalesced``, EMAs under ``on_busy="coalesce"``), and the counters of :meth:`stats`."""

    def __init__(self, specs: Mapping[str, object], on_busy: str):
        if not isinstance(specs, Mapping) or not specs:
            raise ValueError("averages must be a non-empty mapping of name -> EMA, PowerEMA, SWA "
                             "or LAWA, got "
                             f"{specs!r}")
        for name, spec in specs.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"average names must be non-empty strings, got {name!r}")
            if not isinstance(spec, (Decaying, LAWA)):
                raise TypeError(f"averages[{name!r}] must be an EMA, PowerEMA, SWA or LAWA, got "
                                f"{type(spec).__name__}")
        if on_busy not in BUSY_POLICIES:
            raise ValueError(f"on_busy must be one of {', '.join(BUSY_POLICIES)}, got {on_busy!r}")
        self.specs = dict(specs)
        self.on_busy = on_busy
        self.step = 0
        self.scheduled: Dict[str, int] = {n: 0 for n in self.specs}
        self.coalesced: Dict[str, int] = {n: 0 for n in self.specs}
        self.counts = {"snapshots_taken": 0, "snapshots_skipped": 0, "snapshots_coalesced": 0}
        self.busy_wait_seconds = 0.0
        self.published = self.initial = self.snapshot()

    def snapshot(self):
        """An immutable copy of the state: what other threads may read."""
        return MappingProxyType({"step": self.step, "scheduled": dict(self.scheduled),
                                 "coalesced": dict(self.coalesced), "counts": dict(self.counts),
                                 "busy_wait_seconds": self.busy_wait_seconds})

    def checkpoint(self):
        return (self.step, dict(self.scheduled), dict(self.coalesced), dict(self.counts),
                self.busy_wait_seconds)

    def restore(self, saved, step: int, due: List[str], queued: bool) -> None:
        """After an interrupted step: back to ``saved``, then, if the step's job reached the
        engine (``queued``), the step counted and its snapshot committed, as if uninterrupted."""
        self.step, self.scheduled, self.coalesced, self.counts, self.busy_wait_seconds = saved
        if queued:
            self._commit(due)
            self.step = step
        self.published = self.snapshot()

    def check_name(self, name: str) -> None:
        if name not in self.specs:
            raise ValueError(f"no average named {name!r}; this Averager has: "
                             f"{', '.join(self.specs)}")

    def raise_no_snapshot(self, name: str) -> None:
        spec = self.specs[name]
        raise RuntimeError(f"average {name!r} has no snapshot yet (first due after step "
                           f"{spec.start + spec.every}, now at step {self.step})")

    def advance(self, engine, found_inf: Optional[torch.Tensor]) -> int:
        """Counts a step and hands its snapshot to ``engine`` if an average is due; returns the
        step. On any exception (an interrupt, a failed submit) the snapshot is taken in whole or
        not at all (then the step is not counted), and the exception goes on."""
        s = self.step + 1
        due = self.due(s)
        saved = self.checkpoint()
        try:
            if due:  # model changes are checked on the worker, not here
                self.take(engine, s, due, found_inf)
            self.step = s
            self.published = self.snapshot()
        except BaseException:
            self.restore(saved, s, due, queued=bool(due) and engine.recover(s))
            raise
        return s

    def due(self, step: int) -> List[str]:
        return [n for n, spec in self.specs.items() if spec.is_due(step)]

    def take(self, engine, step: int, due: List[str], found_inf: Optional[torch.Tensor]) -> None:
        """Hands the snapshot of ``step`` to ``engine`` for the averages ``due``, or applies the
        busy policy. If the engine refuses the job (raises), nothing here has changed."""
        if engine.busy():
            if self.on_busy == "skip":
                self.counts["snapshots_skipped"] += 1
                return
            if self.on_busy == "coalesce":
                for n in due:
                    self.coalesced[n] += 1
                self.counts["snapshots_coalesced"] += 1
                return
            t0 = time.perf_counter()
            engine.wait_capacity()
            self.busy_wait_seconds += time.perf_counter() - t0
            engine.raise_error()
        # Each accumulator's share: the periods this snapshot stands for (its weight is computed
        # by the worker, from the periods it has applied).
        emas = [(n, 1 + self.coalesced[n]) for n in due if isinstance(self.specs[n], Decaying)]
        lawas = [n for n in due if not isinstance(self.specs[n], Decaying)]
        # The state once the engine holds the job: what a read consistent with it reports.
        after = MappingProxyType({
            "step": step, "scheduled": {n: v + (n in due) for n, v in self.scheduled.items()},
            "coalesced": {n: 0 if n in due else v for n, v in self.coalesced.items()},
            "counts": dict(self.counts, snapshots_taken=self.counts["snapshots_taken"] + 1),
            "busy_wait_seconds": self.busy_wait_seconds})
        engine.submit(step, emas, lawas, found_inf, schedule=after)
        self._commit(due)  # only once the engine holds the job

    def _commit(self, due: List[str]) -> None:
        for n in due:
            self.coalesced[n] = 0
            self.scheduled[n] += 1
        self.counts["snapshots_taken"] += 1

    def load(self, name: str, d: dict) -> None:
        self.scheduled[name], self.coalesced[name] = d["scheduled"], d["pending"]
