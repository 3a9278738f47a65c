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

import torch
import torch.distributed as dist

try:
    import lightning.pytorch as pl
except ImportError:  # the older package name
    try:
        import pytorch_lightning as pl
    except ImportError as exc:
        raise ImportError("offload_ema.integrations.lightning needs PyTorch Lightning: "
                          "pip install lightning") from exc

from offload_ema import resume
from offload_ema.averager import Averager
from offload_ema.integrations import (check_callback_args, is_sharded, on_every_rank,
                                      portable_state, world)

__all__ = ["AveragerCallback"]


class AveragerCallback(pl.Callback):
    """Keeps averages of the LightningModule's weights during ``fit``.

    The Averager is built at fit start and attached to the optimizers: one snapshot per
    real optimizer step, so gradient accumulation and steps skipped by AMP are respected. Its
    state is part of Lightning checkpoints, and a fit resumed from one continues exactly. That
    state is plain data (tensors, numbers, strings, lists, dicts), so a checkpoint from elsewhere
    can be loaded without running code from it: ``trainer.fit(..., ckpt_path=...,
    weights_only=True)``.

    Under torch.distributed with sharded averages (DDP, FSDP2) each rank holds its own share,
    while Lightning writes rank 0's checkpoint only: saving a checkpoint therefore gathers every
    rank's averager state into rank 0's (over gloo, in host memory), and on resume each rank
    takes its own, which needs the same number of processes. ``trainer.save_checkpoint`` must
    then run on every rank, as Lightning documents (ModelCheckpoint does so).

    Args:
        averages (Mapping[str, EMA | LAWA]): as for :class:`offload_ema.Averager`.
        validate_with (str, optional): run validation with this average swapped in (the weights
            are restored after). Until its first snapshot, validation uses the raw weights.
        keep_raw (bool, default False): with ``validate_with``, validation runs on the raw
            weights as usual, and then once more with the average swapped in, whose metrics are
            logged under their own names: ``val_loss/ema`` beside ``val_loss`` (every value the
            module logs in ``validation_step``, batch-size weighted means, averaged over the
            ranks), to the loggers and ``trainer.callback_metrics`` (so ModelCheckpoint or
            EarlyStopping can monitor them).
        save_every (int, optional) / save_path (str) / keep_last (int, optional): write
            snapshots every ``save_every`` optimizer steps (``Averager.save_every``).
        **averager_kwargs: more keyword arguments of :class:`offload_ema.Averager`.

    Attributes:
        averager: the Averager (None before fit starts).
    """

    def __init__(self, averages: Mapping, *, validate_with: Optional[str] = None,
                 keep_raw: bool = False, save_every: Optional[int] = None,
                 save_path: Optional[str] = None, keep_last: Optional[int] = None,
                 **averager_kwargs):
        super().__init__()
        check_callback_args(averages, validate_with, "validate_with", save_every, save_path)
        if keep_raw and not validate_with:
            raise ValueError("keep_raw needs validate_with (the average to validate beside the "
                             "raw weights)")
        self.averages = dict(averages)
        self.validate_with = validate_with
        self.keep_raw = bool(keep_raw)
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
        if self.keep_raw:
            # The average's metrics are in callback_metrics once this callback's
            # on_validation_end ran: an EarlyStopping listed before it would look too early.
            mine = trainer.callbacks.index(self) if self in trainer.callbacks else -1
            for cb in trainer.callbacks[:max(mine, 0)]:
                monitor = getattr(cb, "monitor", None) or ""
                if isinstance(cb, pl.callbacks.EarlyStopping) and \
                        monitor.endswith(f"/{self.validate_with}"):
                    raise ValueError(
                        f"EarlyStopping(monitor={monitor!r}) comes before the AveragerCallback "
                        "that computes it: list the AveragerCallback first in callbacks=[...]")
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
        if self.validate_with and not self.keep_raw and self.averager is not None and \
                self.averager.ready(self.validate_with):
            self._swap.enter_context(self.averager.swapped(pl_module, self.validate_with))

    def on_validation_end(self, trainer, pl_module) -> None:
        self._swap.close()
        name = self.validate_with
        if self.keep_raw and not trainer.sanity_checking and self.averager is not None and \
                self.averager.ready(name):
            with self.averager.swapped(pl_module, name):
                metrics = _validate(trainer, pl_module, f"/{name}")
            if metrics:
                for logger in trainer.loggers:
                    logger.log_metrics(metrics, step=trainer.global_step)
                trainer.callback_metrics.update(
                    {k: torch.tensor(v) for k, v in metrics.items()})

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._swap.close()

    def state_dict(self) -> dict:
        """This callback's part of a checkpoint. Sharded: a collective (Lightning calls it on
        every rank in ``trainer.save_checkpoint``); global rank 0's holds every rank's state."""
        if self.averager is None:
            return {}
        state = portable_state(self.averager)  # global names where it can (DDP)
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
        if saved != size and all(resume.is_global(s) for s in state["averager_ranks"]):
            # Every rank's share, under global names (DDP): merged, it loads at any world size.
            self.averager.load_state_dict(resume.merge_global(state["averager_ranks"]))
            return
        if saved != size:
            raise ValueError(
                f"the checkpoint holds the averager states of {saved} processes, this run has "
                f"{size}: each rank holds its own share of the averages, so resume with {saved} "
                "processes")
        self.averager.load_state_dict(state["averager_ranks"][rank])


class _Logged:
    """What a module logs during the extra validation pass, collected instead of logged: plain
    values as batch-size weighted sums, torchmetrics objects by name (computed at the end)."""

    def __init__(self):
        self.sums: dict = {}
        self.metrics: dict = {}  # name -> torchmetrics object
        self.batch_size = 1

    def log(self, name, value, *args, **kwargs):
        if hasattr(value, "compute") and hasattr(value, "reset") and not torch.is_tensor(value):
            self.metrics[name] = value  # updated by the step; computed once at the end
            return
        n = kwargs.get("batch_size") or self.batch_size
        v = float(value.detach().float().mean()) if torch.is_tensor(value) else float(value)
        total, count = self.sums.get(name, (0.0, 0))
        self.sums[name] = (total + v * n, count + n)

    def log_dict(self, values, *args, **kwargs):
        for k, v in values.items():
            self.log(k, v, *args, **kwargs)


def _validate(trainer, pl_module, suffix: str) -> dict:
    """One more pass of validation over the trainer's validation data (this rank's share), the
    way Lightning runs it (the strategy's batch transfer with the module's transfer hooks, its
    ``validation_step`` with the precision context, the module's epoch and batch start / end
    hooks), with
    what the module logs collected instead of logged: ``{name + suffix: value}``. Plain values:
    batch-size weighted means, summed over the ranks; torchmetrics objects: ``compute()`` (which
    syncs the ranks itself), then ``reset()``. The model is in eval mode without gradients here
    (Lightning's own loop called us)."""
    loaders = trainer.val_dataloaders
    if loaders is None:
        return {}
    if not isinstance(loaders, (list, tuple)):
        loaders = [loaders]
    logged = _Logged()
    own = [a for a in ("log", "log_dict") if a in vars(pl_module)]  # set on the instance?
    saved = {a: vars(pl_module)[a] for a in own}
    pl_module.log, pl_module.log_dict = logged.log, logged.log_dict
    try:
        # The module's torchmetrics objects still hold the raw pass's state (Lightning resets
        # them after this hook): emptied first, so the average's values are its own.
        try:
            from torchmetrics import Metric
        except ImportError:  # no torchmetrics: no such objects
            Metric = ()
        for m in pl_module.modules():
            if isinstance(m, Metric):
                m.reset()
        with torch.no_grad():
            _validation_pass(trainer, pl_module, loaders, logged)
        out = {f"{n}{suffix}": float(m.compute()) for n, m in logged.metrics.items()}
    finally:
        del pl_module.log, pl_module.log_dict  # the class's methods again
        for a, v in saved.items():
            setattr(pl_module, a, v)
        for m in logged.metrics.values():
            m.reset()
    out.update({f"{n}{suffix}": v for n, v in _means_over_ranks(logged.sums,
                                                                pl_module.device).items()})
    return out


def _validation_pass(trainer, pl_module, loaders, logged: _Logged) -> None:
    """The module's epoch and batch hooks and validation steps over this rank's batches, as many
    per loader as Lightning's own pass ran."""
    from lightning.pytorch.utilities.data import extract_batch_size

    pl_module.on_validation_epoch_start()
    counts = list(trainer.num_val_batches)  # what Lightning's own pass ran
    for idx, loader in enumerate(loaders):
        limit = counts[idx] if idx < len(counts) else float("inf")
        for i, batch in enumerate(loader):
            if i >= limit:
                break
            batch = trainer.strategy.batch_to_device(batch, dataloader_idx=idx)
            try:
                logged.batch_size = extract_batch_size(batch)
            except Exception:  # noqa: BLE001 -- no tensor to tell: weight 1
                logged.batch_size = 1
            args = (batch, i) if len(loaders) == 1 else (batch, i, idx)
            # The module's own batch hooks, as Lightning calls them (what they log is the
            # average's too); other callbacks' (progress bars, ...) are not run.
            pl_module.on_validation_batch_start(*args)
            output = trainer.strategy.validation_step(*args)
            pl_module.on_validation_batch_end(output, *args)
    pl_module.on_validation_epoch_end()  # e.g. logs an epoch metric, clears outputs


def _means_over_ranks(sums: dict, device) -> dict:
    """``{name: weighted mean}`` of every rank's ``(total, count)`` sums (a name one rank did
    not log counts zero there)."""
    names = sorted(sums)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, names)
        names = sorted(set().union(*everyone))
        totals = torch.tensor([list(sums.get(n, (0.0, 0))) for n in names], dtype=torch.float64)
        if "nccl" in str(dist.get_backend()).lower():  # NCCL reduces CUDA tensors only
            totals = totals.to(device)
        if names:
            dist.all_reduce(totals)
        totals = totals.cpu()
    else:
        totals = torch.tensor([list(sums[n]) for n in names], dtype=torch.float64)
    return {n: float(t / c) for n, (t, c) in zip(names, totals.tolist()) if c}
