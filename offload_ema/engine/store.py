"""The averages' host memory: EMA accumulators and LAWA rings, the arithmetic that applies
snapshots to them, and the reads and state export / import.

Owned by the worker thread: it alone applies snapshots (``update``, ``fold``, ``count``). Other
threads read (``values``, ``copies``, ``export_state``) only through the engine's ``read``,
which runs them on the worker between two snapshots; ``import_state`` runs while the worker is
idle (after a flush). ``nbytes`` (the LAWA ring's fill) is read under the worker's lock, which
``count`` holds while it changes the ring.
"""
from __future__ import annotations

import collections
from typing import Deque, Dict, Iterator, List, Mapping, Optional, Tuple

import torch

from offload_ema import ops
from offload_ema.averages import Decaying
from offload_ema.layout import Entry, Layout


class AverageBuffers:
    """One average's host memory and the counters that go with it."""

    def __init__(self, spec, layout: Layout):
        self.spec = spec
        self.applied = 0     # snapshots applied
        self.periods = 0     # due periods they stood for (accumulators; > applied if coalesced)
        self.last_step = 0   # step of the last applied snapshot
        self._layout = layout
        if isinstance(spec, Decaying):
            self.acc = [torch.zeros(g.numel, dtype=torch.float32) for g in layout.groups]
        else:
            # The LAWA ring: ``window`` entries, allocated as the window fills. The worker picks
            # the entry to overwrite when it applies a snapshot (the oldest once full), so a
            # dropped snapshot (non-finite gradients) leaves no hole or stale entry in the mean.
            self.ring: List[Optional[List[torch.Tensor]]] = [None] * spec.window
            self.order: Deque[int] = collections.deque(maxlen=spec.window)  # oldest first
            self.next_pos = 0

    def ring_entry(self, pos: int) -> List[torch.Tensor]:
        if self.ring[pos] is None:
            self.ring[pos] = [torch.empty(g.numel, dtype=g.dtype) for g in self._layout.groups]
        return self.ring[pos]

    def nbytes(self) -> int:
        """Host bytes held (the ring's fill changes under the worker's lock: read under it)."""
        if isinstance(self.spec, Decaying):
            return sum(a.numel() * 4 for a in self.acc)
        entry = sum(g.numel * torch.empty((), dtype=g.dtype).element_size()
                    for g in self._layout.groups)
        return len(self.order) * entry


class AverageStore:
    """Every average of an Averager, by name (see the module doc for who may call what)."""

    def __init__(self, specs: Mapping[str, object], layout: Layout):
        self.layout = layout
        self.averages: Dict[str, AverageBuffers] = {
            n: AverageBuffers(spec, layout) for n, spec in specs.items()}

    def __getitem__(self, name: str) -> AverageBuffers:
        return self.averages[name]

    # ---- applying snapshots (the worker) -------------------------------------------------------
    @staticmethod
    def choose_entries(job) -> None:
        """The ring entry each LAWA fed by ``job`` fills: the oldest once full."""
        for b in job.lawas:
            job.lawa_pos[id(b)] = b.next_pos

    @staticmethod
    def update(job, segments) -> None:
        """Applies ``job`` (weights set, ring entries chosen) from ``segments``: (group, lo,
        hi, source), elements [lo, hi) of a group, read from staging or in place."""
        for g, lo, hi, src in segments:
            accs, weights = [], []
            for (b, _), w in zip(job.emas, job.weights):
                acc = b.acc[g][lo:hi]
                if b.applied == 0:
                    acc.copy_(src)  # the first applied snapshot initialises the EMA exactly
                else:
                    accs.append(acc)
                    weights.append(w)
            if accs:
                ops.ema_update_multi_(accs, src, weights)
            for b in job.lawas:
                b.ring_entry(job.lawa_pos[id(b)])[g][lo:hi].copy_(src)

    @staticmethod
    def fold(live, segments) -> None:
        """Applies staged snapshots ``live`` (in order, none dropped; ``segments[k]`` the
        staging views of ``live[k]``, the same ranges for all) with the results of applying
        them one by one: per accumulator its updates in one pass over memory
        (``ops.ema_fold_multi_`` applies them in order per element: the same roundings)."""
        # Per accumulator: the snapshot that initialises it (its first applied one, copied),
        # then the snapshots folded in with their weights, each from the periods applied
        # before it. Accumulators fed by the same snapshots share one pass.
        per_acc: Dict[int, list] = {}
        for k, job in enumerate(live):
            for b, p in job.emas:
                a = per_acc.setdefault(id(b), [b, None, [], [], b.periods])
                if b.applied == 0 and a[1] is None:
                    a[1] = k
                else:
                    a[2].append(k)
                    a[3].append(b.spec.weight(a[4], p))
                a[4] += p
        groups: Dict[Tuple[Optional[int], Tuple[int, ...]], list] = {}
        for b, init, ks, weights, _ in per_acc.values():
            groups.setdefault((init, tuple(ks)), []).append((b, weights))
        for (init, ks), members in groups.items():
            for i, (g, lo, hi, _) in enumerate(segments[0] if segments else []):
                accs = [b.acc[g][lo:hi] for b, _ in members]
                if init is not None:
                    for acc in accs:
                        acc.copy_(segments[init][i][3])
                if ks:
                    ops.ema_fold_multi_(accs, [segments[k][i][3] for k in ks],
                                        [w for _, w in members])

    @staticmethod
    def fill_ring(job, segments) -> None:
        """A folded snapshot's LAWA entries (the entry it fills: the oldest once full)."""
        for b in job.lawas:
            job.lawa_pos[id(b)] = b.next_pos  # (count moves next_pos on)
            entry = b.ring_entry(b.next_pos)
            for g, lo, hi, src in segments:
                entry[g][lo:hi].copy_(src)

    @staticmethod
    def count(job) -> None:
        """``job`` applied: every average it fed moves on (under the worker's lock)."""
        for b, p in job.emas:
            b.periods += p
            b.applied += 1
            b.last_step = job.step
        for b in job.lawas:
            pos = job.lawa_pos[id(b)]
            b.order.append(pos)
            b.next_pos = (pos + 1) % b.spec.window
            b.applied += 1
            b.last_step = job.step

    # ---- reading (on the worker, or while it is idle) ------------------------------------------
    def applied(self, name: str) -> int:
        return self.averages[name].applied

    def values(self, name: str) -> Iterator[Tuple[Entry, torch.Tensor]]:
        """(entry, float32 CPU tensor of its average) for this rank's entries: EMA accumulators
        as views, LAWA means computed now."""
        b = self.averages[name]
        if isinstance(b.spec, Decaying):
            for e in self.layout.entries:
                yield e, b.acc[e.group][e.offset:e.offset + e.numel].view(e.shape)
        else:
            ring = [b.ring[pos] for pos in b.order]
            for e in self.layout.entries:
                out = torch.empty(e.shape, dtype=torch.float32)
                ops.mean_(out.view(-1), [r[e.group][e.offset:e.offset + e.numel] for r in ring])
                yield e, out

    def copies(self, name: str) -> Optional[Dict[str, torch.Tensor]]:
        """This rank's averaged entries as float32 tensors of their own (None before the first
        applied snapshot)."""
        if self.averages[name].applied == 0:
            return None
        copy = isinstance(self.averages[name].spec, Decaying)  # values are the accumulators
        return {e.name: (v.clone() if copy else v) for e, v in self.values(name)}

    def export_state(self, name: str) -> dict:
        """One average's state (copies), with the counters it goes with."""
        b = self.averages[name]
        d = {"applied": b.applied, "last_step": b.last_step, "periods": b.periods}
        if isinstance(b.spec, Decaying):
            d["acc"] = [a.clone() for a in b.acc]
        else:
            d["slots"] = {pos: [t.clone() for t in b.ring[pos]] for pos in b.order}
            d["order"] = list(b.order)
            d["next_pos"] = b.next_pos
        return d

    def import_state(self, name: str, d: dict) -> None:
        b = self.averages[name]
        b.applied, b.last_step = d["applied"], d["last_step"]
        b.periods = d.get("periods", b.applied)  # states saved before periods were counted
        if isinstance(b.spec, Decaying):
            for a, saved in zip(b.acc, d["acc"]):
                a.copy_(saved)
        else:
            b.ring = [None] * b.spec.window
            b.order.clear()
            for pos in d["order"]:
                for t, saved in zip(b.ring_entry(pos), d["slots"][pos]):
                    t.copy_(saved)
                b.order.append(pos)
            b.next_pos = d["next_pos"]

    def nbytes(self) -> int:
        return sum(b.nbytes() for b in self.averages.values())
