"""PyTorch Lightning: an ``Averager`` as a callback.

    from offload_ema.integrations.lightning import AveragerCallback
    cb = AveragerCallback({"ema": oe.EMA(0.999)}, validate_with="ema")
    trainer = lightning.Trainer(callbacks=[cb], ...)
    trainer.fit(module)
    cb.averager.averaged_state_dict("ema")
"""
from __future__ import annotations

import contextlib
from typing import Mapping, Optional

import torch.distributed as dist

try:
    import lightning.pytorch as pl
except ImportError:  # the older package name
    try:
        import pytorch_lightning as pl
    except ImportError as exc:
        raise ImportError("offload_ema.integrations.lightning needs PyTorch Lightning: "
                          "pip install lightning") from exc

from offload_ema.averager import Averager
from offload_ema.integrations import check_callback_args, is_sharded, on_every_rank, world

__all__ = ["AveragerCallback"]


class AveragerCallback(pl.Callback):
    """Keeps averages of the LightningModule's weights during ``fit``.

    The Averager is built at fit start and attached to the optimizers: one snapshot per
    real optimizer step, so gradient accumulation and steps skipped by AMP are respected. Its
    state is part of Lightning checkpoints, and a fit resumed from one continues exactly.

    Under torch.distributed with sharded averages (DDP, FSDP2) each rank holds its own share,
    while Lightning writes rank 0's checkpoint only: saving a checkpoint therefore gathers every
    rank's averager state into rank 0's (over gloo, in host memory), and on resume each rank
    takes its own, which needs the same number of processes. ``trainer.save_checkpoint`` must
    then run on every rank, as Lightning documents (ModelCheckpoint does so).

    Args:
        averages (Mapping[str, EMA | LAWA]): as for :class:`offload_ema.Averager`.
        validate_with (str, optional): run validation with this average swapped in (the weights
            are restored after). Until its first snapshot, validation uses the raw weights.
        save_every (int, optional) / save_path (str) / keep_last (int, optional): write
            snapshots every ``save_every`` optimizer steps (``Averager.save_every``).
        **averager_kwargs: more keyword arguments of :class:`offload_ema.Averager`.

    Attributes:
        averager: the Averager (None before fit starts).
    """

    def __init__(self, averages: Mapping, *, validate_with: Optional[str] = None,
                 save_every: Optional[int] = None, save_path: Optional[str] = None,
                 keep_last: Optional[int] = None, **averager_kwargs):
        super().__init__()
        check_callback_args(averages, validate_with, "validate_with", save_every, save_path)
        self.averages = dict(averages)
        self.validate_with = validate_with
        self.save_every, self.save_path, self.keep_last = save_every, save_path, keep_last
        self.averager_kwargs = averager_kwargs
        self.averager: Optional[Averager] = None
        self._pending_state = None
        self._gather_group = None
        self._swap = contextlib.ExitStack()

    @property
    def state_key(self) -> str:
        return f"offload_ema.AveragerCallback[{','.join(sorted(self.averages))}]"

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.averager is None:
            self.averager = Averager(pl_module, self.averages, **self.averager_kwargs)
            if self.save_every is not None:
                self.averager.save_every(self.save_every, self.save_path, keep_last=self.keep_last)
            if is_sharded(self.averager) and dist.get_backend() != "gloo":
                # Checkpoints gather the ranks' states; a gloo group moves them in host memory
                # (over NCCL they would be staged on rank 0's GPU). Created here, where every
                # rank is: creating a group is itself a collective.
                self._gather_group = dist.new_group(backend="gloo")
        if self._pending_state is not None:
            # Every rank restores from the same checkpoint, so every rank gets here.
            on_every_rank(self._restore_pending, "restoring the averager state")
        self.averager.detach()
        # Several optimizers over one module (e.g. Muon + AdamW): one snapshot once all stepped.
        self.averager.attach(*trainer.optimizers)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.averager.detach()
        self.averager.flush()

    def on_validation_start(self, trainer, pl_module) -> None:
        if self.validate_with and self.averager is not None and \
                self.averager.ready(self.validate_with):
            self._swap.enter_context(self.averager.swapped(pl_module, self.validate_with))

    def on_validation_end(self, trainer, pl_module) -> None:
        self._swap.close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._swap.close()

    def state_dict(self) -> dict:
        """This callback's part of a checkpoint. Sharded: a collective (Lightning calls it on
        every rank in ``trainer.save_checkpoint``); global rank 0's holds every rank's state."""
        if self.averager is None:
            return {}
        state = self.averager.state_dict()
        if not is_sharded(self.averager):
            return {"averager": state}
        # Gathered rather than written as per-rank files beside the checkpoint: the callback is
        # not told the checkpoint's path, and files beside it would be missed by ModelCheckpoint's
        # top-k deletion, by copies of the .ckpt and by remote (fsspec) paths. The price: rank 0
        # holds every rank's share in host memory while it writes, as one process would.
        rank, size = world()
        states = [None] * size if rank == 0 else None
        dist.gather_object(state, states, dst=0, group=self._gather_group)
        # Other ranks' dicts are not written under DDP; should a strategy write them, loading
        # one says where the states are instead of silently restarting the averages.
        return {"averager_ranks": states, "world": size}

    def load_state_dict(self, state_dict: dict) -> None:
        if "averager" not in state_dict and "averager_ranks" not in state_dict:
            return
        self._pending_state = state_dict
        if self.averager is not None:
            # Lightning restores callbacks on every rank, from the same checkpoint.
            on_every_rank(self._restore_pending, "restoring the averager state")
        # else: applied when fit builds the Averager

    def _restore_pending(self) -> None:
        state, self._pending_state = self._pending_state, None
        if "averager" in state:
            self.averager.load_state_dict(state["averager"])
            return
        rank, size = world()
        if state["averager_ranks"] is None:
            raise ValueError("this checkpoint was written by a rank other than global rank 0; "
                             "rank 0's checkpoint holds every rank's averager state")
        saved = len(state["averager_ranks"])
        if saved != size:
            raise ValueError(
                f"the checkpoint holds the averager states of {saved} processes, this run has "
                f"{size}: each rank holds its own share of the averages, so resume with {saved} "
                "processes")
        self.averager.load_state_dict(state["averager_ranks"][rank])
