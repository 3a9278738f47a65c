"""Which tensors of a model are averaged, under which names, and where each lives in the flat
host buffers.

Averaged tensors are grouped by staging dtype; each group is one flat index space, so a snapshot
of a group lands in one contiguous piece of staging memory and is averaged by one kernel call per
piece, whatever the number of tensors. A snapshot is cut into chunks that each fit one staging
slot; when a slot holds the whole model there is exactly one chunk.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

# Kernel source dtypes are stored as they are; other float dtypes (float64, float8) are converted
# to float32 on their way into staging.
_STAGED_AS_IS = (torch.float32, torch.bfloat16, torch.float16)
# Byte alignment of every piece inside a staging slot (one cache line, any vector width).
ALIGN = 64


try:  # public from torch 2.5; torch 2.4 has it under _tensor
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - depends on the torch version
    try:
        from torch.distributed._tensor import DTensor
    except ImportError:
        DTensor = None


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def is_zero3(t) -> bool:
    """A DeepSpeed ZeRO-3 parameter: an empty placeholder outside forward and backward; this
    rank's partition of it (a flat slice, padded at the end) is ``t.ds_tensor``."""
    return getattr(t, "ds_tensor", None) is not None and hasattr(t, "ds_status")


def is_sharded(t) -> bool:
    """Whether each rank holds its own part of ``t`` (FSDP2 DTensor, ZeRO-3 partition)."""
    return is_dtensor(t) or is_zero3(t)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The rank-local part of an FSDP2 (DTensor) parameter or the partition of a ZeRO-3 one, in
    place; other tensors as they are."""
    if DTensor is not None and isinstance(t, DTensor):
        return t.to_local()
    if is_zero3(t):
        return t.ds_tensor
    return t


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module whose state_dict names the user means: torch.compile's ``_orig_mod`` and the
    ``module`` of DistributedDataParallel / DataParallel / a DeepSpeed engine are looked
    through."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or \
                is_deepspeed_engine(model):
            model = model.module
            continue
        return model


def is_deepspeed_engine(obj) -> bool:
    """A DeepSpeed engine (``deepspeed.initialize``'s first result), without importing it."""
    return any(c.__name__ == "DeepSpeedEngine" and c.__module__.startswith("deepspeed.")
               for c in type(obj).__mro__)


def normalise_name(name: str) -> str:
    """Drops ``_orig_mod`` segments left by compiled submodules."""
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def staged_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in _STAGED_AS_IS else torch.float32


@dataclass
class Entry:
    """One averaged tensor (a parameter, or a float buffer with buffers="average")."""
    name: str
    aliases: List[str]
    tensor: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    group: int
    offset: int  # first element in its group
    # The storage a snapshot reads: bound once, when the Averager is built (a detached alias of
    # the tensor). A snapshot then never depends on when its copy is issued: a parameter given
    # new storage between the step and the copy (``p.data = ...``) cannot leak into that
    # step's snapshot, and the old storage stays alive while a deferred copy reads it.
    # check_model() refuses to go on once the model's tensor no longer uses it. None for
    # FSDP2 / ZeRO-3 parts: FSDP2 may re-pad a local shard at its first forward, so those are
    # resolved at each copy.
    source: Optional[torch.Tensor] = None

    @property
    def numel(self) -> int:
        return self.shape.numel()


@dataclass
class Group:
    dtype: torch.dtype  # staging / LAWA slot dtype
    is_buffer: bool = False  # module buffers: copied at once (the next forward changes them)
    numel: int = 0
    entries: List[Entry] = field(default_factory=list)


@dataclass
class Part:
    """Elements [start, end) of one entry, at element ``dst`` of its piece."""
    entry: Entry
    start: int
    end: int
    dst: int

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.end == self.entry.numel


@dataclass
class Piece:
    """Elements [start, end) of one group, stored at byte ``byte_offset`` of a staging slot."""
    group: int
    start: int
    end: int
    byte_offset: int
    parts: List[Part]


@dataclass
class Chunk:
    pieces: List[Piece]
    nbytes: int


class Layout:
    """The averaged entries of a model, their groups, and the chunk plan for a slot size.

    Args:
        model: the model (compiled / DDP wrappers are looked through).
        buffers: ``"copy"`` (buffers are reported with their current value) or ``"average"``
            (floating-point buffers are averaged like parameters).
    """

    def __init__(self, model: nn.Module, buffers: str = "copy", rank: int = 0, world: int = 1):
        if buffers not in ("copy", "average"):
            raise ValueError(f"buffers must be 'copy' or 'average', got {buffers!r}")
        self.model = unwrap_model(model)
        state = self.model.state_dict(keep_vars=True)
        param_ids = {id(p) for p in self.model.parameters()}
        self.names: List[str] = []                         # every state_dict name, in order
        self.all_entries: List[Entry] = []                 # every averaged tensor, any owner
        self.passthrough: Dict[str, torch.Tensor] = {}     # name -> live tensor (not averaged)
        self.frozen: set = set()  # names in passthrough that are (frozen) parameters
        by_id: Dict[int, Entry] = {}
        buffer_ids = set()
        for raw_name, t in state.items():
            name = normalise_name(raw_name)
            self.names.append(name)
            is_param = id(t) in param_ids
            averaged = t.is_floating_point() and (
                (is_param and t.requires_grad) or (not is_param and buffers == "average"))
            if not averaged:
                self.passthrough[name] = t
                if is_param:
                    self.frozen.add(name)
                continue
            if id(t) in by_id:  # tied / shared: averaged once, reported under every name
                by_id[id(t)].aliases.append(name)
                continue
            lt = local_tensor(t)  # FSDP2: this rank averages its own shard of the tensor
            e = Entry(name, [], t, lt.shape, lt.dtype, -1, 0,
                      None if is_sharded(t) else t.detach())
            if not is_param:
                buffer_ids.add(id(t))
            by_id[id(t)] = e
            self.all_entries.append(e)
        # FSDP2 (DTensor parameters), ZeRO-3: every rank averages its local part of every
        # tensor.
        # Replicated parameters (DDP): each tensor is averaged whole by one owner rank.
        self.sharded_tensors = any(is_sharded(e.tensor) for e in self.all_entries)
        self.owner: Dict[str, int] = ({e.name: rank for e in self.all_entries}
                                      if self.sharded_tensors else
                                      shard_owners(self.all_entries, world))
        # This rank's entries, grouped by staging dtype (module buffers apart: copied at once).
        self.entries: List[Entry] = []
        groups: Dict[Tuple[torch.dtype, bool], Group] = {}
        for e in self.all_entries:
            if self.owner[e.name] != rank:
                continue
            key = (staged_dtype(e.dtype), id(e.tensor) in buffer_ids)
            g = groups.setdefault(key, Group(*key))
            e.group, e.offset = list(groups).index(key), g.numel
            g.numel += e.numel
            g.entries.append(e)
            self.entries.append(e)
        self.groups: List[Group] = list(groups.values())
        devices = sorted({str(local_tensor(e.tensor).device) for e in self.all_entries})
        if len(devices) > 1:
            raise ValueError(
                f"model has averaged tensors on several devices ({', '.join(devices)}); an "
                "Averager handles one device: build one per device, or under torch.distributed "
                "one per rank")
        self.device = torch.device(devices[0]) if devices else torch.device("cpu")
        # Where each averaged tensor hangs in the module tree, and how many tensors each module
        # holds: check_model() compares these with the model as it is now.
        averaged = {id(e.tensor): e for e in self.all_entries}
        self._homes = []
        self._counts = []
        for mod_name, module in self.model.named_modules():
            self._counts.append((mod_name, module, len(module._parameters), len(module._buffers),
                                 len(module._modules)))
            for kind in ("_parameters", "_buffers"):
                for attr, t in getattr(module, kind).items():
                    if t is not None and id(t) in averaged and self.owner.get(
                            averaged[id(t)].name) == rank:
                        self._homes.append((module, kind, attr, t,
                                            normalise_name(f"{mod_name}.{attr}".lstrip("."))))
        if self.device.type == "meta":
            raise ValueError("model parameters are on the meta device; materialise them first")

    @property
    def nbytes(self) -> int:
        """Staging bytes of one whole snapshot of the parameters (pieces aligned as in a slot)."""
        return sum(_aligned(g.numel * _itemsize(g.dtype)) for g in self.groups if not g.is_buffer)

    @property
    def buffers_nbytes(self) -> int:
        """Staging bytes of the averaged module buffers of one snapshot."""
        return sum(_aligned(g.numel * _itemsize(g.dtype)) for g in self.groups if g.is_buffer)

    def signature(self) -> List[Tuple[str, Tuple[int, ...], str]]:
        return [(e.name, tuple(e.shape), str(e.dtype)) for e in self.entries]

    def plan(self, slot_bytes: int, buffers: bool = False) -> List[Chunk]:
        """Cuts the parameter groups (or, with ``buffers``, the module buffer groups) of one
        snapshot into chunks of at most ``slot_bytes`` staging bytes each."""
        chunks: List[Chunk] = []
        pieces: List[Piece] = []
        used = filled = 0  # next aligned piece offset / end of the last piece, in bytes
        for gi, g in enumerate(self.groups):
            if g.is_buffer != buffers:
                continue
            size = _itemsize(g.dtype)
            start = 0
            while start < g.numel:
                room = (slot_bytes - used) // size if used <= slot_bytes else 0
                if room < 1 or (used and room * size < ALIGN):
                    chunks.append(Chunk(pieces, filled))
                    pieces, used, filled = [], 0, 0
                    continue
                end = min(g.numel, start + room)
                pieces.append(Piece(gi, start, end, used, _parts(g, start, end)))
                filled = used + (end - start) * size
                used = _aligned(filled)
                start = end
        if pieces:
            chunks.append(Chunk(pieces, filled))
        return chunks

    def check_shapes(self, during_copy: bool = False) -> None:
        """Raises if an averaged tensor changed shape (an in-place reshape, ``.data = ...``);
        ``during_copy``: the change met a snapshot's copy still running."""
        for e in self.entries:
            if local_tensor(e.tensor).shape != e.shape:
                when = ("while its snapshot was being copied" if during_copy else
                        "after the Averager was built")
                raise RuntimeError(
                    f"parameter {e.name!r} changed shape from {list(e.shape)} to "
                    f"{list(local_tensor(e.tensor).shape)} {when}; build a new Averager for the "
                    "new model. (A change while a snapshot is being copied, without avg.fence() "
                    "first, also breaks that snapshot: attach() fences before each optimizer "
                    "step; call fence() yourself before other in-place changes.)")

    def check_unchanged(self) -> None:
        """Raises if averaged tensors changed shape or device, or the model now holds other
        tensors under their names."""
        self.check_shapes()
        for e in self.all_entries:
            t = local_tensor(e.tensor)
            if t.device != self.device or t.dtype != e.dtype:
                raise RuntimeError(
                    f"parameter {e.name!r} is {t.dtype} on {t.device}, but was {e.dtype} on "
                    f"{self.device} when the Averager was built (model.to() / .cuda() / .half() "
                    "after building it?); build the Averager after moving or converting the model")
        self.check_model()

    def check_model(self) -> None:
        """Raises if the model no longer holds the averaged tensors as built: a parameter
        replaced by another object, one frozen (``requires_grad=False``), or a parameter, buffer
        or submodule added or removed, or a shape changed. Cheap (no state_dict): safe on the
        worker every snapshot."""
        self.check_shapes()
        for module, kind, attr, t, name in self._homes:
            now = getattr(module, kind).get(attr)
            if now is not t and is_dtensor(t) and now is not None and now.shape == t.shape:
                # FSDP2 registers the gathered parameter between a forward and reshard: a plain
                # tensor, or under FSDP2 x tensor parallel a DTensor of the TP mesh alone.
                continue
            if now is not t:
                raise RuntimeError(
                    f"parameter {name!r} was replaced by another tensor after the Averager was "
                    "built (the old one would go on being averaged): build a new Averager for the "
                    "changed model, or change values in place (after avg.fence())")
            if kind == "_parameters" and not t.requires_grad:
                raise RuntimeError(
                    f"parameter {name!r} was frozen (requires_grad=False) after the Averager was "
                    "built: frozen parameters are not averaged; build a new Averager after "
                    "freezing")
        for e in self.entries:  # (after the replaced ones: those have a message of their own)
            if e.source is not None and (e.tensor.dtype != e.dtype or
                                         e.tensor.data_ptr() != e.source.data_ptr()):
                self._raise_storage_changed(e)
        for mod_name, module, n_params, n_buffers, n_modules in self._counts:
            if (len(module._parameters), len(module._buffers), len(module._modules)) != (
                    n_params, n_buffers, n_modules):
                raise RuntimeError(
                    f"module {mod_name or '<root>'!r} gained or lost parameters, buffers or "
                    "submodules after the Averager was built (they would be missing from the "
                    "averages): build a new Averager for the changed model")

    def _raise_storage_changed(self, e: Entry) -> None:
        t = e.tensor
        if t.dtype != e.dtype or t.device != self.device:
            raise RuntimeError(
                f"parameter {e.name!r} is now {t.dtype} on {t.device}, but was {e.dtype} on "
                f"{self.device} when the Averager was built (model.double() / .half() / .to() "
                "after building it?): build the Averager after moving or converting the model")
        raise RuntimeError(
            f"parameter {e.name!r} was given new storage after the Averager was built "
            "(`p.data = ...`, `model.to(...)`, `load_state_dict(..., assign=True)`); the "
            "averages would go on reading the old one. Build a new Averager for the changed "
            "model, or change values in place (`with torch.no_grad(): p.copy_(new)`, after "
            "avg.fence())")

    def check_optimizers(self, optimizers) -> None:
        """Raises unless the optimizers update exactly the averaged tensors' objects: an
        Averager built before ``fully_shard`` / ``to_empty`` / re-creating parameters, or for
        another model, would otherwise average tensors that training no longer changes."""
        self.check_unchanged()
        model_params = {id(p) for p in self.model.parameters()}
        updated = set()
        for i, opt in enumerate(optimizers):
            for group in opt.param_groups:
                for p in group["params"]:
                    if id(p) not in model_params:
                        raise ValueError(
                            f"optimizers[{i}] updates a tensor of shape {list(p.shape)} that is "
                            "not a parameter of the model this Averager was built for: build the "
                            "Averager from the model the optimizer trains, after every step that "
                            "replaces its parameters (fully_shard, to_empty, loading with "
                            "assign=True)")
                    updated.add(id(p))
        missed = [e.name for e in self.all_entries
                  if id(e.tensor) in model_params and id(e.tensor) not in updated]
        if missed:
            raise ValueError(
                f"averaged parameters {missed[:5]}{' ...' if len(missed) > 5 else ''} are updated "
                "by none of the optimizers given to attach(): pass every optimizer that updates "
                "the model in one call (attach(opt_a, opt_b)), or set requires_grad=False on "
                "parameters that are not trained")

    def full_state_dict(self, values: Dict[str, "torch.Tensor"]) -> Dict[str, "torch.Tensor"]:
        """Every state_dict name of the model: the averaged ``values`` (by entry name, under each
        alias too), the other entries as current float32 / own-dtype CPU copies."""
        out = {}
        for e in self.all_entries:
            for n in [e.name, *e.aliases]:
                out[n] = values[e.name]
        for n, t in self.passthrough.items():
            t = t.detach().to("cpu", copy=True)
            out[n] = t.float() if t.is_floating_point() else t
        return {n: out[n] for n in self.names}

    def resolve(self, model: nn.Module, entries: Optional[List[Entry]] = None) -> List[torch.Tensor]:
        """The live tensors of ``model`` (this model or a wrapper of it) for each entry (this
        rank's entries unless ``entries`` is given)."""
        entries = self.entries if entries is None else entries
        state = {normalise_name(k): v
                 for k, v in unwrap_model(model).state_dict(keep_vars=True).items()}
        missing = [e.name for e in entries if e.name not in state]
        if missing:
            raise ValueError(f"model has no tensors named {missing[:5]} (of {len(missing)} "
                             "averaged); pass the model this Averager was built for")
        out = []
        for e in entries:
            t = state[e.name]
            if local_tensor(t).shape != e.shape:
                raise ValueError(f"model tensor {e.name!r} has shape {list(t.shape)}, the "
                                 f"average has {list(e.shape)}")
            out.append(t)
        return out


def shard_owners(entries: List[Entry], world: int) -> Dict[str, int]:
    """Deterministic, byte-balanced assignment of whole tensors to ranks: largest first, each to
    the rank with the fewest bytes so far (lowest rank on ties). Every rank computes the same."""
    load = [0] * world
    owner = {}
    order = sorted(range(len(entries)),
                   key=lambda i: (-entries[i].numel * _itemsize(entries[i].dtype), i))
    for i in order:
        r = min(range(world), key=lambda k: (load[k], k))
        owner[entries[i].name] = r
        load[r] += entries[i].numel * _itemsize(entries[i].dtype)
    return owner


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _parts(g: Group, start: int, end: int) -> List[Part]:
    parts = []
    for e in g.entries:
        lo, hi = max(start, e.offset), min(end, e.offset + e.numel)
        if lo < hi:
            parts.append(Part(e, lo - e.offset, hi - e.offset, lo - start))
    return parts
