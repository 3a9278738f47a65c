"""A drop-in for ``diffusers.training_utils.EMAModel``, kept in host memory by offload_ema.

diffusers' training scripts keep the EMA on the GPU (or, with ``--offload_ema``, move it to the
GPU and back around every ``step``). Swap one import and the same script keeps it in host memory,
updated by the worker thread off the training step::

    # from diffusers.training_utils import EMAModel
    from offload_ema.integrations.diffusers import EMAModel

The constructor, ``step``, ``copy_to``, ``store`` / ``restore``, ``state_dict`` /
``load_state_dict``, ``save_pretrained`` / ``from_pretrained``, ``get_decay``,
``cur_decay_value`` and ``optimization_step`` behave as diffusers' (the same decay rule,
``(1 + t) / (10 + t)`` or the warm-up ``1 - (1 + t / inv_gamma) ** -power``, clamped to
``[min_decay, decay]``, and ``update_after_step``); ``to()`` and ``pin_memory()`` are accepted and
change nothing (the average lives in host memory). Differences:

- ``step(parameters)`` averages the parameters given to its first call (diffusers' scripts pass
  the training model's parameters every time; a later call's argument is not re-read, so the
  per-step cost does not grow with the model's tensor count).
- ``step`` fences at once (on a GPU a stream wait, not a host wait). ``ema.attach(optimizer)``
  moves the fence to the optimizer's next step instead, so the copy also overlaps the next
  forward and backward.
- Before the EMA's first update, ``copy_to`` writes the values the parameters had when the
  EMAModel was built (before any ``step``) or their current values (after a ``step`` that did not
  yet start the EMA, ``update_after_step``), as diffusers' shadow copy would hold.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional

import torch
from torch import nn

from offload_ema import resume
from offload_ema.averager import Averager
from offload_ema.averages import Decaying, check_int

__all__ = ["EMAModel", "DiffusersDecay"]

_NAME = "ema"


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


class EMAModel:
    """diffusers' ``EMAModel``, with the average kept in host memory and updated off the
    training step (see the module doc for the differences)."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter], decay: float = 0.9999,
                 min_decay: float = 0.0, update_after_step: int = 0,
                 use_ema_warmup: bool = False, inv_gamma: float = 1.0, power: float = 2 / 3,
                 foreach: bool = False, model_cls: Optional[Any] = None,
                 model_config: Optional[Dict[str, Any]] = None, **kwargs):
        if isinstance(parameters, nn.Module):  # diffusers' deprecated form, same meaning
            parameters = parameters.parameters()
            use_ema_warmup = True
        decay = kwargs.pop("max_value", None) or decay
        min_decay = kwargs.pop("min_value", None) or min_decay
        kwargs.pop("device", None)  # host memory whatever was asked
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
        # diffusers' shadow copy as built: what copy_to writes before any step (then dropped).
        self._initial: Optional[List[torch.Tensor]] = [p.detach().to("cpu", copy=True)
                                                       for p in params]
        self._averager: Optional[Averager] = None
        self._stepped: Optional[_Params] = None
        self._seed: Optional[List[torch.Tensor]] = None  # load_state_dict's shadow values
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
        if self._averager is None:
            self._start(parameters)
        self.optimization_step += 1
        self.cur_decay_value = self.get_decay(self.optimization_step)
        self._averager.step(fence=not self._optimizers)

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
        """Accepted for compatibility: the average stays in host memory, in float32."""

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
            out["offload_ema"] = self._averager.state_dict()
        elif isinstance(self._seed, dict):  # loaded, not yet stepped: handed on as it came
            out["offload_ema"] = self._seed
        return out

    def load_state_dict(self, state_dict: dict) -> None:
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
        exact = state_dict.get("offload_ema")
        shadow = state_dict.get("shadow_params")
        if shadow is not None and not isinstance(shadow, list):
            raise ValueError("shadow_params must be a list")
        if self._averager is not None and \
                self._averager.state_dict()["averages"][_NAME]["config"] != self._spec().config():
            # New settings: a new Averager on the same parameters, which keeps the average so far
            # unless the state brings one.
            kept = self._averager.state_dict()
            kept["averages"][_NAME]["config"] = self._spec().config()
            params = list(self._stepped.params)
            self._averager.close()
            self._averager = None
            self._build(params)
            if exact is None and shadow is None:
                self._averager.load_state_dict(kept)
        if exact is not None and self._averager is not None:
            self._averager.load_state_dict(exact)
            self._seed = None
        elif exact is not None:
            self._seed = exact  # applied when step() builds the Averager
            if shadow is not None:  # what copy_to / state_dict report until then
                self._initial = [t.detach().to("cpu", copy=True) for t in shadow]
        elif shadow is not None:
            self._seed = [t.detach().to("cpu", torch.float32, copy=True) for t in shadow]
            if self._averager is not None:
                self._apply_seed()
            else:  # what copy_to writes until the first step
                self._initial = [t.detach().to("cpu", copy=True) for t in shadow]

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
        _, ema_kwargs = model_cls.from_config(path, return_unused_kwargs=True)
        model = model_cls.from_pretrained(path)
        ema = cls(model.parameters(), model_cls=model_cls, model_config=model.config,
                  foreach=foreach)
        ema.load_state_dict(ema_kwargs)
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
        params = list(parameters)
        if self._initial is not None and len(params) != len(self._initial):
            raise ValueError(f"step got {len(params)} parameters, EMAModel was built with "
                             f"{len(self._initial)}")
        self._build(params)

    def _build(self, params: List[nn.Parameter]) -> None:
        self._stepped = _Params(params)
        # Not sharded: every process keeps the whole EMA, as diffusers' class does (its scripts
        # read it on the main process only, e.g. copy_to before saving the pipeline).
        self._averager = Averager(self._stepped, {_NAME: self._spec()}, shard=False)
        self._initial = None  # diffusers' construction-time copy: not needed any more
        if self._seed is not None:
            if isinstance(self._seed, dict):
                self._averager.load_state_dict(self._seed)
                self._seed = None
            else:
                self._apply_seed()

    def _apply_seed(self) -> None:
        """Starts the EMA from diffusers-style shadow values: as if the snapshots of the steps
        taken so far had given exactly these values."""
        shadow, self._seed = self._seed, None
        applied = max(0, self.optimization_step - self.update_after_step)
        if applied == 0:
            return  # the EMA has not started: its first snapshot initialises it
        names = [f"params.{i}" for i in range(len(shadow))]
        state = resume.seeded(self._averager.state_dict(), self._averager._layout, _NAME,
                              dict(zip(names, shadow)), applied, self.optimization_step)
        self._averager.load_state_dict(state)

    def _values(self) -> List[torch.Tensor]:
        """The average per parameter (float32 CPU); before the EMA started, what diffusers'
        shadow copy would hold."""
        avg = self._averager
        if avg is not None and avg.ready(_NAME):
            sd = avg.averaged_state_dict(_NAME)
            return [sd[f"params.{i}"] for i in range(len(self._stepped.params))]
        if avg is not None and self.optimization_step > 0:  # update_after_step not reached
            return [p.detach().to("cpu", torch.float32, copy=True) for p in self._stepped.params]
        return [t.float() for t in self._initial]
