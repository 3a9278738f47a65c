"""An Averager's state for exact resume: the schedule's counters (training thread) and the
engine's averages (read while the worker is idle), with the checks that refuse another model,
other averages or another rank."""
from __future__ import annotations

import os
from typing import Optional

from offload_ema._version import __version__

FORMAT = 1


def load_plain(path, what: str):
    """``torch.load(path, weights_only=True, mmap=True)``: tensors, numbers, strings, lists and
    dicts, and nothing in the file runs; any failure is a ValueError naming ``path`` as not
    ``what``. (mmap: tensors are read from the file as used, so a size claimed in a damaged or
    crafted file is never allocated; the file bounds every record.)"""
    import torch

    path = os.fspath(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # UnpicklingError, RuntimeError (zip), EOFError, ...
        import pickle
        why = ("it holds objects other than tensors, numbers, strings, lists and dicts (a "
               "pickle that could run code: refused, nothing in it ran)"
               if isinstance(exc, pickle.UnpicklingError) else
               f"damaged or not a torch.save file ({type(exc).__name__})")
        raise ValueError(f"{path}: not {what}: {why}") from None


def load_file(path) -> dict:
    """An Averager state written with ``torch.save(avg.state_dict(), path)``, read without
    running code from the file (:func:`load_plain`). Raises ValueError naming ``path`` for a
    file that is not such a state (a pickle asking for anything else, a damaged or truncated
    file)."""
    state = load_plain(path, "an offload_ema Averager state file")
    if is_global(state) or is_rank_keyed(state):  # state_dict()'s (checked when loaded)
        return state
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{os.fspath(path)}: not an offload_ema Averager state_dict "
                         f"(format {FORMAT})")
    return state


def load_into(averager, path) -> None:
    """``averager.load_state_dict`` of the state file at ``path`` (:func:`load_file`): any
    refusal is a ValueError naming the file, and the Averager is unchanged."""
    state = load_file(path)
    try:
        averager.load_state_dict(state)
    except ValueError as exc:
        raise ValueError(f"{os.fspath(path)}: {exc}") from None


def export(schedule, engine, layout, strategy, live: bool) -> dict:
    """``live`` (the training thread, worker flushed): the state now. Otherwise (any other
    thread): read on the worker, with the schedule as of the last applied snapshot."""
    if live:
        return _export(schedule.snapshot(), schedule.specs, engine, layout, strategy)
    return engine.read(lambda: _export(engine.applied_schedule or schedule.initial,
                                       schedule.specs, engine, layout, strategy))


def _export(schedule_state, specs, engine, layout, strategy) -> dict:
    """``schedule_state``: a ``Schedule.snapshot()`` consistent with the engine's averages."""
    averages = {name: {"config": spec.config(),
                       "scheduled": schedule_state["scheduled"][name],
                       "pending": schedule_state["coalesced"][name],
                       **engine.export_state(name)}
                for name, spec in specs.items()}
    return {"format": FORMAT, "version": __version__, "step": schedule_state["step"],
            "layout": layout.signature(), "averages": averages,
            "counts": dict(schedule_state["counts"]), "rank": strategy.rank,
            "world": strategy.world}


def restore(state: dict, schedule, engine, layout, strategy) -> None:
    """Checks ``state`` against this Averager, then restores it (nothing changes on a mismatch:
    every field is checked, types, ranges and tensor shapes included, before the first is
    written; a damaged or crafted state is a ValueError, never a half-restored Averager)."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"state is not an offload_ema Averager state_dict (format {FORMAT})")
    saved_world, saved_rank = state.get("world", 1), state.get("rank", 0)
    if (saved_world, saved_rank) != (strategy.world, strategy.rank):
        raise ValueError(
            f"state was saved by rank {saved_rank} of {saved_world}; this Averager is rank "
            f"{strategy.rank} of {strategy.world}. Resume at the same world size, each rank with "
            "its own state (averages are sharded across ranks)")
    try:
        saved = [tuple(x[:1]) + (tuple(x[1]),) + tuple(x[2:]) for x in state["layout"]]
    except (KeyError, TypeError, IndexError):
        raise ValueError("state's 'layout' is missing or not a list of [name, shape, dtype]"
                         ) from None
    mine = layout.signature()
    if saved != mine:
        diff = next(((a, b) for a, b in zip(saved, mine) if a != b), None)
        raise ValueError("state was saved for a different model: "
                         + (f"saved {diff[0]}, this model has {diff[1]}" if diff else
                            f"saved {len(saved)} averaged tensors, this model has {len(mine)}"))
    averages = state.get("averages")
    if not isinstance(averages, dict) or set(averages) != set(schedule.specs):
        held = sorted(map(str, averages)) if isinstance(averages, dict) else averages
        raise ValueError(f"state holds averages {held}, this Averager has "
                         f"{sorted(schedule.specs)}")
    for name, d in averages.items():
        mine_cfg = schedule.specs[name].config()
        if not isinstance(d, dict) or d.get("config") != mine_cfg:
            saved_cfg = d.get("config") if isinstance(d, dict) else d
            raise ValueError(f"average {name!r} was saved as {saved_cfg}, this Averager has "
                             f"{mine_cfg}")
        _check_average(name, d, schedule.specs[name], layout)
    step = _count(state.get("step"), "step")
    counts = state.get("counts", schedule.counts)
    if not isinstance(counts, dict) or set(counts) != set(schedule.counts):
        raise ValueError(f"state's 'counts' must hold {sorted(schedule.counts)}, got {counts!r}")
    counts = {k: _count(v, f"counts[{k!r}]") for k, v in counts.items()}
    for name, d in averages.items():
        schedule.load(name, d)
        engine.import_state(name, d)
    schedule.step = step
    schedule.counts = counts
    schedule.published = schedule.snapshot()
    if schedule.step:
        engine.set_last_applied_step(max((d["last_step"] for d in averages.values()),
                                         default=0))


def _count(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"state's {what} must be an int >= 0, got {value!r}")
    return value


def _check_tensors(ts, what: str, layout, dtype=None) -> None:
    """``ts``: one flat CPU tensor per group of ``layout``, of its size (and ``dtype``, or the
    group's staging dtype)."""
    import torch

    groups = layout.groups
    if not isinstance(ts, (list, tuple)) or len(ts) != len(groups):
        raise ValueError(f"state's {what} must be a list of {len(groups)} tensors, got "
                         f"{type(ts).__name__}{f' of {len(ts)}' if hasattr(ts, '__len__') else ''}")
    for i, (t, g) in enumerate(zip(ts, groups)):
        want = dtype or g.dtype
        if not isinstance(t, torch.Tensor) or t.dtype != want or tuple(t.shape) != (g.numel,):
            got = (f"{t.dtype} of shape {list(t.shape)}" if isinstance(t, torch.Tensor) else
                   type(t).__name__)
            raise ValueError(f"state's {what}[{i}] must be a {want} tensor of shape "
                             f"[{g.numel}], got {got}")


def _check_average(name: str, d: dict, spec, layout) -> None:
    import torch

    from offload_ema.averages import Decaying

    for key in ("scheduled", "pending", "applied", "last_step"):
        _count(d.get(key), f"averages[{name!r}][{key!r}]")
    if "periods" in d:
        _count(d["periods"], f"averages[{name!r}]['periods']")
    if isinstance(spec, Decaying):
        _check_tensors(d.get("acc"), f"averages[{name!r}]['acc']", layout, torch.float32)
        return
    window = spec.window
    order, slots, next_pos = d.get("order"), d.get("slots"), d.get("next_pos")
    if not isinstance(order, list) or len(order) > window or len(set(order)) != len(order) or \
            not all(isinstance(p, int) and not isinstance(p, bool) and 0 <= p < window
                    for p in order):
        raise ValueError(f"state's averages[{name!r}]['order'] must list distinct ring entries "
                         f"in [0, {window}), got {order!r}")
    if not isinstance(slots, dict) or set(slots) != set(order):
        raise ValueError(f"state's averages[{name!r}]['slots'] must hold exactly the entries "
                         f"of 'order' {order}")
    for pos in order:
        _check_tensors(slots[pos], f"averages[{name!r}]['slots'][{pos}]", layout)
    if isinstance(next_pos, bool) or not isinstance(next_pos, int) or not 0 <= next_pos < window:
        raise ValueError(f"state's averages[{name!r}]['next_pos'] must be an int in "
                         f"[0, {window}), got {next_pos!r}")


def seeded(state: dict, layout, name: str, values, applied: int, step: int) -> dict:
    """``state`` (a fresh Averager's over ``layout``, with a decaying average ``name``) with
    that average set to ``values`` (entry name -> tensor) as its value after ``applied``
    snapshots, at step ``step``: how an average stored elsewhere (diffusers' shadow parameters)
    continues."""
    import copy

    state = copy.copy(state)
    d = dict(state["averages"][name])
    acc = [t.clone() for t in d["acc"]]
    for e in layout.entries:  # where each entry sits in its group's accumulator
        acc[e.group][e.offset:e.offset + e.numel].copy_(values[e.name].reshape(-1))
    d.update(acc=acc, applied=applied, periods=applied, last_step=step, scheduled=applied,
             pending=0)
    state["averages"] = dict(state["averages"], **{name: d})
    state["step"] = step
    state["counts"] = dict(state["counts"], snapshots_taken=applied)
    return state


# ---- the global state: state_dict() for torch.distributed.checkpoint -------------------------
#
# ``Averager.state_dict()`` names every tensor by its global identity, so that DCP saves each
# rank's share (no gather) and loads it resharded at another world size or parallelism:
#   "offload_ema"                      uint8 tensor: JSON (format, step, counts, each average's
#                                      config and counters), zero-padded to META_BYTES
#   "<average>/<entry>"                an EMA's accumulator of that tensor (float32)
#   "<average>/slot<k>/<entry>"        a LAWA ring's k-th oldest slot (the tensor's staging
#                                      dtype), k < window; slots not yet filled are zeros
# An entry is the whole tensor (one process; DDP: on its owner rank only), or a DTensor of this
# rank's shard (FSDP2, on the Averager's CPU mesh, with the parameter's placements). Nothing is a
# pickled object: DCP loads non-tensor values with a pickle load.

GLOBAL = 2
META_KEY = "offload_ema"
META_BYTES = 1 << 16


def _meta_tensor(meta: dict):
    import json

    import torch

    raw = json.dumps(meta, sort_keys=True).encode()
    if len(raw) > META_BYTES:
        raise ValueError(f"the Averager's state metadata takes {len(raw)} bytes, more than "
                         f"{META_BYTES}")
    out = torch.zeros(META_BYTES, dtype=torch.uint8)
    out[:len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return out


def read_meta(t) -> dict:
    import json

    import torch

    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or tuple(t.shape) != (
            META_BYTES,):
        raise ValueError(f"state's {META_KEY!r} must be a uint8 tensor of {META_BYTES} bytes")
    raw = bytes(t.numpy().tobytes()).rstrip(b"\0")
    try:
        meta = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"state's {META_KEY!r} is not the Averager's metadata (damaged?)"
                         ) from None
    if not isinstance(meta, dict) or meta.get("format") != GLOBAL:
        raise ValueError(f"state's {META_KEY!r} is not an offload_ema Averager state "
                         f"(format {GLOBAL})")
    return meta


def is_global(state) -> bool:
    return isinstance(state, dict) and META_KEY in state


_RANK_KEY = META_KEY + "/rank{}-of-{}"


def rank_keyed(rank_state: dict, strategy) -> dict:
    """A rank's state under a key of its own (DCP saves every rank's; no two ranks' collide)."""
    return {_RANK_KEY.format(strategy.rank, strategy.world): rank_state}


def is_rank_keyed(state) -> bool:
    return isinstance(state, dict) and any(
        isinstance(k, str) and k.startswith(META_KEY + "/rank") for k in state)


def rank_unkeyed(state: dict, strategy) -> dict:
    mine = _RANK_KEY.format(strategy.rank, strategy.world)
    if mine not in state:
        held = sorted(k for k in state if isinstance(k, str) and k.startswith(META_KEY))
        raise ValueError(f"state holds {held}, this Averager is rank {strategy.rank} of "
                         f"{strategy.world}: ZeRO-3 averages resume at the same world size "
                         "(their partitions are not mapped to global tensors yet)")
    return state[mine]


def named(rank_state: dict, specs, layout, strategy) -> dict:
    """``state_dict()``: this rank's state under global names (:func:`to_global`), or where the
    strategy has none (ZeRO-3) under a key naming its rank and world (:func:`rank_keyed`)."""
    if not strategy.global_state:
        return rank_keyed(rank_state, strategy)
    return to_global(rank_state, specs, layout, strategy)


def unnamed(state, specs, layout, strategy):
    """``load_state_dict()``'s input as this rank's state for :func:`restore`: a global state
    (:func:`from_global`), a rank-keyed one (:func:`rank_unkeyed`), or a rank's own as is."""
    if is_global(state):
        return from_global(state, specs, layout, strategy)
    if is_rank_keyed(state):
        return rank_unkeyed(state, strategy)
    return state


def to_global(rank_state: dict, specs, layout, strategy) -> dict:
    """This rank's state (:func:`export`, copies) under global names (see above)."""
    import torch

    from offload_ema.averages import Decaying

    meta = {"format": GLOBAL, "version": __version__, "step": rank_state["step"],
            "counts": rank_state["counts"], "averages": {}}
    out = {}

    def put(key, e, flat):
        t = flat[e.offset:e.offset + e.numel].view(e.shape)
        out[key] = strategy.global_tensor(e, t)

    for name, d in rank_state["averages"].items():
        m = {k: d[k] for k in ("config", "scheduled", "pending", "applied", "last_step",
                               "periods") if k in d}
        if isinstance(specs[name], Decaying):
            for e in layout.entries:
                put(f"{name}/{e.name}", e, d["acc"][e.group])
        else:
            order = d["order"]
            m["filled"] = len(order)
            for k in range(specs[name].window):
                group_tensors = (d["slots"][order[k]] if k < len(order) else
                                 [torch.zeros(g.numel, dtype=g.dtype) for g in layout.groups])
                for e in layout.entries:
                    put(f"{name}/slot{k}/{e.name}", e, group_tensors[e.group])
        meta["averages"][name] = m
    out[META_KEY] = _meta_tensor(meta)
    return out


def from_global(state: dict, specs, layout, strategy) -> dict:
    """A :func:`to_global` state (filled by DCP at any world size, or loaded whole) as this
    rank's state for :func:`restore`: every tensor this rank averages must be in it."""
    import torch

    from offload_ema.averages import Decaying

    meta = read_meta(state[META_KEY])
    averages = meta.get("averages")
    if not isinstance(averages, dict) or set(averages) != set(specs):
        held = sorted(map(str, averages)) if isinstance(averages, dict) else averages
        raise ValueError(f"state holds averages {held}, this Averager has {sorted(specs)}")

    def flat(key_of, dtype_of):
        out = [torch.zeros(g.numel, dtype=dtype_of(g)) for g in layout.groups]
        for e in layout.entries:
            key = key_of(e)
            if key not in state:
                raise ValueError(f"state has no {key!r}: it was saved for a different model "
                                 "(or without this rank's tensors)")
            t = state[key]
            t = t.to_local() if hasattr(t, "to_local") else t
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(e.shape):
                got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"state's {key!r} is {got}, this rank's part of it is "
                                 f"{list(e.shape)}: saved for a different model")
            if t.dtype != out[e.group].dtype:
                raise ValueError(f"state's {key!r} must be {out[e.group].dtype}, got {t.dtype}")
            out[e.group][e.offset:e.offset + e.numel].copy_(t.reshape(-1))
        return out

    rank_averages = {}
    for name, m in averages.items():
        if not isinstance(m, dict):
            raise ValueError(f"state's averages[{name!r}] must be a dict")
        d = {k: m.get(k) for k in ("config", "scheduled", "pending", "applied", "last_step")}
        if "periods" in m:
            d["periods"] = m["periods"]
        spec = specs[name]
        if isinstance(spec, Decaying):
            d["acc"] = flat(lambda e: f"{name}/{e.name}", lambda g: torch.float32)
        else:
            filled = m.get("filled")
            if isinstance(filled, bool) or not isinstance(filled, int) or \
                    not 0 <= filled <= spec.window:
                raise ValueError(f"state's averages[{name!r}]['filled'] must be an int in "
                                 f"[0, {spec.window}], got {filled!r}")
            d["order"] = list(range(filled))
            d["slots"] = {k: flat(lambda e, k=k: f"{name}/slot{k}/{e.name}", lambda g: g.dtype)
                          for k in range(filled)}
            d["next_pos"] = filled % spec.window
        rank_averages[name] = d
    return {"format": FORMAT, "version": meta.get("version"), "step": meta.get("step"),
            "layout": layout.signature(), "averages": rank_averages,
            "counts": meta.get("counts"), "rank": strategy.rank, "world": strategy.world}


def merge_global(states: list) -> dict:
    """Several ranks' :func:`to_global` states of one save (DDP: each holds the tensors its
    rank averaged) as one, which loads at any world size."""
    import torch

    if not states or not all(is_global(s) for s in states):
        raise ValueError("only states of Averager.state_dict() (global names) can be merged")
    first = states[0][META_KEY]
    if any(not torch.equal(s[META_KEY], first) for s in states[1:]):
        raise ValueError("the ranks' states differ in step, counters or averages: not one save")
    merged: dict = {}
    for s in states:
        merged.update(s)
    return merged


def averager_key(keys, key: Optional[str] = None) -> str:
    """The entry of a checkpoint (DCP's flattened ``keys``) that holds an Averager's state:
    ``key``, or the only one."""
    found = sorted(k[:-len(META_KEY)].rstrip(".") for k in keys
                   if k == META_KEY or k.endswith("." + META_KEY))
    if key is None and len(found) == 1:
        key = found[0]
    if key is None or key not in found:
        raise ValueError(f"the checkpoint holds Averager states under {found or 'no key'}"
                         + (f", not {key!r}" if key is not None else ": give one with --key"))
    return key


def averages_from_checkpoint(tensors: dict, key: Optional[str] = None):
    """The averages of an Averager saved in a torch.distributed.checkpoint (``tensors``: the
    checkpoint's tensors, whole, as :func:`offload_ema.snapshots.read_dcp_tensors` gives them),
    as ``{average: (metadata, {parameter: float32 tensor})}``: an EMA's accumulators, a LAWA's
    mean of its filled slots (as ``averaged_state_dict`` computes it). ``key``: the entry the
    Averager was saved under (``"averager"``); needed only where the checkpoint holds several."""
    import torch

    from offload_ema import ops

    key = averager_key(tensors, key)
    prefix = f"{key}." if key else ""
    meta = read_meta(tensors[prefix + META_KEY])
    out = {}
    for name, m in meta["averages"].items():
        if "filled" not in m:  # an EMA: its accumulators
            head = f"{prefix}{name}/"
            values = {k[len(head):]: t.float() for k, t in tensors.items()
                      if k.startswith(head) and "/" not in k[len(head):]}
        else:
            slots = [f"{prefix}{name}/slot{k}/" for k in range(m["filled"])]
            values = {}
            for k in (k for k in tensors if slots and k.startswith(slots[0])):
                entry = k[len(slots[0]):]
                t = torch.empty(tensors[k].shape, dtype=torch.float32)
                ops.mean_(t.view(-1), [tensors[s + entry].reshape(-1) for s in slots])
                values[entry] = t
        out[name] = (dict(m, step=meta["step"]), values)
    return out
