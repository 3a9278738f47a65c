"""A drop-in for ``diffusers.training_utils.EMAModel``, kept in host memory by offload_ema.

diffusers' training scripts keep the EMA on the GPU (or, with ``--offload_ema``, move it to the
GPU and back around every ``step``). Swap one import and the same script keeps it in host memory,
updated by the worker thread off the training step::

    # from diffusers.training_utils import EMAModel
    from offload_ema.integrations.diffusers import EMAModel

The constructor, ``step``, ``copy_to``, ``store`` / ``restore``, ``state_dict`` /
``load_state_dict``, ``save_pretrained`` / ``from_pretrained``, ``get_decay``,
``cur_decay_value``, ``optimization_step`` and ``shadow_params`` behave as diffusers' (the same
decay rule, ``(1 + t) / (10 + t)`` or the warm-up ``1 - (1 + t / inv_gamma) ** -power``, clamped to
``[min_decay, decay]``, and ``update_after_step``; a loaded or assigned average continues from its
``optimization_step``; an ``nn.Module`` is accepted where diffusers accepts one, with its
FutureWarning). Where a host-memory average updated by another thread cannot do what diffusers'
does, the drop-in refuses with an error instead of differing silently. Differences:

- ``shadow_params`` is read, not held: each read waits for the pending updates and returns the
  average now as float32 CPU tensors of their own, in parameter order (diffusers': the EMA's own
  tensors, on its device and in the parameters' dtype, updated in place by every ``step``). A
  list read earlier is a snapshot: later steps do not change it, and writing into its tensors does
  not change the average. Assigning a list sets the average (as diffusers' assignment and
  ``load_state_dict`` do); the idiom ``ema.shadow_params = [p.to(d) for p in ema.shadow_params]``
  therefore changes nothing, as the average stays in host memory.
- ``step(parameters)`` averages the parameters given to its first call. Later calls must pass the
  same ones (diffusers' scripts pass the training model's every time); others raise ValueError
  (diffusers would average them, position by position, into the same shadow values). The check
  costs the same whatever the tensor count for the forms scripts use (``model.parameters()``,
  the model, a list); see :meth:`EMAModel.step`.
- The averaged set is fixed at the first ``step``: a parameter frozen then (``requires_grad=
  False``) is reported with its current value, as diffusers' copy of it; unfreezing it later, or
  freezing an averaged one, raises RuntimeError at a later step or read (diffusers would switch
  between averaging and copying it), and so does a parameter replaced in the model by another
  tensor (diffusers would average the new one). Save ``state_dict()`` before the change and load
  it into a new EMAModel built after it: the average continues as diffusers' would.
- ``to(device)`` and ``pin_memory()`` change nothing (the average lives in host memory, float32);
  ``to(dtype=...)`` with another floating dtype raises (diffusers would keep its EMA in it).
- ``step`` fences at once (on a GPU a stream wait, not a host wait). ``ema.attach(optimizer)``
  moves the fence to the optimizer's next step instead, so the copy also overlaps the next
  forward and backward.
- Before the EMA's first update, reads give the values the parameters had when the EMAModel was
  built (before any ``step``), the loaded or assigned values (until the next ``step``), or the
  parameters' current values (after a ``step`` that did not yet start the EMA,
  ``update_after_step``), as diffusers' shadow copy would hold.
- ``from_pretrained`` runs no code from the directory's files: pickle weight files (``.bin``,
  ``.pt``, ...) are first read with ``torch.load(weights_only=True)``; one holding anything but
  tensors is refused with a ValueError naming it.
"""
from __future__ import annotations

import copy
import inspect
import os
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional

import torch
from torch import nn

from offload_ema import resume
from offload_ema.averager import Averager
from offload_ema.averages import Decaying, check_int
from offload_ema.layout import is_dtensor

__all__ = ["EMAModel", "DiffusersDecay"]

_NAME = "ema"
# Parameters the step checks (requires_grad, still in the model), in turn: O(1) per step; a
# change is found within len(parameters) / _CHECKS_PER_STEP steps (every read checks them all).
_CHECKS_PER_STEP = 8
# Files a model class's from_pretrained may unpickle (safetensors and JSON run no code).
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_PARAMETERS_CODE = nn.Module.parameters.__code__


def _deprecated(message: str) -> None:
    """diffusers' ``deprecate(..., standard_warn=False)``: the message as a FutureWarning, pointing
    at the caller of the EMAModel method."""
    warnings.warn(message, FutureWarning, stacklevel=3)


def _module_of(parameters) -> Optional[nn.Module]:
    """The module whose parameters ``parameters`` are, found without iterating them: the module
    itself, or the module of a ``module.parameters()`` generator not started yet (its frame holds
    ``self``). None for anything else (lists, generator expressions, ``filter``, ...)."""
    if isinstance(parameters, nn.Module):
        return parameters
    frame = getattr(parameters, "gi_frame", None)
    if frame is None or frame.f_code is not _PARAMETERS_CODE or \
            inspect.getgeneratorstate(parameters) != inspect.GEN_CREATED:
        return None
    local = frame.f_locals
    module = local.get("self")
    return module if local.get("recurse") is True and isinstance(module, nn.Module) else None


def _check_pickle(path: str) -> None:
    """Raises ValueError naming ``path`` unless it is a ``torch.save`` file of tensors, numbers,
    strings and containers (read with ``weights_only=True``: nothing in it runs)."""
    resume.load_plain(path, "loadable as model weights")


@dataclass(frozen=True)
class DiffusersDecay(Decaying):
    """diffusers' EMA decay for the k-th applied snapshot (k = 1 initialises): with
    ``t = k - 1``, ``(1 + t) / (10 + t)``, or ``1 - (1 + t / inv_gamma) ** -power`` with
    ``use_ema_warmup``, clamped to ``[min_decay, decay]``. ``start`` is ``update_after_step``:
    the first snapshot is that of step ``update_after_step + 1``."""

    decay: float = 0.9999
    min_decay: float = 0.0
    use_ema_warmup: bool = False
    inv_gamma: float = 1.0
    power: float = 2 / 3
    start: int = 0
    every: int = 1

    kind = "diffusers_ema"

    def __post_init__(self):
        for name in ("decay", "min_decay"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v!r}")
        for name in ("inv_gamma", "power"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{name} must be a number > 0, got {v!r}")
        object.__setattr__(self, "start", check_int(self.start, "update_after_step", 0))

    def beta_at(self, k: int) -> float:
        t = k - 1
        if t <= 0:
            return 0.0
        if self.use_ema_warmup:
            value = 1 - (1 + t / self.inv_gamma) ** -self.power
        else:
            value = (1 + t) / (10 + t)
        return max(min(value, self.decay), self.min_decay)

    def config(self) -> dict:
        return {"kind": self.kind, "decay": self.decay, "min_decay": self.min_decay,
                "use_ema_warmup": self.use_ema_warmup, "inv_gamma": self.inv_gamma,
                "power": self.power, "update_after_step": self.start}


class _Params(nn.Module):
    """The averaged parameters as a module (the Averager's unit), in the order given."""

    def __init__(self, params: List[nn.Parameter]):
        super().__init__()
        self.params = nn.ParameterList(params)


class AveragedParameters:
    """The parameters an EMAModel averages, fixed at its first step, and the checks that a
    later step passes the same ones and that the model still holds them as they were, at a
    cost that does not grow with the tensor count on the step (see ``EMAModel.step``)."""

    def __init__(self, params: List[nn.Parameter]):
        self.params = params                       # the first step's parameters, averaged
        self._grad = [p.requires_grad for p in params]  # their requires_grad then
        self._homes: Optional[List[Any]] = None    # (module, attr) holding each, where known
        self._names: List[str] = []                # their names in that model, where known
        self._next_check = 0                       # the next one the step's check looks at
        self._modules = weakref.WeakSet()          # modules whose parameters() are these

    def refresh(self) -> None:
        """The parameters' requires_grad as it is now (an Averager rebuilt on them)."""
        self._grad = [p.requires_grad for p in self.params]

    def check_same(self, parameters) -> None:
        """Raises unless ``parameters`` are the first step's (see ``EMAModel.step`` for the cost)."""
        module = _module_of(parameters)
        if module is not None:
            if module in self._modules:
                return
            given = list(module.parameters())  # a module not seen yet: compared in full, once
            if len(given) == len(self.params) and \
                    all(a is b for a, b in zip(given, self.params)):
                self.known(module)
                return
        else:
            given = parameters if isinstance(parameters, (list, tuple)) else list(parameters)
            n = len(self.params)
            if len(given) == n and all(given[i] is self.params[i] for i in (0, n // 2, n - 1)):
                return
        raise ValueError(
            f"step() got other parameters than its first step() ({len(given)} tensors, "
            f"{len(self.params)} averaged): offload_ema's EMAModel averages the parameters given "
            "to its first step(), where diffusers' would average these into the same shadow "
            "values. Pass the same parameters each step, or build a new EMAModel for others "
            "(load_state_dict(old.state_dict()) continues the average)")

    def known(self, module: nn.Module) -> None:
        """``module.parameters()`` are the averaged parameters: later steps may pass it without
        a comparison; the first such module also tells where each parameter is held (the
        step's check then notices one replaced in it) and its name."""
        self._modules.add(module)
        if self._homes is not None:
            return
        where = {}
        for mod_name, sub in module.named_modules():
            for attr, p in sub._parameters.items():
                if p is not None and id(p) not in where:
                    where[id(p)] = (sub, attr, f"{mod_name}.{attr}".lstrip("."))
        homes = [where[id(p)] for p in self.params]
        self._homes = [(sub, attr) for sub, attr, _ in homes]
        self._names = [name for _, _, name in homes]

    def check(self, count: Optional[int], cause: Optional[BaseException] = None) -> None:
        """Raises if a parameter's requires_grad changed since the first step, or (where the
        model is known) the model holds another tensor in its place: ``count`` parameters in turn
        (the step's O(1) share), or all (``None``: reads, and after a worker error)."""
        n = len(self.params)
        if count is None:
            order = range(n)
        else:
            order = [(self._next_check + k) % n for k in range(min(count, n))]
            self._next_check = (self._next_check + len(order)) % n
        homes = self._homes
        for i in order:
            p = self.params[i]
            if p.requires_grad != self._grad[i]:
                self._raise_changed(i, "unfrozen" if p.requires_grad else "frozen", cause)
            if homes is not None:
                module, attr = homes[i]
                now = module._parameters.get(attr)
                if now is not p and not (is_dtensor(p) and now is not None and
                                         not is_dtensor(now) and now.shape == p.shape):
                    # (FSDP2 registers the gathered parameter between a forward and reshard.)
                    self._raise_changed(i, "replaced", cause)

    def _raise_changed(self, i: int, how: str, cause: Optional[BaseException]) -> None:
        p = self.params[i]
        name = f" ({self._names[i]!r})" if self._names else ""
        what = {
            "unfrozen": "unfrozen (requires_grad=True) after the EMAModel's first step: "
                        "diffusers' EMAModel would average it from now on, offload_ema's reports "
                        "it as it is",
            "frozen": "frozen (requires_grad=False) after the EMAModel's first step: diffusers' "
                      "EMAModel would copy it from now on, offload_ema's would go on averaging it",
            "replaced": "replaced by another tensor in the model after the EMAModel's first "
                        "step: diffusers' EMAModel would average the new one from now on, "
                        "offload_ema's the old one"}[how]
        raise RuntimeError(
            f"parameter {i}{name} (shape {list(p.shape)}) was {what}. The averaged parameters "
            "are fixed at the first step(): save ema.state_dict() before the change and load it "
            "into a new EMAModel built after it") from cause


class EMAModel:
    """diffusers' ``EMAModel``, with the average kept in host memory and updated off the
    training step (see the module doc for the differences)."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter], decay: float = 0.9999,
                 min_decay: float = 0.0, update_after_step: int = 0,
                 use_ema_warmup: bool = False, inv_gamma: float = 1.0, power: float = 2 / 3,
                 foreach: bool = False, model_cls: Optional[Any] = None,
                 model_config: Optional[Dict[str, Any]] = None, **kwargs):
        if isinstance(parameters, nn.Module):  # diffusers' deprecated form, same meaning
            _deprecated("Passing a `torch.nn.Module` to `ExponentialMovingAverage` is deprecated. "
                        "Please pass the parameters of the module instead.")
            parameters = parameters.parameters()
            use_ema_warmup = True  # as diffusers, for backwards compatibility
        if kwargs.get("max_value") is not None:  # `is not None`, as diffusers: 0.0 counts
            _deprecated("The `max_value` argument is deprecated. Please use `decay` instead.")
            decay = kwargs["max_value"]
        if kwargs.get("min_value") is not None:
            _deprecated("The `min_value` argument is deprecated. Please use `min_decay` instead.")
            min_decay = kwargs["min_value"]
        kwargs.pop("max_value", None)
        kwargs.pop("min_value", None)
        if kwargs.pop("device", None) is not None:
            _deprecated("The `device` argument is deprecated. Please use `to` instead.")
        if kwargs:
            raise TypeError(f"EMAModel got unexpected arguments: {', '.join(sorted(kwargs))}")
        params = list(parameters)
        if not params:
            raise ValueError("parameters is empty: pass the model's parameters")
        self.decay, self.min_decay = decay, min_decay
        self.update_after_step = update_after_step
        self.use_ema_warmup, self.inv_gamma, self.power = use_ema_warmup, inv_gamma, power
        self.foreach = foreach
        self.model_cls, self.model_config = model_cls, model_config
        self.optimization_step = 0
        self.cur_decay_value: Optional[float] = None
        self.temp_stored_params: Optional[List[torch.Tensor]] = None
        self._spec()  # bad arguments fail here, naming them
        # diffusers' shadow values where the Averager does not hold them: as built (before the
        # first step), or as loaded / assigned (until the next step). What reads report then;
        # the first step seeds the Averager with them.
        self._shadow: Optional[List[torch.Tensor]] = [_host(p) for p in params]
        self._exact: Optional[dict] = None  # a loaded Averager state, applied at the first step
        self._exact_or_shadow = False  # loaded with shadow values: those, if it does not fit
        self._averager: Optional[Averager] = None
        self._stepped: Optional[_Params] = None
        self._built: Optional[DiffusersDecay] = None  # the Averager's settings
        self._checked: Optional[AveragedParameters] = None  # set by the first step
        self._optimizers: List[Any] = []
        self._fence_handles: List[Any] = []

    def _spec(self) -> DiffusersDecay:
        return DiffusersDecay(decay=float(self.decay), min_decay=float(self.min_decay),
                              use_ema_warmup=bool(self.use_ema_warmup),
                              inv_gamma=float(self.inv_gamma), power=float(self.power),
                              start=self.update_after_step)

    # ---- diffusers' API -----------------------------------------------------------------------
    def get_decay(self, optimization_step: int) -> float:
        """The decay diffusers uses at ``optimization_step`` (0 until the EMA starts)."""
        return self._spec().beta_at(int(optimization_step) - self.update_after_step)

    @torch.no_grad()
    def step(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """diffusers' ``step``: counts an optimization step and averages ``parameters``.

        The first call fixes the parameters averaged. Later calls are checked to pass the same
        ones without iterating them where that is possible, so the training thread's cost does not
        grow with the tensor count: ``model`` or ``model.parameters()`` (identified by the module,
        compared in full the first time a module is seen), a list or tuple (its length and its
        first, middle and last tensors). Another iterable (a generator expression, ``filter``) is
        read into a list first, as diffusers' ``step`` reads it, then checked as a list. Each step
        also checks a few parameters in turn (every read checks all) for a changed
        ``requires_grad`` and, once a step got the model (``model`` or ``model.parameters()``),
        for a parameter replaced in it (``module.weight = nn.Parameter(...)``,
        ``load_state_dict(assign=True)``); with lists alone, a replaced parameter is noticed only
        at their first, middle or last position.

        Raises:
            ValueError: other parameters than the first call's (the step is not counted).
            RuntimeError: a parameter frozen, unfrozen or replaced in the model since the first
                call (see the module doc; the step is not counted).
        """
        if isinstance(parameters, nn.Module):
            _deprecated("Passing a `torch.nn.Module` to `ExponentialMovingAverage.step` is "
                        "deprecated. Please pass the parameters of the module instead.")
        if self._averager is None:
            self._start(parameters)
        else:
            self._checked.check_same(parameters)
            self._checked.check(_CHECKS_PER_STEP)
        try:
            self._averager.step(fence=not self._optimizers)
        except Exception as exc:  # a frozen parameter the worker found: say it in our terms
            self._checked.check(None, cause=exc)
            raise
        self._shadow = None  # the step replaced diffusers' shadow values by the average's
        self.optimization_step += 1
        self.cur_decay_value = self.get_decay(self.optimization_step)

    def attach(self, *optimizers: torch.optim.Optimizer) -> "EMAModel":
        """offload_ema's addition: fence before each step of these optimizers instead of in
        ``step()``, so the copy of a snapshot overlaps the next forward and backward too."""
        for opt in optimizers:
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(f"attach takes torch optimizers, got {type(opt).__name__}")
        me = self

        def fence(*_):
            if me._averager is not None:
                me._averager.fence()
        self._fence_handles += [opt.register_step_pre_hook(fence) for opt in optimizers]
        self._optimizers += list(optimizers)
        return self

    @property
    def shadow_params(self) -> List[torch.Tensor]:
        """The average now, one float32 CPU tensor per parameter in parameter order, after the
        pending updates are applied. Copies: later steps do not change them and writing into them
        does not change the average; assign a list to set it (see the module doc). Each read
        copies the whole average: read it once into a variable, not once per tensor."""
        return self._values()

    @shadow_params.setter
    def shadow_params(self, values: List[torch.Tensor]) -> None:
        self._set_shadow(values)
        if self._averager is not None:
            self._seed(self._shadow)

    def copy_to(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        values = self._values()
        params = list(parameters)
        if len(params) != len(values):
            raise ValueError(f"copy_to got {len(params)} parameters, the EMA holds {len(values)}")
        with torch.no_grad():
            for p, v in zip(params, values):
                p.data.copy_(v.to(p.device))

    def store(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        self.temp_stored_params = [p.detach().cpu().clone() for p in parameters]

    def restore(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        if self.temp_stored_params is None:
            raise RuntimeError("This ExponentialMovingAverage has no `store()`ed weights to "
                               "`restore()`")
        with torch.no_grad():
            for c, p in zip(self.temp_stored_params, parameters):
                p.data.copy_(c.data)
        self.temp_stored_params = None

    def to(self, device=None, dtype=None, non_blocking: bool = False) -> None:
        """Accepted for compatibility: the average stays in host memory, in float32. Another
        floating dtype is refused: diffusers would keep (and update) its EMA in that dtype."""
        if dtype is not None and torch.empty((), dtype=dtype).is_floating_point() and \
                dtype != torch.float32:
            raise ValueError(f"EMAModel.to(dtype={dtype}): diffusers' EMAModel would keep its "
                             "EMA in that dtype from now on; offload_ema's keeps it in float32 in "
                             "host memory (it costs no GPU memory). Call to() without a dtype")

    def pin_memory(self) -> None:
        """Accepted for compatibility: staging is pinned already where it matters (GPUs)."""

    def state_dict(self) -> dict:
        """diffusers' keys (``shadow_params``: float32 CPU copies of the average, in parameter
        order), plus this class's exact state (``offload_ema``) for resuming bit for bit."""
        out = {"decay": self.decay, "min_decay": self.min_decay,
               "optimization_step": self.optimization_step,
               "update_after_step": self.update_after_step,
               "use_ema_warmup": self.use_ema_warmup, "inv_gamma": self.inv_gamma,
               "power": self.power, "shadow_params": self._values()}
        if self._averager is not None:
            out["offload_ema"] = self._averager._rank_state_dict()
        elif self._exact is not None:  # loaded, not yet stepped: handed on as it came
            out["offload_ema"] = self._exact
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """diffusers' ``load_state_dict``: settings, ``optimization_step`` and ``shadow_params``
        (each optional); the average continues from them at ``optimization_step``, as
        diffusers' does. This class's exact state (``offload_ema``) is used where it matches
        them; otherwise the shadow values are."""
        state_dict = copy.deepcopy(state_dict)
        for key, kind in (("decay", (float, int)), ("min_decay", (float, int)),
                          ("optimization_step", int), ("update_after_step", int),
                          ("use_ema_warmup", bool), ("inv_gamma", (float, int)),
                          ("power", (float, int))):
            if key in state_dict:
                value = state_dict[key]
                if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                    raise ValueError(f"Invalid {key}: {value!r}")
                setattr(self, key, value)
        self._spec()
        shadow = state_dict.get("shadow_params")
        if shadow is not None:
            self._set_shadow(shadow)
        exact = state_dict.get("offload_ema")
        if exact is not None and not self._matches(exact):
            if shadow is None:
                raise ValueError("state_dict['offload_ema'] was saved at another step or with "
                                 "other settings than the state_dict's own, and it has no "
                                 "shadow_params to continue from")
            exact = None  # stale: the shadow values carry diffusers' state
        if self._averager is None:
            if exact is not None or shadow is not None:  # the newest state wins
                self._exact, self._exact_or_shadow = exact, shadow is not None
            return
        if self._built != self._spec():  # new settings: a new Averager, the values so far
            self._shadow = self._values(check=False)
            self._rebuild()
        if exact is not None:
            try:
                self._averager.load_state_dict(exact)
                self._shadow = None
                return
            except ValueError:  # another model's (e.g. other parameters frozen then)
                if shadow is None:
                    raise
        # A diffusers-style state (or settings only: the values so far), at optimization_step;
        # reads give them until the next step, also where the EMA has not started.
        self._shadow = self._values(check=False)
        self._seed(self._shadow)

    def save_pretrained(self, path: str) -> None:
        if self.model_cls is None:
            raise ValueError("`save_pretrained` can only be used if `model_cls` was defined at "
                             "__init__.")
        if self.model_config is None:
            raise ValueError("`save_pretrained` can only be used if `model_config` was defined "
                             "at __init__.")
        model = self.model_cls.from_config(self.model_config)
        state = self.state_dict()
        state.pop("shadow_params", None)
        state.pop("offload_ema", None)
        model.register_to_config(**state)
        self.copy_to(model.parameters())
        model.save_pretrained(path)

    @classmethod
    def from_pretrained(cls, path: str, model_cls, foreach: bool = False) -> "EMAModel":
        """diffusers' ``from_pretrained``: the EMA saved by :meth:`save_pretrained`, continuing
        at its ``optimization_step``. In a local directory, every pickle file (the weights a
        model class may unpickle) is first read with ``weights_only=True``: one that holds
        anything else raises ValueError naming it, and nothing in it runs."""
        if os.path.isdir(path):
            for name in sorted(os.listdir(path)):
                full = os.path.join(path, name)
                if name.endswith(_PICKLE_SUFFIXES) and os.path.isfile(full):
                    _check_pickle(full)
        _, ema_kwargs = model_cls.from_config(path, return_unused_kwargs=True)
        model = model_cls.from_pretrained(path)
        ema = cls(model.parameters(), model_cls=model_cls, model_config=model.config,
                  foreach=foreach)
        ema.load_state_dict(ema_kwargs)  # the weights are the shadow values (see __init__)
        return ema

    # ---- offload_ema's side ---------------------------------------------------------------------
    @property
    def averager(self) -> Optional[Averager]:
        """The Averager behind this EMA (built at the first ``step``)."""
        return self._averager

    def close(self) -> None:
        """Stops the worker (also done at interpreter exit)."""
        for h in self._fence_handles:
            h.remove()
        self._fence_handles = []
        if self._averager is not None:
            self._averager.close()

    def _start(self, parameters) -> None:
        """The first step: builds the Averager over ``parameters``, continuing from a loaded
        state or from the shadow values at ``optimization_step``. Nothing changes on an error."""
        module = _module_of(parameters)
        params = list(module.parameters() if module is not None else parameters)
        self._check_like_shadow(params, "step got")
        self._build(params)
        try:
            loaded = False
            if self._exact is not None:
                try:
                    self._averager.load_state_dict(self._exact)
                    loaded = True
                except ValueError:  # another model's (e.g. other parameters frozen then)
                    if not self._exact_or_shadow:
                        raise
            if not loaded and self.optimization_step > 0:  # resumed: continues at this step
                self._seed(self._shadow)
        except BaseException:
            self._averager.close()
            self._averager, self._stepped, self._checked = None, None, None
            raise
        self._exact = None
        if module is not None:
            self._checked.known(module)

    def _build(self, params: List[nn.Parameter]) -> None:
        stepped = _Params(params)
        # Not sharded: every process keeps the whole EMA, as diffusers' class does (its scripts
        # read it on the main process only, e.g. copy_to before saving the pipeline).
        self._averager = Averager(stepped, {_NAME: self._spec()}, shard=False)
        self._stepped, self._built = stepped, self._spec()
        if self._checked is not None and self._checked.params is params:  # a rebuild
            self._checked.refresh()
        else:
            self._checked = AveragedParameters(params)

    def _rebuild(self) -> None:
        """A new Averager with the current settings on the same parameters (its state is set
        by the caller)."""
        self._averager.close()
        self._averager = None
        self._build(self._checked.params)

    def _seed(self, values: List[torch.Tensor]) -> None:
        """Sets the Averager to diffusers' state: ``values`` after the snapshots of steps
        ``update_after_step + 1 .. optimization_step``, its step count at ``optimization_step``
        (so the EMA starts when diffusers' does). Before the EMA started only the count matters:
        the first snapshot initialises the average."""
        avg = self._averager
        applied = max(0, self.optimization_step - self.update_after_step)
        names = [f"params.{i}" for i in range(len(values))]
        state = resume.seeded(avg._rank_state_dict(), avg._layout, _NAME, dict(zip(names, values)),
                              applied, self.optimization_step)
        if not applied:
            state["averages"][_NAME]["last_step"] = 0  # no snapshot applied yet
        avg.load_state_dict(state)

    def _set_shadow(self, values) -> None:
        """Checks ``values`` as diffusers' shadow values of this EMA's parameters (a list of
        tensors, one per parameter, of their shapes) and keeps host float32 copies of them."""
        if not isinstance(values, list):
            raise ValueError("shadow_params must be a list")
        if not all(isinstance(t, torch.Tensor) for t in values):
            raise ValueError("shadow_params must all be Tensors")
        self._check_like_shadow(values, "shadow_params has")
        self._shadow = [_host(t) for t in values]

    def _check_like_shadow(self, tensors, what: str) -> None:
        ref = self._checked.params if self._checked is not None else self._shadow
        if len(tensors) != len(ref):
            raise ValueError(f"{what} {len(tensors)} tensors, this EMAModel averages "
                             f"{len(ref)} parameters")
        for i, (t, r) in enumerate(zip(tensors, ref)):
            if t.shape != r.shape:
                raise ValueError(f"{what} a tensor of shape {list(t.shape)} at position {i}, the "
                                 f"parameter there has shape {list(r.shape)}")

    def _matches(self, exact) -> bool:
        """Whether an Averager state is at this EMA's step, with its settings."""
        try:
            if resume.is_global(exact):  # (an Averager's state_dict(), saved by hand)
                exact = resume.read_meta(exact[resume.META_KEY])
            return exact["step"] == self.optimization_step and \
                exact["averages"][_NAME]["config"] == self._spec().config()
        except (TypeError, KeyError, ValueError):
            return False

    def _values(self, check: bool = True) -> List[torch.Tensor]:
        """diffusers' shadow values now (float32 CPU copies): the loaded / assigned ones until
        the next step, else the average, else (before the EMA started) the parameters."""
        if self._shadow is not None:
            return [t.clone() for t in self._shadow]
        if check:
            self._checked.check(None)
        avg = self._averager
        if avg.ready(_NAME):
            sd = avg.averaged_state_dict(_NAME)
            return [sd[f"params.{i}"] for i in range(len(self._checked.params))]
        # update_after_step not reached: diffusers' shadow copies the parameters at each step.
        return [_host(p) for p in self._checked.params]


def _host(t: torch.Tensor) -> torch.Tensor:
    """A host copy of ``t`` (float32 if floating): a shadow value as this class holds it."""
    t = t.detach()
    return t.to("cpu", torch.float32, copy=True) if t.is_floating_point() else \
        t.to("cpu", copy=True)
