"""Where averages live across processes: one strategy object per Averager, chosen once.

- :class:`Local`: one process (or ``shard=False``): this process averages every tensor.
- :class:`OwnerSharded`: replicated parameters under torch.distributed (DDP): each rank averages a
  disjoint, byte-balanced share of whole tensors (``layout.shard_owners``), so host memory and
  transfers per rank are about 1/world of the model. Full tensors are put together over the
  process group only when asked for.
- :class:`FSDP2Shards`: DTensor parameters (``fully_shard``): each rank averages its local shards.
- :class:`ZeroShards`: DeepSpeed ZeRO-3 parameters: each rank averages its own partition of every
  parameter (``param.ds_tensor``, a flat slice), never the empty placeholder.

Each answers the same questions: which rank this is, how full tensors are gathered, how an
average is put into the live model and taken out again, which file holds what.
"""
from __future__ import annotations

import contextlib
import os
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from offload_ema.layout import (DTensor, Layout, is_dtensor, is_sharded, is_zero3, local_tensor,
                                unwrap_model)
from offload_ema.snapshots import shard_paths

__all__ = ["Local", "OwnerSharded", "FSDP2Shards", "ZeroShards", "choose"]


def choose(model: nn.Module, shard: Optional[bool], process_group=None):
    """The strategy for ``model``: FSDP2 shards when its parameters are DTensors; owner-sharded
    when torch.distributed runs with more than one process (or ``shard=True``); else local."""
    _refuse_fsdp1(model)
    initialised = dist.is_available() and dist.is_initialized()
    params = list(unwrap_model(model).parameters())
    if any(is_dtensor(p) for p in params):
        return FSDP2Shards(process_group)
    if any(is_zero3(p) for p in params):
        return ZeroShards(model, params, process_group)
    if shard is None:
        shard = initialised and dist.get_world_size(process_group) > 1
    if not shard:
        return Local()
    if not initialised:
        raise RuntimeError("shard=True needs torch.distributed to be initialised first")
    return OwnerSharded(process_group)


def _refuse_fsdp1(model: nn.Module) -> None:
    """FSDP's first version flattens parameters and points each at a new view of its flat
    buffer at every forward (``.data`` swaps): a snapshot bound to a parameter's storage would
    meet a different one each step."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - a torch without distributed
        return
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise NotImplementedError(
            "FullyShardedDataParallel (FSDP1) is not supported: it swaps its parameters' storage "
            "at every forward. Shard with fully_shard (FSDP2: averaged per local shard), or "
            "build the Averager on the model before wrapping it and use DDP")


class Local:
    """Every tensor averaged here; files hold whole models."""

    rank, world = 0, 1
    owner_sharded = False   # whole tensors assigned to ranks (DDP)
    sharded_files = False   # per-rank files plus an index

    def gather(self, layout: Layout, values: Dict[str, torch.Tensor], dst: Optional[int]
               ) -> Optional[Dict[str, torch.Tensor]]:
        """Full float32 CPU tensors of every averaged entry from this rank's ``values``; None on
        a rank other than ``dst`` (when given)."""
        return values

    @contextlib.contextmanager
    def swapped(self, model: nn.Module, layout: Layout, values: Dict[str, torch.Tensor]):
        """Writes this rank's averaged ``values`` into ``model`` in place (every rank: the
        replicas or shards agree after), and restores the exact previous values on exit."""
        self.before_swap(model)
        targets = layout.resolve(model, layout.all_entries)
        parts = [local_tensor(t) for t in targets]  # FSDP2 / ZeRO-3: this rank's part
        backups = []
        try:
            with torch.no_grad():
                for t in parts:
                    backups.append((t, t.detach().to("cpu", copy=True)))
            self._write(layout, targets, parts, values)
            yield
        finally:
            with torch.no_grad():
                for t, saved in backups:
                    t.copy_(saved)
            self.after_restore(model)

    def put(self, model: nn.Module, layout: Layout, values: Dict[str, torch.Tensor]) -> None:
        """Writes this rank's averaged ``values`` into ``model`` in place for good (every rank:
        the replicas or shards agree after); nothing gathered before hides them afterwards."""
        self.before_swap(model)
        targets = layout.resolve(model, layout.all_entries)
        self._write(layout, targets, [local_tensor(t) for t in targets], values)
        self.after_restore(model)

    def _write(self, layout: Layout, targets, parts, values: Dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for e, t in zip(layout.all_entries, parts):
                if e.name in values:
                    t.copy_(values[e.name])
        self.after_write(layout, targets)

    def before_swap(self, model: nn.Module) -> None:
        pass

    def after_write(self, layout: Layout, targets: List[torch.Tensor]) -> None:
        """After this rank wrote its averages into ``targets``: make every replica agree."""

    def after_restore(self, model: nn.Module) -> None:
        pass

    # state_dict() names tensors globally (resume.to_global); False: a rank's flat buffers
    # under a key naming the rank and world (ZeRO-3: resumed at the same world size only).
    global_state = True

    def global_tensor(self, entry, t: torch.Tensor) -> torch.Tensor:
        """``t`` (this rank's average of ``entry``) as state_dict() names it: whole here."""
        return t

    def writes_entry(self, entry) -> bool:
        """Whether this rank's snapshot file holds the entry's average."""
        return True

    def file_value(self, entry, value: torch.Tensor) -> torch.Tensor:
        """What this rank's file holds of the entry's average ``value``."""
        return value

    def close(self) -> None:
        """Releases what the strategy created (after the writer thread stopped)."""

    def writes_passthrough(self) -> bool:
        """Whether this rank's file holds the entries that are not averaged (buffers, frozen)."""
        return True

    def file_paths(self, path: str) -> Tuple[str, Optional[str]]:
        return path, None

    def file_meta(self, layout: Layout) -> Dict[str, str]:
        return {}

    def index(self, layout: Layout, path: str):
        """The sharded-files index's weight map (name -> file, or the list of files holding a
        split tensor's row blocks), or None for a single file."""
        return None


class OwnerSharded(Local):
    """Replicated parameters (DDP): each whole tensor is averaged by one owner rank."""

    owner_sharded = True
    sharded_files = True

    def __init__(self, process_group=None):
        self.group = process_group
        self.rank, self.world = dist.get_rank(process_group), dist.get_world_size(process_group)

    def gather(self, layout, values, dst):
        out = _gather_entries(layout.all_entries, layout.owner, values, self.rank, self.group,
                              dst=dst, device=layout.device)
        return out if dst is None or dst == self.rank else None

    def after_write(self, layout, targets):
        _broadcast_into(targets, [layout.owner[e.name] for e in layout.all_entries], self.group)

    def writes_passthrough(self):
        return self.rank == 0

    def file_paths(self, path):
        return shard_paths(path, self.rank, self.world)

    def file_meta(self, layout):
        return {"rank": str(self.rank), "world": str(self.world)}

    def index(self, layout, path):
        files = [os.path.basename(shard_paths(path, r, self.world)[0]) for r in range(self.world)]
        return _weight_map(layout, lambda e: files[layout.owner[e.name]], files[0])


class FSDP2Shards(OwnerSharded):
    """FSDP2 (DTensor parameters): each rank averages its local shard of every tensor."""

    owner_sharded = False

    def __init__(self, process_group=None):
        super().__init__(process_group)
        self.dcp_group, self.dcp_mesh = _writer_mesh(process_group)

    def gather(self, layout, values, dst):
        # With ``dst``, only that rank ever holds a full tensor (the others send their shards).
        out = {e.name: (_full_tensor(values[e.name], e.tensor, dst) if is_dtensor(e.tensor)
                        else values[e.name]) for e in layout.all_entries}
        return out if dst is None or dst == self.rank else None

    def close(self):
        # A group left alive keeps gloo's threads running into interpreter exit, where they can
        # abort the process ("terminate called without an active exception").
        group, self.dcp_group, self.dcp_mesh = self.dcp_group, None, None
        if group is not None and dist.is_initialized():
            try:
                dist.destroy_process_group(group)
            except (ValueError, RuntimeError):
                pass  # already destroyed with the default group

    def before_swap(self, model):
        # FSDP2 keeps a module's gathered (unsharded) parameters after a forward that does not
        # reshard (the root's, by default): writing the local shards would not reach them.
        _reshard(model)

    def after_write(self, layout, targets):
        pass  # the next forward gathers the local shards

    def after_restore(self, model):
        _reshard(model)  # what the body gathered holds the average: dropped before training

    def writes_entry(self, entry):
        return is_sharded(entry.tensor) or self.rank == 0  # replicated: rank 0 writes it

    def file_meta(self, layout):
        import json
        meta = super().file_meta(layout)
        # Where this rank's part of each split tensor sits in the full tensor.
        meta["shards"] = json.dumps({n: v[self.rank] for n, v in _split_map(layout).items()})
        return meta

    def index(self, layout, path):
        files = [os.path.basename(shard_paths(path, r, self.world)[0]) for r in range(self.world)]
        return _weight_map(layout, lambda e: files if is_sharded(e.tensor) else files[0],
                           files[0])

    def global_tensor(self, entry, t: torch.Tensor) -> torch.Tensor:
        """``t`` (this rank's part of ``entry``'s average) for state_dict(): a DTensor with the
        parameter's placements (DCP reshards it) on a CPU mesh of the parameter's mesh's shape
        (DTensor.from_local would move a CPU tensor to a CUDA mesh's device), or as it is for a
        tensor FSDP2 replicates. DCP reads only the layout (offsets, sizes) from the mesh."""
        if not is_dtensor(entry.tensor):
            return t
        mesh = entry.tensor.device_mesh
        if mesh.device_type != "cpu":
            if mesh.ndim != 1 or mesh.size() != self.dcp_mesh.size():
                raise NotImplementedError(
                    f"state_dict() of {entry.name!r}: its device mesh ({mesh.device_type}, shape "
                    f"{tuple(mesh.mesh.shape)}) is not the 1-D mesh over the Averager's ranks; "
                    "only that one (or a CPU mesh of any shape) is mapped to DCP here yet")
            mesh = self.dcp_mesh
        return DTensor.from_local(t, mesh, entry.tensor.placements, run_check=False,
                                  shape=entry.tensor.shape, stride=entry.tensor.stride())

    def as_dtensors(self, layout, tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """This rank's file tensors for torch.distributed.checkpoint: split tensors as DTensors
        (:meth:`global_tensor`); whole ones (rank 0's) as plain tensors."""
        by_name = {n: e for e in layout.all_entries for n in [e.name, *e.aliases]}
        return {n: (self.global_tensor(by_name[n], t) if n in by_name else t)
                for n, t in tensors.items()}


class ZeroShards(FSDP2Shards):
    """DeepSpeed ZeRO-3: each rank averages its partition of every parameter (``ds_tensor``: a
    flat slice of ``ceil(numel / world)`` elements, the last rank's padded). Persisted (small)
    parameters are partitioned too and averaged the same way. Full tensors are gathered only
    when asked for; ``swapped`` writes the partitions and releases every gathered copy, so the
    next forward gathers the averages (and, after restoring, the training weights again)."""

    def __init__(self, model, params, process_group=None):
        _check_zero3(params, process_group)
        OwnerSharded.__init__(self, process_group)
        self.dcp_group = self.dcp_mesh = None
        # DeepSpeed's parameter coordinator, when the engine was given: it releases every
        # gathered parameter, prefetched ones included.
        self._offload = getattr(getattr(model, "optimizer", None), "parameter_offload", None)

    def gather(self, layout, values, dst):
        out = {}
        for e in layout.all_entries:
            out[e.name] = (_zero3_full(values[e.name], e.tensor, self.group, dst)
                           if is_zero3(e.tensor) else values[e.name])
        return out if dst is None or dst == self.rank else None

    def close(self):
        pass

    # Partitions are not mapped to global tensors yet: a rank's state, under its rank's key.
    global_state = False

    def before_swap(self, model):
        self._release(model)  # a gathered copy would hide the partitions written next

    def after_restore(self, model):
        self._release(model)  # what the body gathered holds the average

    def _release(self, model):
        if self._offload is not None:
            self._offload.partition_all_parameters()
        else:
            _release_gathered(model)

    def file_value(self, entry, value: torch.Tensor) -> torch.Tensor:
        """The part of this rank's average that its file holds: a partition without padding."""
        if not is_zero3(entry.tensor):
            return value
        lo, hi = _zero3_span(entry.tensor, self.rank, self.world)
        return value[:hi - lo]

    def file_meta(self, layout):
        import json
        meta = OwnerSharded.file_meta(self, layout)
        # Each split tensor as a flat row block of its elements: [first element, [numel], shape].
        shards = {}
        for e in layout.all_entries:
            if is_zero3(e.tensor):
                lo, _ = _zero3_span(e.tensor, self.rank, self.world)
                shape = list(e.tensor.ds_shape)
                for n in [e.name, *e.aliases]:
                    shards[n] = [lo, [e.tensor.ds_numel], shape]
        meta["shards"] = json.dumps(shards)
        return meta

    def as_dtensors(self, layout, tensors):
        raise ValueError("format='dcp' is for FSDP2 (DTensor) averages; ZeRO-3 averages are "
                         "saved as safetensors files per rank with an index")


def _check_zero3(params, process_group=None) -> None:
    """Refuses ZeRO-3 set-ups whose partitions are not plain tensors on the training device, or
    are partitioned over another group than the Averager's (tensor / pipeline parallelism)."""
    world = dist.get_world_size(process_group)
    for p in params:
        if not is_zero3(p):
            continue
        group = getattr(p, "ds_process_group", None)
        if group is not None and dist.get_world_size(group) != world:
            raise NotImplementedError(
                f"DeepSpeed partitions this model over {dist.get_world_size(group)} of "
                f"{world} processes (tensor, pipeline or hierarchical parallelism): ZeRO-3 "
                "averaging supports partitions over the whole data-parallel world only")
        part = p.ds_tensor
        where = getattr(part, "final_location", None)
        if where is not None and "nvme" in str(where).lower():
            raise NotImplementedError(
                "DeepSpeed ZeRO-Infinity parameter offload to NVMe (offload_param: nvme) is not "
                "supported: the partitions live on disk between uses. Train with "
                "offload_param disabled to keep averages with offload_ema")
        if part.device != p.device:
            raise NotImplementedError(
                f"DeepSpeed parameter offload (offload_param: {part.device.type}) is not "
                f"supported: partitions live on {part.device}, the model on {p.device}. Train "
                "with offload_param disabled to keep averages with offload_ema")
        if not p.requires_grad:
            raise NotImplementedError(
                "frozen ZeRO-3 parameters (requires_grad=False, e.g. a LoRA base model) are not "
                "supported yet: their partitions cannot be reported as current values. Freeze "
                "them outside ZeRO-3's partitioning, or train without ZeRO stage 3")


def _zero3_span(p, rank: int, world: int) -> Tuple[int, int]:
    """The elements [lo, hi) of the flattened parameter that ``rank``'s partition holds."""
    size = p.ds_tensor.numel()
    lo = min(p.ds_numel, rank * size)
    return lo, min(p.ds_numel, lo + size)


def _zero3_full(local_avg: torch.Tensor, p, group, dst: Optional[int] = None
                ) -> Optional[torch.Tensor]:
    """The full float32 CPU tensor of a ZeRO-3 parameter's average from every rank's partition
    average (equal sizes, the last padded): an all-gather over the group, or with ``dst`` a
    gather to that rank alone (None elsewhere: no rank but ``dst`` holds the full tensor)."""
    comm = _comm_device(group, p.ds_tensor.device)
    world = dist.get_world_size(group)
    part = local_avg.reshape(-1).to(comm, torch.float32)
    if dst is None:
        out = torch.empty(world * part.numel(), dtype=torch.float32, device=comm)
        dist.all_gather_into_tensor(out, part, group=group)
    else:
        out = _gather_to(part, dst, group)
        if out is None:
            return None
    return out[:p.ds_numel].view(p.ds_shape).to("cpu")


def _gather_to(part: torch.Tensor, dst: int, group) -> Optional[torch.Tensor]:
    """Every rank's ``part`` (the same shape everywhere) concatenated along dim 0 on the
    group's rank ``dst``; None on the others, which allocate nothing beyond ``part``."""
    world = dist.get_world_size(group)
    me = dist.get_rank(group)
    parts = [torch.empty_like(part) for _ in range(world)] if me == dst else None
    dist.gather(part, parts, dst=_global_rank(group, dst), group=group)
    return torch.cat(parts) if parts is not None else None


def _release_gathered(model: nn.Module) -> None:
    """Frees every gathered ZeRO-3 parameter (persisted ones included): the next use gathers it
    from the partitions again."""
    available = [p for p in unwrap_model(model).parameters()
                 if is_zero3(p) and p.ds_status.name == "AVAILABLE"]
    if available:
        available[0].partition(param_list=available)


# ---- helpers ----------------------------------------------------------------------------------

def _weight_map(layout: Layout, where, passthrough_file) -> Dict[str, object]:
    out: Dict[str, object] = {}
    for e in layout.all_entries:
        for n in [e.name, *e.aliases]:
            out[n] = where(e)
    for n in layout.passthrough:
        out[n] = passthrough_file
    return {n: out[n] for n in layout.names}


def _split_map(layout: Layout) -> Dict[str, list]:
    """FSDP2: for each split tensor (and alias), per rank [first row, global shape]."""
    out = {}
    for e in layout.all_entries:
        if not is_dtensor(e.tensor):
            continue
        rows = _dim0_offsets(e.tensor)
        for n in [e.name, *e.aliases]:
            out[n] = [[r, list(e.tensor.shape)] for r in rows]
    return out


def _writer_mesh(process_group):
    """A gloo group and a 1-D CPU mesh over it, of the Averager's own, for
    torch.distributed.checkpoint exports: they run on the writer thread, so their collectives
    must not run on training's group (NCCL on GPUs: init_device_mesh("cpu") over the world hands
    back the default group when its backend is not gloo, and the writer thread never set a CUDA
    device). Created at construction, where every rank is (creating a group is a collective)."""
    from torch.distributed.device_mesh import DeviceMesh

    ranks = dist.get_process_group_ranks(process_group or dist.group.WORLD)
    # Only the group's ranks call this (a subgroup: data parallel inside a larger job); a plain
    # new_group() must be called by every rank of the job and would wait for the others.
    group = dist.new_group(ranks=ranks, backend="gloo", use_local_synchronization=True)
    return group, DeviceMesh.from_group(group, "cpu")


def _reshard(model: nn.Module) -> None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import FSDPModule
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _global_rank(group, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


def _comm_device(group, like: torch.device) -> torch.device:
    """NCCL moves CUDA tensors only; gloo moves CPU tensors (and CUDA ones via the host)."""
    backend = dist.get_backend(group)
    return like if "nccl" in str(backend).lower() else torch.device("cpu")


def _gather_entries(entries: Iterable, owner: Dict[str, int], local: Dict[str, torch.Tensor],
                    rank: int, group=None, dst: Optional[int] = None,
                    device: torch.device = torch.device("cpu")) -> Dict[str, torch.Tensor]:
    """Full float32 CPU tensors of every entry from its owner: on every rank (broadcasts) or, with
    ``dst``, on that rank only (point to point). Every rank must call this with the same entries
    in the same order."""
    comm = _comm_device(group, device)
    out: Dict[str, torch.Tensor] = {}
    for e in entries:
        src = owner[e.name]
        if dst is not None and src == dst and rank != dst:
            continue  # the destination already has it
        if src == rank:
            buf = local[e.name].to(comm, torch.float32)
        else:
            buf = torch.empty(e.shape, dtype=torch.float32, device=comm)
        if dst is None:
            dist.broadcast(buf, _global_rank(group, src), group=group)
        elif src != dst:
            if rank == src:
                dist.send(buf, _global_rank(group, dst), group=group)
            elif rank == dst:
                dist.recv(buf, _global_rank(group, src), group=group)
        if dst is None or rank == dst:
            out[e.name] = buf.to("cpu") if buf.device.type != "cpu" else buf
    return out


def _broadcast_into(tensors, owner_ranks, group=None) -> None:
    """Broadcasts each live tensor from its owner into every rank's replica, in place."""
    for t, src in zip(tensors, owner_ranks):
        comm = _comm_device(group, t.device)
        if t.device == comm:
            dist.broadcast(t.data, _global_rank(group, src), group=group)
        else:
            buf = t.detach().to(comm)
            dist.broadcast(buf, _global_rank(group, src), group=group)
            with torch.no_grad():
                t.copy_(buf)


def _full_tensor(local_avg: torch.Tensor, like, dst: Optional[int] = None
                 ) -> Optional[torch.Tensor]:
    """The full float32 CPU tensor of an FSDP2 parameter's average, gathered from every rank's
    local average (a collective over the parameter's device mesh). With ``dst`` (fully_shard's
    1-D Shard(0) layout) a gather to that rank of the mesh's group alone: None elsewhere, and
    no other rank holds the full tensor. Collectives run on the mesh's device (its backend's:
    a CUDA mesh with CPU-offloaded shards still gathers through CUDA under NCCL)."""
    mesh = like.device_mesh
    comm = _mesh_device(mesh)
    if dst is not None and _dim0_layout(like):
        group = mesh.get_group()
        chunk = -(-like.shape[0] // mesh.size())  # torch.chunk's rows per rank
        local = local_avg.to(comm, torch.float32)
        padded = local.new_zeros((chunk,) + tuple(like.shape[1:]))
        padded[:local.shape[0]].copy_(local)
        full = _gather_to(padded, dst, group)
        return None if full is None else full[:like.shape[0]].to("cpu")
    d = DTensor.from_local(local_avg.to(comm), mesh, like.placements, run_check=False,
                           shape=like.shape, stride=like.stride())
    return d.full_tensor().to("cpu", torch.float32)


def _mesh_device(mesh) -> torch.device:
    """Where a mesh's collectives move tensors: its CUDA device under NCCL, the host with gloo
    (which moves CPU tensors)."""
    backend = str(dist.get_backend(mesh.get_group(0))).lower()  # (any dim: one backend)
    if "nccl" in backend and mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _dim0_layout(dt) -> bool:
    from torch.distributed.tensor.placement_types import Shard
    placements = dt.placements
    return (dt.device_mesh.ndim == 1 and len(placements) == 1 and
            isinstance(placements[0], Shard) and placements[0].dim == 0)


def _dim0_offsets(dt) -> list:
    """First row of each rank's shard of an FSDP2 parameter (1-D mesh, Shard(0), the layout
    fully_shard uses: torch.chunk of dim 0 into world pieces)."""
    from torch.distributed.tensor.placement_types import Shard
    mesh, placements = dt.device_mesh, dt.placements
    if mesh.ndim != 1 or len(placements) != 1 or not isinstance(placements[0], Shard) or \
            placements[0].dim != 0:
        raise NotImplementedError(
            f"snapshots of DTensor parameters need a 1-D mesh with Shard(0) (fully_shard's "
            f"default), got mesh of {mesh.ndim} dims and placements {placements}")
    n, world = dt.shape[0], mesh.size()
    chunk = -(-n // world)
    return [min(n, r * chunk) for r in range(world)]
