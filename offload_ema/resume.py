"""An Averager's state for exact resume: the schedule's counters (training thread) and the
engine's averages (read while the worker is idle), with the checks that refuse another model,
other averages or another rank."""
from __future__ import annotations

import os

from offload_ema._version import __version__

FORMAT = 1


def load_file(path) -> dict:
    """An Averager state written with ``torch.save(avg.state_dict(), path)``, read without
    running code from the file (``weights_only=True``: tensors, numbers, strings, lists, dicts).
    Raises ValueError naming ``path`` for a file that is not such a state (a pickle asking for
    anything else, a damaged or truncated file)."""
    import torch

    path = os.fspath(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # UnpicklingError, RuntimeError (zip), EOFError, ...
        import pickle
        why = ("it holds objects other than tensors, numbers, strings, lists and dicts (a "
               "pickle that could run code: refused, nothing in it ran)"
               if isinstance(exc, pickle.UnpicklingError) else
               f"damaged or not a torch.save file ({type(exc).__name__})")
        raise ValueError(f"{path}: not an offload_ema Averager state file: {why}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path}: not an offload_ema Averager state_dict (format {FORMAT})")
    return state


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
    """Checks ``state`` against this Averager, then restores it (nothing changes on a mismatch)."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"state is not an offload_ema Averager state_dict (format {FORMAT})")
    saved_world, saved_rank = state.get("world", 1), state.get("rank", 0)
    if (saved_world, saved_rank) != (strategy.world, strategy.rank):
        raise ValueError(
            f"state was saved by rank {saved_rank} of {saved_world}; this Averager is rank "
            f"{strategy.rank} of {strategy.world}. Resume at the same world size, each rank with "
            "its own state (averages are sharded across ranks)")
    saved = [tuple(x[:1]) + (tuple(x[1]),) + tuple(x[2:]) for x in state["layout"]]
    mine = layout.signature()
    if saved != mine:
        diff = next(((a, b) for a, b in zip(saved, mine) if a != b), None)
        raise ValueError("state was saved for a different model: "
                         + (f"saved {diff[0]}, this model has {diff[1]}" if diff else
                            f"saved {len(saved)} averaged tensors, this model has {len(mine)}"))
    if set(state["averages"]) != set(schedule.specs):
        raise ValueError(f"state holds averages {sorted(state['averages'])}, this Averager has "
                         f"{sorted(schedule.specs)}")
    for name, d in state["averages"].items():
        mine_cfg = schedule.specs[name].config()
        if d["config"] != mine_cfg:
            raise ValueError(f"average {name!r} was saved as {d['config']}, this Averager has "
                             f"{mine_cfg}")
    for name, d in state["averages"].items():
        schedule.load(name, d)
        engine.import_state(name, d)
    schedule.step = int(state["step"])
    schedule.counts = dict(state.get("counts", schedule.counts))
    schedule.published = schedule.snapshot()
    if schedule.step:
        engine.set_last_applied_step(max((d["last_step"] for d in state["averages"].values()),
                                         default=0))


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
