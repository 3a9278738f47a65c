"""Where an Averager meets the outside world's callbacks: ``optimizer.step`` pre- and post-hooks
(``OptimizerHooks``), the interpreter's exit, and garbage collection of an unclosed Averager."""
from __future__ import annotations

import atexit
import os
import sys
import threading
import warnings
import weakref
from typing import Dict, Optional, Sequence

import torch

__all__ = ["OptimizerHooks", "DeepSpeedHooks", "step_hooks", "is_deepspeed_optimizer",
           "close_at_exit", "release"]


def _compiler_disable(fn):
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return disable(fn) if disable is not None else fn


def _is_compiling() -> bool:
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    if is_compiling is None:  # torch < 2.3
        is_compiling = getattr(getattr(torch, "_dynamo", None), "is_compiling", lambda: False)
    return is_compiling()


class OptimizerHooks:
    """Step hooks on one or more optimizers over one model: the pre-hooks fence the last copy;
    once every optimizer has stepped, the post-hook takes the step's snapshot (with GradScaler's
    ``found_inf`` when a fused optimizer carries one). Training thread only.

    Several optimizers: GradScaler skips the step of an optimizer whose own gradients are not
    finite (a non-fused one is then not called at all), so "every optimizer has stepped" may not
    come. A training step that ended with some of them skipped is recognised when the next one
    begins, before anything changes the parameters or buffers: at the model's next forward (a
    forward pre-hook), or at the pre-hook of an optimizer that already stepped. Its snapshot is
    taken then, holding what the optimizers that did step wrote; ``settle()`` takes it at once
    (flush, reads and close on the training thread call it). With one optimizer a step is never
    left pending, except by an interrupt in the post-hook: that step is not counted."""

    def __init__(self, averager, optimizers: Sequence[torch.optim.Optimizer], layout,
                 model: Optional[torch.nn.Module] = None):
        if not optimizers:
            raise TypeError("attach needs at least one optimizer")
        for i, opt in enumerate(optimizers):
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(f"optimizers[{i}] must be a torch.optim.Optimizer, got "
                                f"{type(opt).__name__}")
        layout.check_optimizers(optimizers)
        # Weak: hooks left on a live optimizer do not keep a dropped Averager alive.
        me, expected = weakref.ref(averager), len(optimizers)
        stepped: Dict[int, Optional[torch.Tensor]] = {}
        in_step = [False]  # between an optimizer's pre- and post-hook (a closure's forward)

        def take(avg) -> None:
            flags = [f for f in stepped.values() if isinstance(f, torch.Tensor)]
            stepped.clear()  # (an interrupt after it: the step is not counted, wholly)
            found_inf = None
            if len(flags) == 1:
                found_inf = flags[0]
            elif flags:
                found_inf = torch.stack([f.reshape(-1)[0].to(flags[0].device) for f in flags]).sum()
            avg._step(False, found_inf)

        # Disabled for torch.compile: a compiled optimizer step runs the hooks eagerly instead of
        # tracing the engine's lock, queue and timers into its graph.
        @_compiler_disable
        def pre_hook(opt, args, kwargs):
            avg = me()
            if avg is None or avg._closed:
                return
            if stepped and id(opt) in stepped:
                settle()  # the last training step: a new one begins with this optimizer
            in_step[0] = True
            avg.fence()

        @_compiler_disable
        def post_hook(opt, args, kwargs):
            avg = me()
            if avg is None or avg._closed:
                return
            in_step[0] = False
            stepped[id(opt)] = getattr(opt, "found_inf", None)  # set by GradScaler if fused
            if len(stepped) >= expected:
                take(avg)

        def settle() -> None:
            avg = me()
            if not stepped or avg is None or avg._closed:
                return
            if expected == 1:
                stepped.clear()  # only an interrupt leaves it here: the step is not counted
            else:
                take(avg)

        # Not compiler-disabled (a graph break would fail fullgraph=True): traced, it returns at
        # once, and a compiled forward leaves a pending step to the next optimizer's pre-hook.
        def forward_hook(module, args):
            if _is_compiling() or not stepped or in_step[0]:
                return  # (in a step: a closure optimizer's own forward)
            avg = me()
            if avg is not None and threading.get_ident() == avg._training_thread:
                settle()  # before this forward changes the module buffers

        self.settle = settle
        self._handles = []
        for opt in optimizers:
            self._handles += [opt.register_step_pre_hook(pre_hook),
                              opt.register_step_post_hook(post_hook)]
        if expected > 1:
            target = model if model is not None else layout.model
            self._handles.append(target.register_forward_pre_hook(forward_hook))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def is_deepspeed_optimizer(obj) -> bool:
    """DeepSpeed's ZeRO / mixed-precision optimizers: not torch optimizers (no step hooks)."""
    return type(obj).__module__.startswith("deepspeed.") and \
        not isinstance(obj, torch.optim.Optimizer) and callable(getattr(obj, "step", None))


def step_hooks(averager, targets: Sequence[object], layout, model=None):
    """The hooks for what ``attach`` was given: torch optimizers, or one DeepSpeed engine (or
    its optimizer)."""
    from offload_ema.layout import is_deepspeed_engine
    engine = None
    if len(targets) == 1 and is_deepspeed_engine(targets[0]):
        engine, targets = targets[0], (targets[0].optimizer,)
        if targets[0] is None:
            raise ValueError("the DeepSpeed engine has no optimizer (built without one?); "
                             "attach needs the engine of a training run")
    if len(targets) == 1 and is_deepspeed_optimizer(targets[0]):
        return DeepSpeedHooks(averager, targets[0], layout, engine)
    return OptimizerHooks(averager, targets, layout, model)


class DeepSpeedHooks:
    """A DeepSpeed ZeRO (stage 1-3) or mixed-precision optimizer: its ``step`` is where
    DeepSpeed writes the parameters (stages 1-2) or their partitions (stage 3), once per real
    optimizer step (at gradient-accumulation boundaries). It is wrapped on the instance: the
    fence runs before it, and the snapshot is taken after it unless it skipped the update (an
    fp16 loss-scale overflow sets ``overflow``). Attached through the engine, its
    ``load_checkpoint`` (which writes the parameters in place) is fenced too. Training thread
    only."""

    def __init__(self, averager, optimizer, layout, engine=None):
        layout.check_unchanged()
        me = weakref.ref(averager)  # the wrapper on a live optimizer must not keep it alive
        inner = optimizer.step
        self._engine, self._load = None, None
        if engine is not None:
            inner_load = engine.load_checkpoint

            def load_checkpoint(*args, **kwargs):
                avg = me()
                if avg is not None and not avg._closed:
                    # The snapshot still being copied must not read the loaded weights.
                    avg.fence()
                return inner_load(*args, **kwargs)
            engine.load_checkpoint = load_checkpoint
            self._engine, self._load = engine, load_checkpoint

        @_compiler_disable
        def step(*args, **kwargs):
            avg = me()
            if avg is None or avg._closed:
                return inner(*args, **kwargs)
            avg.fence()
            out = inner(*args, **kwargs)
            if not getattr(optimizer, "overflow", False):
                avg._step(False, None)
            return out

        optimizer.step = step
        self._optimizer, self._step = optimizer, step

    def settle(self) -> None:
        """(Every DeepSpeed step is whole: nothing is ever left pending.)"""

    def remove(self) -> None:
        opt, self._optimizer = self._optimizer, None
        if opt is not None and opt.__dict__.get("step") is self._step:
            del opt.step  # the class's step again
        engine, self._engine = self._engine, None
        if engine is not None and engine.__dict__.get("load_checkpoint") is self._load:
            del engine.load_checkpoint


_open: "weakref.WeakSet" = weakref.WeakSet()


def close_at_exit(averager) -> None:
    """Closes ``averager`` at interpreter exit if it is still open then."""
    _open.add(averager)


@atexit.register
def _close_open_averagers():
    # Drain and stop workers, and finish pending saves, before the interpreter tears torch down
    # under them. A snapshot that could not be written must not end in a silent exit status 0.
    failed = False
    for avg in list(_open):
        try:
            avg.close()
        except BaseException as exc:  # the process is exiting: report, never raise
            failed = True
            print(f"offload_ema: an Averager failed while closing at exit (a pending snapshot "
                  f"may be missing): {exc!r}", file=sys.stderr)
    if failed:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


def release(engine, writer, dropped: bool = True) -> None:
    """Stops an Averager's threads and frees its staging; also when it is garbage-collected
    unclosed (``dropped``: holds no reference to it, and warns of an error nobody saw)."""
    engine.close()
    writer.close()
    if dropped and engine.unreported_error() is not None:
        warnings.warn(f"an offload_ema Averager was dropped unclosed with an unreported worker "
                      f"error: {engine.unreported_error()!r}", RuntimeWarning)
