"""Integrations with training frameworks. Each module imports its framework; importing
offload_ema itself never does."""
from typing import Callable, Tuple

import torch.distributed as dist


def check_callback_args(averages, swap_name, swap_arg, save_every, save_path) -> None:
    """The argument checks both framework callbacks share."""
    if swap_name is not None and swap_name not in averages:
        raise ValueError(f"{swap_arg} must name one of the averages ({', '.join(averages)}), "
                         f"got {swap_name!r}")
    if (save_every is None) != (save_path is None):
        raise ValueError("save_every and save_path go together")


def world() -> Tuple[int, int]:
    """(global rank, world size) of this process; (0, 1) outside torch.distributed. Callbacks
    key their per-rank checkpoint state by the global rank (not the Averager's group rank), so
    two processes never claim the same entry, whatever group the Averager shards over."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_sharded(averager) -> bool:
    """Whether each rank holds its own share of the averages (DDP sharding or FSDP2 shards),
    so that checkpoints need every rank's state rather than one rank's."""
    return averager.stats()["world"] > 1


def portable_state(averager) -> dict:
    """What an integration saves per rank: the global state where it holds plain tensors (one
    process, DDP: it merges and loads at any world size), else the rank's own state (FSDP2's
    DTensors and ZeRO-3 partitions: resumed at the same world size)."""
    if averager._layout.sharded_tensors:
        return averager._rank_state_dict()
    return averager.state_dict()


def on_every_rank(fn: Callable[[], None], what: str) -> None:
    """Runs ``fn`` here and, under torch.distributed, makes every rank raise if it raised on any.

    Restoring averager state can fail on one rank only (its file is missing, its share does not
    fit); that rank would stop while the others went on into the next collective of training and
    waited there until the process group's timeout. Every rank must call this."""
    error = None
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 -- reported on every rank below, re-raised here
        error = exc
    rank, size = world()
    if size > 1:
        messages = [None] * size
        dist.all_gather_object(messages, None if error is None else
                               f"{type(error).__name__}: {error}")
        failed = [(r, m) for r, m in enumerate(messages) if m is not None]
        if failed and error is None:
            r, m = failed[0]
            raise RuntimeError(f"{what} failed on rank {r} (of {size}): {m}")
    if error is not None:
        raise error
