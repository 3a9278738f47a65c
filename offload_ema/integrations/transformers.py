"""Hugging Face ``Trainer``: an ``Averager`` as a ``TrainerCallback``.

    from offload_ema.integrations.transformers import AveragerCallback
    cb = AveragerCallback({"ema": oe.EMA(0.999)}, evaluate_with="ema")
    trainer = Trainer(model=model, args=args, callbacks=[cb], ...)
    trainer.train()             # or trainer.train(resume_from_checkpoint=True)
"""
from __future__ import annotations

import os
from typing import Mapping, Optional

try:
    import transformers
except ImportError as exc:
    raise ImportError("offload_ema.integrations.transformers needs Hugging Face transformers: "
                      "pip install transformers") from exc

import torch

from offload_ema.averager import Averager
from offload_ema.integrations import check_callback_args

__all__ = ["AveragerCallback", "STATE_FILE"]

STATE_FILE = "offload_ema_averager.pt"


def _innermost(optimizer):
    """The torch optimizer under accelerate's / the Trainer's wrappers (its step hooks fire)."""
    while hasattr(optimizer, "optimizer") and isinstance(optimizer.optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


class AveragerCallback(transformers.TrainerCallback):
    """Keeps averages of the Trainer's model.

    Built at train begin and attached to the optimizer: one snapshot per real optimizer step
    (gradient accumulation respected). The Averager's state is written beside each Trainer
    checkpoint (``checkpoint-N/offload_ema_averager.pt``) and restored when training resumes from
    that checkpoint, so the averages continue exactly.

    Args:
        averages (Mapping[str, EMA | LAWA]): as for :class:`offload_ema.Averager`.
        evaluate_with (str, optional): after each evaluation, also compute the evaluation loss
            with this average swapped in; reported as ``eval_<name>_loss`` in the metrics.
        save_every / save_path / keep_last: periodic snapshot files (``Averager.save_every``).
        **averager_kwargs: more keyword arguments of :class:`offload_ema.Averager`.
    """

    def __init__(self, averages: Mapping, *, evaluate_with: Optional[str] = None,
                 save_every: Optional[int] = None, save_path: Optional[str] = None,
                 keep_last: Optional[int] = None, **averager_kwargs):
        check_callback_args(averages, evaluate_with, "evaluate_with", save_every, save_path)
        self.averages = dict(averages)
        self.evaluate_with = evaluate_with
        self.save_every, self.save_path, self.keep_last = save_every, save_path, keep_last
        self.averager_kwargs = averager_kwargs
        self.averager: Optional[Averager] = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.averager is None:
            self.averager = Averager(model, self.averages, **self.averager_kwargs)
            if self.save_every is not None:
                self.averager.save_every(self.save_every, self.save_path, keep_last=self.keep_last)
        if state.global_step > 0:  # resuming: the Trainer names checkpoints checkpoint-<step>
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"resuming at step {state.global_step} but {path} is missing: the averages "
                    "cannot continue exactly (was the checkpoint written with this callback?)")
            self.averager.load_state_dict(torch.load(path, weights_only=False))
        self.averager.detach()
        self.averager.attach(_innermost(optimizer))

    def on_train_end(self, args, state, control, **kwargs):
        self.averager.detach()
        self.averager.flush()

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder) and state.is_world_process_zero:
            tmp = os.path.join(folder, STATE_FILE + ".tmp")
            torch.save(self.averager.state_dict(), tmp)
            os.replace(tmp, os.path.join(folder, STATE_FILE))

    def on_evaluate(self, args, state, control, metrics=None, model=None, eval_dataloader=None,
                    **kwargs):
        name = self.evaluate_with
        if not name or self.averager is None or not self.averager.ready(name) or \
                eval_dataloader is None or metrics is None:
            return
        total, count = 0.0, 0
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        with self.averager.swapped(model, name), torch.no_grad():
            for batch in eval_dataloader:
                batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
                n = len(next(iter(batch.values())))
                out = model(**batch)
                total += float(out["loss"] if isinstance(out, dict) else out.loss) * n
                count += n
        model.train(was_training)
        metrics[f"eval_{name}_loss"] = total / max(count, 1)
