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

try:
    import lightning.pytorch as pl
except ImportError:  # the older package name
    try:
        import pytorch_lightning as pl
    except ImportError as exc:
        raise ImportError("offload_ema.integrations.lightning needs PyTorch Lightning: "
                          "pip install lightning") from exc

from offload_ema.averager import Averager
from offload_ema.integrations import check_callback_args

__all__ = ["AveragerCallback"]


class AveragerCallback(pl.Callback):
    """Keeps averages of the LightningModule's weights during ``fit``.

    The Averager is built at fit start and attached to the (single) optimizer: one snapshot per
    real optimizer step, so gradient accumulation and steps skipped by AMP are respected. Its
    state is part of Lightning checkpoints, and a fit resumed from one continues exactly.

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
        self._swap = contextlib.ExitStack()

    @property
    def state_key(self) -> str:
        return f"offload_ema.AveragerCallback[{','.join(sorted(self.averages))}]"

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.averager is None:
            self.averager = Averager(pl_module, self.averages, **self.averager_kwargs)
            if self.save_every is not None:
                self.averager.save_every(self.save_every, self.save_path, keep_last=self.keep_last)
        if self._pending_state is not None:
            self.averager.load_state_dict(self._pending_state)
            self._pending_state = None
        if len(trainer.optimizers) != 1:
            raise RuntimeError(f"AveragerCallback supports one optimizer, the trainer has "
                               f"{len(trainer.optimizers)}")
        self.averager.detach()
        self.averager.attach(trainer.optimizers[0])

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
        return {"averager": self.averager.state_dict()} if self.averager is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if "averager" not in state_dict:
            return
        if self.averager is not None:
            self.averager.load_state_dict(state_dict["averager"])
        else:
            self._pending_state = state_dict["averager"]  # applied when fit builds the Averager
