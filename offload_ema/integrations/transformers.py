"""Hugging Face ``Trainer``: an ``Averager`` as a ``TrainerCallback``.

    from offload_ema.integrations.transformers import AveragerCallback
    cb = AveragerCallback({"ema": oe.EMA(0.999)}, evaluate_with="ema")
    trainer = Trainer(model=model, args=args, callbacks=[cb], ...)
    trainer.train()             # or trainer.train(resume_from_checkpoint=True)
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from typing import Mapping, Optional

try:
    import transformers
except ImportError as exc:
    raise ImportError("offload_ema.integrations.transformers needs Hugging Face transformers: "
                      "pip install transformers") from exc

import torch
import torch.distributed as dist

from offload_ema import layout, resume
from offload_ema.averager import Averager
from offload_ema.hooks import is_deepspeed_optimizer
from offload_ema.integrations import (check_callback_args, is_sharded, on_every_rank,
                                      portable_state, world)

__all__ = ["AveragerCallback", "AverageEvaluationMixin", "AveragerTrainer", "STATE_FILE",
           "rank_state_file"]

STATE_FILE = "offload_ema_averager.pt"
_REBUILD_STAGING = 1 << 20  # bytes: rebuilding an average from a saved state copies nothing
logger = logging.getLogger(__name__)


def rank_state_file(rank: int, world_size: int) -> str:
    """The file in a checkpoint folder that holds global rank ``rank``'s averager state when the
    averages are sharded over ``world_size`` processes (one file per rank)."""
    return f"offload_ema_averager-rank{rank:05d}-of-{world_size:05d}.pt"


def _written_by(name: str) -> int:
    """The number of processes that wrote an averager state file of a checkpoint folder."""
    if name == STATE_FILE:
        return 1
    try:
        return int(name.rsplit("-of-", 1)[1].split(".", 1)[0])
    except (IndexError, ValueError):
        return -1


def _state_files(folder: str) -> list:
    try:
        return sorted(f for f in os.listdir(folder)
                      if f.startswith("offload_ema_averager") and f.endswith(".pt"))
    except OSError:
        return []


def _barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def _on_rank0(fn):
    """``fn()`` on global rank 0, the same value on every rank (rank 0 alone may see the
    checkpoint folder: multi-node without a shared filesystem)."""
    if world()[1] == 1:
        return fn()
    box = [fn() if world()[0] == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _save_atomic(obj, path: str) -> None:
    # A name of its own per process: with save_on_each_node several processes may write the same
    # file on a shared filesystem; each replace is atomic, so readers see one whole file.
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _innermost(optimizer):
    """The torch optimizer under accelerate's / the Trainer's wrappers (its step hooks fire); with
    DeepSpeed, DeepSpeed's optimizer under accelerate's wrapper (whose step does nothing: the
    engine steps inside backward)."""
    while hasattr(optimizer, "optimizer"):
        inner = optimizer.optimizer
        if is_deepspeed_optimizer(inner):
            return inner
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    return optimizer


class AveragerCallback(transformers.TrainerCallback):
    """Keeps averages of the Trainer's model.

    Built at train begin and attached to the optimizer: one snapshot per real optimizer step
    (gradient accumulation respected). The Averager's state is written beside each Trainer
    checkpoint (``checkpoint-N/offload_ema_averager.pt``) and restored when training resumes from
    that checkpoint, so the averages continue exactly. Under torch.distributed with sharded
    averages (DDP, FSDP2) each rank holds its own share, so each rank writes its own file
    (``checkpoint-N/offload_ema_averager-rank00001-of-00002.pt``) and reads it back on resume,
    which must then use the same number of processes. The checkpoint folder is looked up under
    ``args.output_dir``.

    Args:
        averages (Mapping[str, EMA | LAWA]): as for :class:`offload_ema.Averager`.
        evaluate_with (str, optional): after each evaluation, also compute the evaluation loss
            with this average swapped in, by the Trainer's own evaluation loop over the same
            batches (its ``compute_loss`` and loss convention, so it compares with
            ``eval_loss``); reported as ``eval_<name>_loss`` in the metrics.
        save_every / save_path / keep_last: periodic snapshot files (``Averager.save_every``).
        save_pretrained (str, optional): with each Trainer checkpoint, also write this average
            as a model directory ``checkpoint-N/offload_ema-<name>`` that the model class's
            ``from_pretrained`` loads (``Averager.save_pretrained``; a PreTrainedModel).
        **averager_kwargs: more keyword arguments of :class:`offload_ema.Averager`.
    """

    def __init__(self, averages: Mapping, *, evaluate_with: Optional[str] = None,
                 save_every: Optional[int] = None, save_path: Optional[str] = None,
                 keep_last: Optional[int] = None, save_pretrained: Optional[str] = None,
                 **averager_kwargs):
        check_callback_args(averages, evaluate_with, "evaluate_with", save_every, save_path)
        check_callback_args(averages, save_pretrained, "save_pretrained", None, None)
        self.averages = dict(averages)
        self.save_pretrained = save_pretrained
        self.evaluate_with = evaluate_with
        self.save_every, self.save_path, self.keep_last = save_every, save_path, keep_last
        self.averager_kwargs = averager_kwargs
        self.averager: Optional[Averager] = None
        # Set by AverageEvaluationMixin: the Trainer evaluates the average in its own loop.
        self.trainer_evaluates = False

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.averager is None:
            self.averager = Averager(model, self.averages, **self.averager_kwargs)
            if self.save_every is not None:
                self.averager.save_every(self.save_every, self.save_path, keep_last=self.keep_last)
        if state.global_step > 0:  # resuming: the Trainer names checkpoints checkpoint-<step>
            # Every rank resumes (global_step is the same on all), so every rank gets here.
            on_every_rank(lambda: self._load(args, state), "restoring the averager state")
        self.averager.detach()
        self.averager.attach(_innermost(optimizer))

    def on_epoch_end(self, args, state, control, **kwargs):
        # The last hook before the Trainer may load the best checkpoint into the parameters in
        # place (``load_best_model_at_end``, after the loop): the last snapshot's copy must not
        # read those weights. Once per epoch, so it costs nothing.
        if self.averager is not None:
            self.averager.fence()

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.averager.detach()
        self.averager.flush()
        if self._best_average(args, state) and model is not None:
            self._load_best_average(state.best_model_checkpoint, model, self.evaluate_with)

    def _state_path(self, folder: str) -> str:
        """This rank's averager state file in a checkpoint folder."""
        rank, size = world()
        return os.path.join(folder, rank_state_file(rank, size) if is_sharded(self.averager)
                            else STATE_FILE)

    def _best_average(self, args, state) -> bool:
        """Whether the Trainer has just loaded the best checkpoint (``load_best_model_at_end``)
        picked by a metric of the evaluated average, ``eval_<name>_*`` (``eval_<dataset>_<name>_*``
        for a dict of evaluation sets): the only average whose metrics are computed."""
        metric, name = args.metric_for_best_model, self.evaluate_with
        if not (name and args.load_best_model_at_end and metric and state.best_model_checkpoint):
            return False
        if not metric.startswith("eval_"):  # as the Trainer reads it
            metric = f"eval_{metric}"
        return f"_{name}_" in metric[len("eval"):]

    def _load_best_average(self, folder: str, model, name: str) -> None:
        """The Trainer loaded the best checkpoint's raw weights, but the average ``name`` is what
        scored best there: its values, rebuilt from the averager state saved with that
        checkpoint, replace the averaged tensors. Every rank (averages are gathered when
        sharded); one decision for all of them before any collective."""
        keep = None
        if any(layout.is_sharded(p) for p in model.parameters()):
            keep = "the model's parameters are sharded (FSDP / DeepSpeed ZeRO-3)"
        path = self._state_path(folder)
        found = os.path.isfile(path)
        if world()[1] > 1:
            every = [None] * world()[1]
            dist.all_gather_object(every, found)
            found = all(every)
        if keep is None and not found:
            keep = (f"the averager state saved with it is missing on some rank ({path}: a "
                    "checkpoint saved elsewhere, e.g. a hyperparameter-search run, or a node "
                    "that does not see the folder)")
        if keep is not None:
            warnings.warn(
                f"load_best_model_at_end picked {folder} by the {name!r} average's metric, but "
                f"{keep}: the Trainer loaded that checkpoint's raw weights and they are kept "
                f"(save_pretrained={name!r} writes the average beside each checkpoint as a "
                "loadable directory)")
            return
        # No steps follow: the least staging, one snapshot per pass.
        best = Averager(model, self.averages, **{**self.averager_kwargs, "fold": 1,
                                                  "staging_bytes": _REBUILD_STAGING})
        try:
            on_every_rank(lambda: resume.load_into(best, path),
                          f"reading the best checkpoint's averager state {path}")
            if not best.ready(name):
                return
            best._put(model, name)  # the averaged tensors only (frozen ones stay as loaded)
        finally:
            best.close()
        logger.info("loaded the %r average of %s (it scored best) into the model", name, folder)

    def _load(self, args, state) -> None:
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        path = self._state_path(folder)
        _, size = world()
        if not os.path.isfile(path):
            found = _state_files(folder)
            if found and all(_written_by(f) != size for f in found):
                # Written by another number of processes: every file is read and merged, if
                # they hold global states (one process, DDP), which load at any world size.
                states = [resume.load_file(os.path.join(folder, f)) for f in found]
                if all(resume.is_global(st) for st in states):
                    self.averager.load_state_dict(resume.merge_global(states))
                    return
            raise FileNotFoundError(
                f"resuming at step {state.global_step} but {path} is missing: the averages "
                "cannot continue exactly " + (
                    f"(the checkpoint holds {', '.join(found)}, written by a different number of "
                    f"processes than this run's {size}). Resume with as many processes as wrote "
                    "it: with FSDP2 or ZeRO-3 averages each rank holds, and reads back, its own "
                    "share"
                    if found else "(was the checkpoint written with this callback?)"))
        # weights_only (resume.load_file): a checkpoint may come from elsewhere, and loading it
        # must never run code from it; a file that asks to is refused, naming it.
        resume.load_into(self.averager, path)

    def on_save(self, args, state, control, **kwargs):
        # The Trainer calls on_save on every rank after its _save_checkpoint. Rank 0 may be the
        # only one that creates the folder (save_only_model=True skips the per-rank RNG files that
        # make every rank create it), so wait until every rank has got here, rank 0 included.
        _barrier()
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")

        def write():
            # No folder under output_dir: the Trainer saved elsewhere (a hyperparameter-search
            # run directory); nothing to write beside. Resuming from there reports the missing file.
            if self.averager is None or not os.path.isdir(folder):
                return
            # Global names where the averages are plain tensors (one process, DDP): a resume
            # with another number of processes merges the files.
            if is_sharded(self.averager):  # each rank holds a disjoint share: a file per rank
                rank, size = world()
                _save_atomic(portable_state(self.averager),
                             os.path.join(folder, rank_state_file(rank, size)))
            elif args.should_save:  # replicated or one process: one file, beside the Trainer's
                _save_atomic(portable_state(self.averager), os.path.join(folder, STATE_FILE))

        # Its all-gather doubles as the closing barrier: the checkpoint is whole (every rank's file
        # in place) before any rank goes on, e.g. to rank 0 deleting checkpoints beyond
        # save_total_limit at the end of training; and a rank whose write failed fails them all.
        on_every_rank(write, "saving the averager state")
        name = self.save_pretrained
        if name and self.averager is not None and self.averager.ready(name) and \
                _on_rank0(lambda: os.path.isdir(folder)):  # one decision: a collective follows
            # Every rank: sharded averages are gathered to rank 0 (a collective), which writes.
            self.averager.save_pretrained(os.path.join(folder, f"offload_ema-{name}"), name,
                                          model=kwargs.get("model")).result()
            _barrier()  # whole before rank 0 may rotate checkpoints

    def on_evaluate(self, args, state, control, metrics=None, model=None, eval_dataloader=None,
                    **kwargs):
        name = self.evaluate_with
        if self.trainer_evaluates:  # AverageEvaluationMixin runs the Trainer's loop instead
            return
        if not name or self.averager is None or not self.averager.ready(name) or \
                eval_dataloader is None or metrics is None:
            return
        trainer = self._calling_trainer()
        if trainer is None:
            warnings.warn(f"eval_{name}_loss is not reported: on_evaluate was not called by a "
                          "transformers.Trainer holding this callback (its evaluation loop "
                          "computes the loss)")
            return
        # The Trainer's own loop over the batches it has just evaluated, so the loss is its
        # eval_loss convention (compute_loss, a subclass's included; num_items_in_batch; label
        # smoothing; the per-example weighting and de-duplication across ranks) and the two
        # losses compare. Loss only: no predictions gathered, no compute_metrics.
        with self.averager.swapped(model, name):
            out = trainer.evaluation_loop(eval_dataloader, f"Evaluation of the {name!r} average",
                                          prediction_loss_only=True,
                                          metric_key_prefix=f"eval_{name}")
        loss = out.metrics.get(f"eval_{name}_loss")
        if loss is not None:  # None: the batches have no labels (no eval_loss either)
            metrics[f"eval_{name}_loss"] = loss

    def _calling_trainer(self):
        """The Trainer whose evaluate() is calling on_evaluate: callbacks are not handed it, so
        it is the ``self`` of a frame up the stack, the first Trainer holding this callback."""
        frame = sys._getframe(1)
        try:
            while frame is not None:
                obj = frame.f_locals.get("self")
                if isinstance(obj, transformers.Trainer) and \
                        any(c is self for c in obj.callback_handler.callbacks):
                    return obj
                frame = frame.f_back
            return None
        finally:
            del frame  # no reference cycle through the frames


class AverageEvaluationMixin:
    """Mix into a ``Trainer`` class (before it) to evaluate the average through the Trainer's own
    evaluation loop: ``evaluate()`` also runs with the ``AveragerCallback``'s ``evaluate_with``
    average swapped in, under the metric prefix ``<prefix>_<name>`` (``eval_ema_loss``,
    ``eval_ema_accuracy``, ... for "ema"). So every ``compute_metrics`` value and the loss of the
    average reach ``log_history`` and every reporter (TensorBoard, W&B, ...) and can be
    ``metric_for_best_model``.

        class MyTrainer(AverageEvaluationMixin, SFTTrainer): ...
        trainer = AveragerTrainer(model=model, args=args, callbacks=[cb], ...)  # plain Trainer

    Several evaluation datasets (a dict) are each evaluated both ways; extra arguments (e.g.
    ``Seq2SeqTrainer``'s generation settings) reach both. Until the average's first snapshot only
    the raw weights are evaluated. With ``load_best_model_at_end`` and an average's metric, the
    Trainer loads the best checkpoint's raw weights and the callback then replaces them with that
    checkpoint's average, the weights that scored best (not with FSDP / ZeRO-3 sharded
    parameters: a warning says so, and ``save_pretrained=`` of the callback writes the average
    as a loadable directory).
    """

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval",
                 **kwargs):
        cb = next((c for c in self.callback_handler.callbacks
                   if isinstance(c, AveragerCallback)), None)
        if cb is not None:
            cb.trainer_evaluates = True
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix, **kwargs)
        target = eval_dataset if eval_dataset is not None else self.eval_dataset
        name = cb.evaluate_with if cb is not None else None
        if isinstance(target, dict) or not name or cb.averager is None or \
                not cb.averager.ready(name):
            return metrics  # (a dict: evaluate() came back here for each dataset)
        with cb.averager.swapped(self.model, name):
            metrics.update(super().evaluate(eval_dataset, ignore_keys,
                                            f"{metric_key_prefix}_{name}", **kwargs))
        return metrics


class AveragerTrainer(AverageEvaluationMixin, transformers.Trainer):
    """``transformers.Trainer`` with :class:`AverageEvaluationMixin`."""
