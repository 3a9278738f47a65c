"""Averaging under torch.distributed with replicated parameters (DDP): each rank keeps the
averages of a disjoint, byte-balanced share of the tensors (``layout.shard_owners``), so host
memory and transfers per rank are about 1/world of the model. Full tensors are put together over
the process group only when asked for (``averaged_state_dict``, ``swapped``)."""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple

import torch
import torch.distributed as dist


def group_info(process_group=None) -> Tuple[int, int]:
    """(rank, world size) of ``process_group`` (the default group when None)."""
    return dist.get_rank(process_group), dist.get_world_size(process_group)


def _global_rank(group, rank: int) -> int:
    if group is None:
        return rank
    return dist.get_global_rank(group, rank)


def _comm_device(group, like: torch.device) -> torch.device:
    """NCCL moves CUDA tensors only; gloo moves CPU tensors (and CUDA ones via the host)."""
    backend = dist.get_backend(group)
    return like if "nccl" in str(backend).lower() else torch.device("cpu")


def gather_entries(entries: Iterable, owner: Dict[str, int], local: Dict[str, torch.Tensor],
                   rank: int, group=None, dst: Optional[int] = None,
                   device: torch.device = torch.device("cpu")) -> Dict[str, torch.Tensor]:
    """Full float32 CPU tensors of every entry from its owner: on every rank (broadcasts) or, with
    ``dst``, on that rank only (point to point; the others get nothing). Every rank must call this
    with the same entries in the same order."""
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


def broadcast_into(tensors, owner_ranks, group=None) -> None:
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


def full_tensor(local_avg: torch.Tensor, like) -> torch.Tensor:
    """The full float32 CPU tensor of an FSDP2 parameter's average, gathered from every rank's
    local average (a collective over the parameter's device mesh)."""
    from offload_ema.layout import DTensor
    comm = _comm_device(like.device_mesh.get_group(), like.device)
    d = DTensor.from_local(local_avg.to(comm), like.device_mesh, like.placements, run_check=False,
                           shape=like.shape, stride=like.stride())
    return d.full_tensor().to("cpu", torch.float32)


def dim0_offsets(dt) -> list:
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
