"""Step-overhead benchmark: what keeping weight averages costs a training step.

Trains the built-in GPT-style model (offload_ema.gpt) on synthetic tokens with AdamW and times
the step under each averaging mode, in one process, in interleaved rounds (so drift on a shared
machine hits every mode alike):

  none          no averaging: the reference step time
  naive         after each step, p.detach().float().cpu() per parameter and a CPU EMA update on
                the main thread (the synchronous baseline as usually written)
  swa_utils     torch.optim.swa_utils.AveragedModel + get_ema_multi_avg_fn on a CPU copy
  gpu_foreach   a float32 EMA kept on the GPU, torch._foreach_lerp_ each step (GPU only)
  offload       offload_ema: EMA 0.999 every step
  offload_fold  the same EMA folding --fold staged snapshots per pass (default 4)
  offload_multi offload_ema: EMA 0.999 + EMA 0.9999 + LAWA(window 10, every 10), one snapshot
  diffusers, diffusers_offload, timm_v3, lightning_ema
                the peers' own EMA classes, where their packages are installed

Each record also gives the training thread's own time in the averaging code per step
(``averager_us_per_step``): for the offload modes the time inside the Averager's optimizer-step
hooks (and its save calls), for the others the time of their after-step work. ``--preset many``
(or ``--experts N``) splits the MLPs into experts: over 10,000 parameter tensors, where whatever
the training thread does per tensor shows.

Run it as ``offload-ema bench`` (or ``python bench/overhead.py``).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional

import torch

import offload_ema as oe
from offload_ema.gpt import GPT, PRESETS, GPTConfig, lm_loss
from offload_ema.layout import unwrap_model

BETA = 0.999
# Every mode, by name, in the order the report lists them: a class registered with @mode.
REGISTRY: Dict[str, type] = {}


def mode(cls):
    """Registers a :class:`Mode` subclass under its ``name`` (a peer: ``peer_module`` set)."""
    REGISTRY[cls.name] = cls
    return cls
# --rounds left out: at least 6 interleaved rounds (the fewest in which rounds that all agree
# decide a comparison, by a sign test at 5%), at most 12, stopping once every comparison of the
# verdict is decided or a tie (see _settled).
AUTO_ROUNDS = (6, 12)
# The comparisons the verdict states (those whose modes ran).
VERDICT_PAIRS = [("offload", "none"), ("offload", "naive"), ("naive", "none")]
# A tie is settled when every round's ratio lies within this of 1 (and the rounds disagree).
TIE_BAND = 0.05


def compare(a: List[float], b: List[float]) -> dict:
    """Mode a's step time against mode b's over interleaved rounds (each round's medians, the
    same round's drift on both): the median ratio, its range over the rounds, how many rounds
    agree on the direction, and whether that decides it (two-sided sign test, p < 0.05)."""
    ratios = [x / y for x, y in zip(a, b) if y > 0]
    n = len(ratios)
    if not n:
        return {"ratio": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0,
                "agree": 0, "p": 1.0, "decided": False}
    k = max(sum(r < 1 for r in ratios), sum(r > 1 for r in ratios))
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n)
    return {"ratio": statistics.median(ratios), "lo": min(ratios), "hi": max(ratios), "n": n,
            "agree": k, "p": p, "decided": p < 0.05}


def in_words(a: str, b: str, c: dict) -> str:
    """One comparison as a sentence: which is faster, by how much, and how sure."""
    rounds = f"{c['agree']} of {c['n']} rounds"
    spread = f"rounds {c['lo']:.3f}..{c['hi']:.3f}x"
    if not c["decided"]:
        return (f"{a} vs {b}: a tie within this machine's noise (step time ratio "
                f"{c['ratio']:.3f}x, {spread}; only {rounds} point one way)")
    if c["ratio"] < 1:
        return (f"{a} vs {b}: {a}'s step is {1 / c['ratio']:.2f}x faster ({b} "
                f"{1 / c['ratio']:.2f}x slower; {rounds} agree, {spread})")
    return (f"{a} vs {b}: {a}'s step is {c['ratio']:.2f}x slower ({b} {c['ratio']:.2f}x "
            f"faster; {rounds} agree, {spread})")


def _settled(times: Dict[str, List[float]], steps: int, world: int) -> bool:
    """Whether every verdict comparison is decided, or a tie whose rounds all lie within
    TIE_BAND of equal (more rounds would not change what it says). Under DDP the ranks must
    agree: rank 0 decides and tells the others."""
    def medians(m):
        ts = times.get(m) or []
        return [statistics.median(ts[i:i + steps]) for i in range(0, len(ts) - steps + 1, steps)]
    done = True
    for a, b in VERDICT_PAIRS:
        if not times.get(a) or not times.get(b):
            continue
        c = compare(medians(a), medians(b))
        tie = c["n"] and 1 - TIE_BAND <= c["lo"] and c["hi"] <= 1 + TIE_BAND
        done = done and (c["decided"] or bool(tie))
    if world > 1:
        import torch.distributed as dist
        flag = [done]
        dist.broadcast_object_list(flag, src=0)
        done = flag[0]
    return done


def _rss() -> int:
    import psutil
    return psutil.Process().memory_info().rss


@mode
class Mode:
    """One way of keeping an average, set up once and run in several rounds: ``begin`` /
    ``after_step`` / ``end`` around each round's steps, ``counters`` for its record, ``close``.

    ``avg_s`` adds up the training thread's wall time inside this mode's averaging code (the
    run loop reads it around each step); ``none`` has none. Class attributes: ``gpu_only`` (left
    out of CPU runs), ``peer_module`` (a peer's package: imported before any mode is built, so
    that its import's memory is not counted as its EMA's; missing: the mode says so),
    ``cpu_note`` (printed under a CPU run's table)."""

    name = "none"
    gpu_only = False
    peer_module: Optional[str] = None
    cpu_note: Optional[str] = None
    fence_s = copy_s = update_s = 0.0
    avg_s = 0.0

    def __init__(self, model, opt, args):
        self.model, self.opt, self.args = model, opt, args
        self.params = [p for p in model.parameters() if p.requires_grad]

    def begin(self):
        pass

    def after_step(self):
        pass

    def end(self):
        pass

    def close(self):
        pass

    def counters(self, wait: bool = True) -> dict:
        return {"applied": 0, "skipped": 0, "coalesced": 0, "pinned_bytes": 0}

    @contextlib.contextmanager
    def timed_update(self):
        """Times an update the training thread does itself: update and averaging time alike."""
        t0 = time.perf_counter()
        yield
        dt = time.perf_counter() - t0
        self.update_s += dt
        self.avg_s += dt


@mode
class Naive(Mode):
    name = "naive"

    def __init__(self, *a):
        super().__init__(*a)
        self.acc = None
        self.applied = 0

    def after_step(self):
        t0 = time.perf_counter()
        # .float().cpu() as usually written; copy=True so that on a CPU-only run the average is
        # never the fp32 parameter itself.
        host = [p.detach().to("cpu", torch.float32, copy=True) for p in self.params]
        t1 = time.perf_counter()
        if self.acc is None:
            self.acc = host
        else:
            for a, h in zip(self.acc, host):
                a.lerp_(h, 1 - BETA)
        t2 = time.perf_counter()
        self.copy_s += t1 - t0
        self.update_s += t2 - t1
        self.avg_s += t2 - t0
        self.applied += 1

    def counters(self, wait=True):
        return dict(super().counters(), applied=self.applied)


@mode
class SwaUtils(Mode):
    name = "swa_utils"

    def __init__(self, *a):
        super().__init__(*a)
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
        self.module = unwrap_model(self.model)  # not the DDP wrapper: it does not deep-copy
        self.avg = AveragedModel(copy.deepcopy(self.module).cpu(),
                                 multi_avg_fn=get_ema_multi_avg_fn(BETA), use_buffers=False)

    def after_step(self):
        with self.timed_update():
            self.avg.update_parameters(self.module)

    def counters(self, wait=True):
        return dict(super().counters(), applied=int(self.avg.n_averaged))


@mode
class GpuForeach(Mode):
    name = "gpu_foreach"
    gpu_only = True

    def __init__(self, *a):
        super().__init__(*a)
        self.acc = [p.detach().float().clone() for p in self.params]
        self.applied = 0

    def after_step(self):
        # Host time of the launches: what the training thread spends; the GPU runs them later.
        t0 = time.perf_counter()
        torch._foreach_lerp_(self.acc, [p.detach().float() for p in self.params], 1 - BETA)
        self.avg_s += time.perf_counter() - t0
        self.applied += 1

    def counters(self, wait=True):
        return dict(super().counters(), applied=self.applied)


class HookClock:
    """Adds to ``owner.avg_s`` the training thread's time inside the optimizer-step hooks that
    are registered between :meth:`open` and :meth:`close` (the Averager's, from ``attach``).

    ``Optimizer.step`` runs an optimizer's own pre-hooks, and then its post-hooks, in the order
    they were registered (ordered dicts keyed by increasing handle ids, torch >= 2.0), so a
    start hook registered before ``attach`` and a stop hook registered after it bracket exactly
    the Averager's fence (pre) and snapshot hand-over (post). This measures them directly;
    ``opt.step()`` timed with and without the Averager would bury a few microseconds under the
    optimizer's own milliseconds of noise."""

    def __init__(self, owner, opt):
        self.owner, self.opt = owner, opt
        self.handles: List = []
        self.t0 = None

    def _start(self, opt, args, kwargs):
        self.t0 = time.perf_counter()

    def _stop(self, opt, args, kwargs):
        if self.t0 is not None:
            self.owner.avg_s += time.perf_counter() - self.t0
            self.t0 = None

    def open(self):
        self.handles = [self.opt.register_step_pre_hook(self._start),
                        self.opt.register_step_post_hook(self._start)]

    def close(self):
        self.handles += [self.opt.register_step_pre_hook(self._stop),
                         self.opt.register_step_post_hook(self._stop)]

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles, self.t0 = [], None


@mode
class Offload(Mode):
    name = "offload"

    def averages(self):
        return {"ema": oe.EMA(BETA)}

    def options(self):
        return {}

    def __init__(self, *a):
        super().__init__(*a)
        self.avg = oe.Averager(self.model, self.averages(), on_busy=self.args.on_busy,
                               **self.options())
        self.clock = HookClock(self, self.opt)
        self.steps = 0
        self.saves: List = []

    def after_step(self):
        self.steps += 1
        if self.args.save_every and self.steps % self.args.save_every == 0:
            path = os.path.join(self.args.save_dir, f"{self.name}.safetensors")
            t0 = time.perf_counter()  # handing the write over is the training thread's, too
            self.saves.append(self.avg.save(path, "ema"))
            self.avg_s += time.perf_counter() - t0

    def begin(self):
        self.clock.open()
        try:
            self.avg.attach(self.opt)
        except BaseException:  # no start hooks left behind, timing some later hook
            self.clock.remove()
            raise
        self.clock.close()

    def end(self):
        self.avg.detach()
        self.clock.remove()
        self.avg.flush()

    def close(self):
        self.avg.close()

    def counters(self, wait=True):
        if wait:  # a partial record between rounds reports the saves done so far
            for f in self.saves:
                f.result()  # written (a failed write fails the benchmark)
        st = self.avg.stats()
        self.fence_s, self.copy_s, self.update_s = (
            st["fence_wait_seconds"], st["copy_seconds"], st["update_seconds"])
        return {"applied": st["snapshots_applied"], "skipped": st["snapshots_skipped"],
                "coalesced": st["snapshots_coalesced"], "pinned_bytes": st["pinned_bytes"],
                "snapshot_bytes": st["snapshot_bytes"], "host_bytes": st["host_bytes"],
                "bytes_copied": st["bytes_copied"],
                "read_in_place_bytes": st["read_in_place_bytes"],
                "device_pack_bytes": st["device_pack_bytes"], "saves": st["saves_written"],
                "fold": st["fold"], "folds": st["folds"],
                "save_seconds": st["save_seconds"], "save_bytes": st["save_bytes"]}


@mode
class OffloadFold(Offload):
    """``offload`` folding ``--fold`` staged snapshots per pass over the accumulator."""
    name = "offload_fold"

    def options(self):
        return {"fold": self.args.fold}


@mode
class OffloadMulti(Offload):
    name = "offload_multi"

    def averages(self):
        return {"ema": oe.EMA(BETA), "ema_slow": oe.EMA(0.9999), "lawa": oe.LAWA(10, every=10)}


class Unavailable(RuntimeError):
    """A peer's package is missing (or cannot be installed here): its mode reports why."""


@mode
class DiffusersEma(Mode):
    """diffusers' own ``EMAModel`` (``foreach=True``), its EMA on the model's device: what its
    training scripts do by default."""
    name = "diffusers"
    peer_module = "diffusers.training_utils"
    offload = False

    def __init__(self, *a):
        super().__init__(*a)
        try:
            from diffusers.training_utils import EMAModel
        except ImportError as exc:
            raise Unavailable(f"not installed (pip install diffusers): {exc}") from None
        self.device = self.params[0].device
        self.ema = EMAModel(self.params, decay=BETA, foreach=True)
        if self.offload:
            self.ema.to("cpu")
            if self.device.type == "cuda":
                self.ema.pin_memory()

    def after_step(self):
        with self.timed_update():
            if self.offload:  # the scripts' --offload_ema: to the GPU, step, back, every step
                self.ema.to(self.device, non_blocking=True)
            self.ema.step(self.params)
            if self.offload:
                self.ema.to("cpu", non_blocking=True)

    def counters(self, wait=True):
        return dict(super().counters(), applied=self.ema.optimization_step)


@mode
class DiffusersOffload(DiffusersEma):
    """diffusers' scripts' ``--offload_ema`` pattern around its own ``EMAModel``. On a CPU-only run
    the moves are no-ops: the mode is then the same as ``diffusers`` (marked in the output)."""
    name = "diffusers_offload"
    offload = True
    cpu_note = ("its moves to and from the device do nothing on a CPU-only run (the same as "
                "diffusers here); it measures the offload pattern on a GPU only")


@mode
class TimmV3(Mode):
    """timm's ``ModelEmaV3``, where timm is installed (it is not installed by ``make``: its
    torchvision dependency pins a torch version, and pip would replace the installed torch)."""
    name = "timm_v3"
    peer_module = "timm.utils"

    def __init__(self, *a):
        super().__init__(*a)
        try:
            from timm.utils import ModelEmaV3
        except ImportError:
            raise Unavailable("not installed (timm needs torchvision, whose wheels pin one torch "
                              "version: installing it here would replace the installed torch; "
                              "pip install timm where that is fine)") from None
        self.ema = ModelEmaV3(unwrap_model(self.model), decay=BETA)
        self.applied = 0

    def after_step(self):
        with self.timed_update():
            self.ema.update(unwrap_model(self.model), step=self.applied)
        self.applied += 1

    def counters(self, wait=True):
        return dict(super().counters(), applied=self.applied)


@mode
class LightningEma(Mode):
    """Lightning's own ``EMAWeightAveraging`` callback (Lightning >= 2.6), driven as its Trainer
    would drive it after each optimizer step (an ``AveragedModel`` on the model's device)."""
    name = "lightning_ema"
    peer_module = "lightning.pytorch.callbacks"

    def __init__(self, *a):
        super().__init__(*a)
        try:
            import lightning.pytorch as pl
            from lightning.pytorch.callbacks import EMAWeightAveraging
        except ImportError as exc:
            raise Unavailable(f"not available (Lightning >= 2.6 has EMAWeightAveraging): "
                              f"{exc}") from None

        class Shell(pl.LightningModule):  # the benchmark model as the callback's module
            def __init__(self, net):
                super().__init__()
                self.net = net
        self.module = Shell(unwrap_model(self.model))
        self.trainer = type("TrainerState", (), {"global_step": 0})()
        self.cb = EMAWeightAveraging(decay=BETA)
        self.cb.setup(self.trainer, self.module, "fit")

    def after_step(self):
        with self.timed_update():
            self.trainer.global_step += 1
            self.cb.on_train_batch_end(self.trainer, self.module, None, None, 0)

    def counters(self, wait=True):
        return dict(super().counters(), applied=int(self.cb._average_model.n_averaged))


MODES = list(REGISTRY)
PEERS = tuple(n for n, c in REGISTRY.items() if c.peer_module)


def _import_peers(modes) -> None:
    """Imports the requested peers' packages up front: the memory a package itself takes on
    import (diffusers: ~140 MB) is not its EMA's, and must not count as the mode's host RSS."""
    import importlib
    for m in modes:
        if REGISTRY[m].peer_module:
            try:
                importlib.import_module(REGISTRY[m].peer_module)
            except ImportError:
                pass  # the mode reports it


class MemoryMeter:
    """Each mode's GPU memory, from three queries: memory allocated now, the peak since the last
    reset, reset the peak (CUDA's in a run; plain callables in a test).

    A mode's cost is what its construction allocated plus the highest rise, over its rounds, of
    the peak above the memory allocated just before that round's ``begin()``. Every mode's
    buffers stay allocated for the whole run, so a baseline is only fair when it is taken right
    before the mode it belongs to. Comparing whole peaks puts gpu_foreach's accumulator into the
    peak of ``none`` from round 2 on, and gpu_foreach comes out nearly free.
    """

    def __init__(self, allocated: Callable[[], int], max_allocated: Callable[[], int],
                 reset_peak: Callable[[], None]):
        self._allocated, self._max, self._reset = allocated, max_allocated, reset_peak
        self.held: Dict[str, int] = {}
        self.rise: Dict[str, int] = {}

    @contextlib.contextmanager
    def constructing(self, mode: str):
        before = self._allocated()
        yield
        self.held[mode] = self._allocated() - before

    @contextlib.contextmanager
    def running(self, mode: str):
        self._reset()
        before = self._allocated()
        yield
        self.rise[mode] = max(self.rise.get(mode, 0), self._max() - before)

    def cost(self, mode: str) -> int:
        return self.held.get(mode, 0) + self.rise.get(mode, 0)

    def delta(self, mode: str, reference: str = "none") -> int:
        """``mode``'s cost beyond ``reference``'s (a plain training step's own transient peak);
        its whole cost when the reference has not run."""
        return self.cost(mode) - (self.cost(reference) if reference in self.rise else 0)


def cuda_memory_meter(device: torch.device) -> MemoryMeter:
    # Synchronised, like the timed steps: a figure read while a stream still has work queued
    # would depend on how far that work got.
    def allocated():
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)

    def max_allocated():
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)

    def reset_peak():
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)

    return MemoryMeter(allocated, max_allocated, reset_peak)


def no_memory_meter() -> MemoryMeter:
    """On the CPU: every figure is 0, and the same bookkeeping runs as on a GPU."""
    return MemoryMeter(lambda: 0, lambda: 0, lambda: None)


def write_json(path: str, rows: List[dict]) -> None:
    """Writes ``rows`` to ``path`` through a temporary file and ``os.replace``, so that a run cut
    off (a device command's time limit, Ctrl-C) leaves the last complete file, never half a one."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


class Progress:
    """One self-overwriting line on a terminal; silent otherwise."""

    def __init__(self, total: int):
        self.total, self.done = total, 0
        self.on = sys.stderr.isatty()

    def tick(self, what: str):
        self.done += 1
        if self.on:
            width = 30
            filled = int(width * self.done / self.total)
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] "
                             f"{self.done}/{self.total} {what:<40}")
            sys.stderr.flush()

    def close(self):
        if self.on:
            sys.stderr.write("\r" + " " * 90 + "\r")


def _percentile(xs: List[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


@dataclasses.dataclass
class Workload:
    """The model under training, its optimizer and one training step (the same for every mode)."""
    device: torch.device
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    cfg: GPTConfig
    n_params: int
    n_tensors: int
    step: Callable[[], None]
    sync: Callable[[], None]


def workload(args, rank: int, world: int) -> Workload:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    cfg = model_config(args)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    torch.manual_seed(0)
    gpt = GPT(cfg).to(device=device, dtype=dtype)
    model = gpt
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(gpt, device_ids=[device.index] if cuda else None)
    kw = {"fused": True} if args.optimizer == "fused" else {"foreach": True}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, **kw)
    tokens = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq + 1), device=device,
                           generator=torch.Generator(device=device).manual_seed(rank))

    def sync():
        if cuda:
            # Only the main stream: the averaging side stream runs on, as in training.
            torch.cuda.current_stream(device).synchronize()

    def step():
        lm_loss(model, tokens).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return Workload(device, model, opt, cfg, sum(p.numel() for p in gpt.parameters()),
                    sum(1 for _ in gpt.parameters()), step, sync)


class Measurements:
    """What the timing loop records per mode, and the records (rows) it turns into."""

    def __init__(self, args, work: Workload, modes: List[str]):
        self.args, self.work, self.modes = args, work, modes
        self.objs: Dict[str, Mode] = {}
        self.unavailable: Dict[str, str] = {}  # mode -> why it did not run
        self.times: Dict[str, List[float]] = {m: [] for m in modes}
        self.avg_times: Dict[str, List[float]] = {m: [] for m in modes}  # training thread
        self.rss_delta: Dict[str, int] = {}
        self.meter = cuda_memory_meter(work.device) if work.device.type == "cuda" else \
            no_memory_meter()

    def records(self, final: bool) -> List[dict]:
        args, work = self.args, self.work
        times = self.times
        base = statistics.median(times["none"]) if times.get("none") else float("nan")
        rows = []
        for m in self.modes:
            ts = times[m]
            if not ts:
                continue
            med = statistics.median(ts)
            avg_ts = self.avg_times[m]
            o = self.objs[m]
            c = o.counters(wait=final)
            snaps = max(c["applied"], 1)
            row = {
                "mode": m, "preset": args.preset, "device": str(work.device),
                "params": work.n_params, "tensors": work.n_tensors, "experts": work.cfg.experts,
                "dtype": args.dtype, "step_ms_median": med * 1e3,
                "step_ms_p90": _percentile(ts, 0.9) * 1e3,
                "overhead_pct": 100 * (med / base - 1),
                # Per timed step: the mean carries the rare long waits (a full staging ring under
                # on_busy="block"), the median the usual cost.
                "averager_us_per_step": statistics.fmean(avg_ts) * 1e6,
                "averager_us_median": statistics.median(avg_ts) * 1e6,
                "gpu_mem_delta_bytes": self.meter.delta(m),
                "rss_delta_bytes": self.rss_delta[m], "pinned_bytes": c["pinned_bytes"],
                "applied": c["applied"], "skipped": c["skipped"], "coalesced": c["coalesced"],
                "fence_ms_per_snapshot": o.fence_s / snaps * 1e3,
                "copy_ms_per_snapshot": o.copy_s / snaps * 1e3,
                "update_ms_per_snapshot": o.update_s / snaps * 1e3,
                "round_medians_ms": [statistics.median(ts[i:i + args.steps]) * 1e3
                                     for i in range(0, len(ts), args.steps)],
                "rounds": len(ts) // args.steps, "partial": not final,
            }
            for k in ("snapshot_bytes", "host_bytes", "bytes_copied", "read_in_place_bytes",
                      "device_pack_bytes", "saves", "save_seconds", "save_bytes", "fold", "folds"):
                if k in c:
                    row[k] = c[k]
            if c.get("saves") and c["save_seconds"] > 0:
                row["save_gbps"] = c["save_bytes"] / c["save_seconds"] / 1e9
            rows.append(row)
        return rows


def _header(args, work: Workload, world: int) -> str:
    cfg = work.cfg
    return (f"offload_ema overhead benchmark: preset={args.preset} "
            f"params={work.n_params / 1e6:.1f}M tensors={work.n_tensors}"
            + (f" (experts={cfg.experts}x{cfg.hidden} per block)" if cfg.experts else "") + " "
            f"dtype={args.dtype} device={work.device} optimizer=AdamW({args.optimizer}) "
            f"batch={cfg.batch}x{cfg.seq} tokens, "
            f"{args.rounds or f'{AUTO_ROUNDS[0]} to {AUTO_ROUNDS[1]}'} rounds x {args.steps} "
            f"steps (+{args.warmup} warm-up) per mode, on_busy={args.on_busy}, "
            f"kernels={oe.ops.backend()}/{oe.ops.isa()} x{oe.ops.get_num_threads()} threads, "
            f"torch {torch.__version__}, {platform.node() or 'host'} {os.cpu_count()} CPUs"
            + (f", {world} processes (DDP, {'NCCL' if work.device.type == 'cuda' else 'gloo'})"
               if world > 1 else ""))


def _run_round(m: str, ms: Measurements, progress, label: str) -> None:
    """One round of mode ``m``: built the first time (a missing peer is recorded, not fatal),
    warm-up steps untimed (they re-warm this mode's path), then the timed steps."""
    args, work = ms.args, ms.work
    first = m not in ms.objs
    if first:
        rss0 = _rss()
        try:
            with ms.meter.constructing(m):
                ms.objs[m] = REGISTRY[m](work.model, work.opt, args)
        except Unavailable as exc:  # a peer's package is missing: said, not fatal
            ms.unavailable[m] = str(exc)
            return
    mode_obj = ms.objs[m]
    with ms.meter.running(m):
        mode_obj.begin()
        for i in range(args.warmup + args.steps):
            a0 = mode_obj.avg_s
            t0 = time.perf_counter()
            work.step()
            mode_obj.after_step()
            work.sync()
            if i >= args.warmup:
                ms.times[m].append(time.perf_counter() - t0)
                ms.avg_times[m].append(mode_obj.avg_s - a0)
            progress.tick(label)
        mode_obj.end()
    if first:
        ms.rss_delta[m] = _rss() - rss0


def run(args, rank: int = 0, world: int = 1) -> List[dict]:
    """Runs every mode in interleaved rounds; with ``world`` > 1 this is one rank of a DDP run
    (rank 0 returns the rows, with each rank's host memory)."""
    if args.threads:
        oe.ops.set_num_threads(args.threads)
    work = workload(args, rank, world)
    modes = [m for m in args.modes if work.device.type == "cuda" or not REGISTRY[m].gpu_only]
    if rank == 0:
        print(_header(args, work, world))
    for _ in range(args.warmup):  # compile kernels, fill the caching allocator, AdamW state
        work.step()
    work.sync()
    _import_peers(modes)
    ms = Measurements(args, work, modes)
    auto = args.rounds is None
    max_rounds = AUTO_ROUNDS[1] if auto else args.rounds
    progress = Progress(max_rounds * len(modes) * (args.steps + args.warmup))
    progress.on = progress.on and rank == 0
    try:
        r = 0
        while r < max_rounds and not (auto and r >= AUTO_ROUNDS[0] and
                                      _settled(ms.times, args.steps, world)):
            for m in modes:
                if m not in ms.unavailable:
                    _run_round(m, ms, progress,
                               f"round {r + 1}/{'<=' if auto else ''}{max_rounds} {m}")
                if args.json and rank == 0 and m not in ms.unavailable:
                    # Outside the timed steps; a run cut short still leaves what it measured.
                    write_json(args.json, ms.records(final=False))
            r += 1
        progress.close()
        rows = ms.records(final=True)
        rows += [{"mode": m, "unavailable": why} for m, why in ms.unavailable.items()]
    finally:
        # Averagers hold worker threads and, under DDP, take part in collectives: stop them
        # here, on every rank, also when a mode failed, rather than at interpreter exit.
        for o in ms.objs.values():
            o.close()
    if world > 1:
        _gather_rank_memory(rows, world)
    if args.save_every:
        written = [r for r in rows if r.get("saves")]
        if written:
            disk = disk_write_gbps(args.save_dir, written[0]["save_bytes"] // written[0]["saves"])
            for r in written:
                r["disk_write_gbps"] = disk
    return rows


def _gather_rank_memory(rows: List[dict], world: int) -> None:
    """Each rank's host memory, on every record (rank 0 reports them)."""
    import torch.distributed as dist
    mine = {r["mode"]: (r.get("rss_delta_bytes", 0), r.get("host_bytes", 0)) for r in rows}
    every = [None] * world
    dist.all_gather_object(every, mine)
    for r in rows:
        r["nproc"] = world
        r["rss_delta_bytes_per_rank"] = [e[r["mode"]][0] for e in every]
        r["host_bytes_per_rank"] = [e[r["mode"]][1] for e in every]


def model_config(args) -> GPTConfig:
    """The preset with the command line's overrides."""
    cfg = PRESETS[args.preset]
    if args.layers or args.width:
        width = args.width or cfg.width
        cfg = dataclasses.replace(cfg, width=width, layers=args.layers or cfg.layers,
                                  heads=max(1, width // 128) if args.width else cfg.heads)
    if args.batch:
        cfg = dataclasses.replace(cfg, batch=args.batch)
    if args.experts is not None:
        cfg = dataclasses.replace(cfg, experts=args.experts)
    if args.expert_hidden is not None:
        cfg = dataclasses.replace(cfg, expert_hidden=args.expert_hidden)
    return cfg


def _rank_main(rank: int, args, tmp: str) -> None:
    import gc
    import importlib

    import torch.distributed as dist
    # Before the group exists: torch.distributed.nn.functional binds ``group.WORLD`` as default
    # arguments when it is imported, and DDP imports it lazily (through torch.distributed._shard).
    # Imported after init_process_group, it keeps the default group referenced for good, so
    # destroy_process_group leaves the gloo group and its worker threads running into interpreter
    # exit. A worker that drops a collective's last tensor there needs the GIL, Python ends it
    # with pthread_exit, and unwinding through C++ aborts the process (SIGABRT, "terminate called
    # without an active exception"), now and then.
    importlib.import_module("torch.distributed.nn")
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
        args.device = f"cuda:{rank}"
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{tmp}/pg",
                            rank=rank, world_size=args.nproc)
    try:
        rows = run(args, rank=rank, world=args.nproc)
        if rank == 0:
            with open(os.path.join(tmp, "rows.json"), "w") as f:
                json.dump(rows, f)
    finally:
        # The DDP reducer holds the group from C++: a reducer left in a reference cycle would
        # keep it past destroy_process_group, into exit, just the same.
        gc.collect()
        dist.destroy_process_group()


def _spawn(args, tmp: str) -> List[dict]:
    """Runs the benchmark as ``args.nproc`` DDP processes (gloo on CPUs, NCCL on GPUs)."""
    import torch.multiprocessing as mp
    if args.save_every and args.save_dir == tmp:
        args.save_dir = os.path.join(tmp, "snapshots")
        os.makedirs(args.save_dir)
    mp.start_processes(_rank_main, args=(args, tmp), nprocs=args.nproc, join=True,
                       start_method="spawn")
    with open(os.path.join(tmp, "rows.json")) as f:
        return json.load(f)


def disk_write_gbps(directory: str, nbytes: int) -> float:
    """Sequential write speed of ``directory``'s disk: ``nbytes`` in 64 MiB writes, fsynced."""
    block = b"\0" * min(nbytes, 64 << 20)
    path = os.path.join(directory, ".offload_ema_disk_probe")
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            f.write(block[:left])
            left -= len(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - t0
    os.unlink(path)
    return nbytes / seconds / 1e9


LEGEND = """\
median / p90 ms: step time over every timed step of the mode. vs none: its median against none's;
  in brackets the lowest..highest of the per-round figures (each round's median against none's
  median in the same round: the spread this machine's drift puts on it). verdict: faster / slower
  when the rounds agree (sign test, 5%), tie when the difference is within that spread
train us: the training thread's own time in the averaging code per step, median (mean in the
  details: it carries the rare long waits); offload modes: inside the Averager's hooks
host RSS +: change of the process's resident memory while the mode was set up; negative when
  the allocator gave memory back to the system meanwhile (freed by an earlier mode): a
  difference of the whole process, not this mode's allocation. GPU mem +: peak GPU memory
  above none's; pinned: page-locked staging (GPU only)
applied: snapshots in the averages; skip / coal: dropped or merged into the next one because
  the worker was busy (on_busy="skip" / "coalesce"; "block" waits instead); fence / copy /
  update ms: per snapshot, the training thread's wait in the fence, the copy into staging (GPU:
  on the copy engine) and the worker's kernel time"""


def _round_overheads(rows: List[dict]) -> None:
    """Adds each mode's per-round overheads vs none's median in the same round, and the
    comparison with none (``vs_none``)."""
    none = next((r for r in rows if r["mode"] == "none"), None)
    if none is None:
        return
    for r in rows:
        pairs = zip(r["round_medians_ms"], none["round_medians_ms"])
        r["overhead_pct_rounds"] = [100 * (a / b - 1) for a, b in pairs if b > 0]
        if r["mode"] != "none":
            r["vs_none"] = compare(r["round_medians_ms"], none["round_medians_ms"])


def _noise_warnings(rows: List[dict]) -> List[str]:
    """Why this run's figures may not support themselves (printed after the table)."""
    out = []
    by = {r["mode"]: r for r in rows}
    none = by.get("none")
    if none is not None and len(none["round_medians_ms"]) > 1:
        rounds = none["round_medians_ms"]
        drift = 100 * (max(rounds) / min(rounds) - 1)
        for r in rows:
            if r["mode"] != "none" and 0 < abs(r["overhead_pct"]) < drift:
                out.append(f"{r['mode']}'s overhead ({r['overhead_pct']:+.1f}%) is smaller than "
                           f"the drift of none's own round medians ({drift:.1f}%)")
    for r in rows:
        if r["step_ms_p90"] > 2 * r["step_ms_median"]:
            out.append(f"{r['mode']}: p90 step time is over twice the median "
                       f"({r['step_ms_p90']:.1f} vs {r['step_ms_median']:.1f} ms)")
    return out


def _verdict_word(r: dict) -> str:
    c = r.get("vs_none")
    if c is None:
        return ""
    return "tie" if not c["decided"] else "faster" if c["ratio"] < 1 else "slower"


def report(rows: List[dict], wide: bool = False) -> None:
    """The results: one table of what a step costs (at most 120 columns), one of the details,
    the legend, the same-run comparisons, then the verdict in words."""
    missing = [r for r in rows if "unavailable" in r]
    rows = [r for r in rows if "unavailable" not in r]
    _round_overheads(rows)
    _print_tables(rows, wide)
    for r in missing:
        print(f"{r['mode']}: {r['unavailable']}")
    for r in rows:
        note = REGISTRY[r["mode"]].cpu_note if r["mode"] in REGISTRY else None
        if note and r.get("device", "").startswith("cpu"):
            print(f"{r['mode']}: {note}")
    print(LEGEND)
    warnings = _noise_warnings(rows)
    if warnings:
        print("warning: this run is too noisy to support some of its figures (rerun in a quieter "
              "moment, or with more --rounds / --steps):")
        for w in warnings:
            print(f"  - {w}")
    by = {r["mode"]: r for r in rows}
    _print_comparisons(rows, by)
    _print_verdict(by)


def _print_tables(rows: List[dict], wide: bool) -> None:
    hdr = (f"{'mode':<18}{'median ms':>10}{'p90 ms':>9}{'vs none':>9}{'(rounds)':>17}"
           f"{'verdict':>8}{'train us':>10}{'host RSS +':>11}{'GPU mem +':>11}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['mode']:<18}{r['step_ms_median']:>10.2f}{r['step_ms_p90']:>9.2f}"
              f"{r['overhead_pct']:>+8.1f}%{_spread(r):>17}{_verdict_word(r):>8}"
              f"{r['averager_us_median']:>10.1f}{_size(r['rss_delta_bytes']):>11}"
              f"{_size(r['gpu_mem_delta_bytes']):>11}")
    print()
    det = (f"{'mode':<18}{'applied':>8}{'skip':>6}{'coal':>6}{'pinned':>9}{'fence ms':>9}"
           f"{'copy ms':>9}{'update ms':>10}{'train us mean':>14}" + ("  rounds (median ms)"
                                                                     if wide else ""))
    print(det)
    print("-" * len(det))
    for r in rows:
        print(f"{r['mode']:<18}{r['applied']:>8}{r['skipped']:>6}{r['coalesced']:>6}"
              f"{_size(r['pinned_bytes']):>9}{r['fence_ms_per_snapshot']:>9.2f}"
              f"{r['copy_ms_per_snapshot']:>9.2f}{r['update_ms_per_snapshot']:>10.2f}"
              f"{r['averager_us_per_step']:>14.1f}"
              + ("  " + " ".join(f"{x:.1f}" for x in r["round_medians_ms"]) if wide else ""))


def _print_comparisons(rows: List[dict], by: Dict[str, dict]) -> None:
    """Memory per rank, each peer beside offload, the fold's effect, each offload mode's work."""
    for r in rows:
        if r.get("host_bytes_per_rank") and r["mode"].startswith("offload"):
            print(f"{r['mode']}: averager host memory per rank "
                  f"{[_size(b) for b in r['host_bytes_per_rank']]} ({r['nproc']} processes); "
                  f"host RSS delta per rank {[_size(b) for b in r['rss_delta_bytes_per_rank']]}")
    off = by.get("offload")
    for peer in PEERS:
        r = by.get(peer)
        if off is None or r is None:
            continue
        print(f"offload vs {peer}: step overhead {off['overhead_pct']:+.1f}% vs "
              f"{r['overhead_pct']:+.1f}% (step time ratio "
              f"{off['step_ms_median'] / r['step_ms_median']:.2f}x); GPU memory "
              f"{_size(off['gpu_mem_delta_bytes'])} vs {_size(r['gpu_mem_delta_bytes'])}; host RSS "
              f"{_size(off['rss_delta_bytes'])} vs {_size(r['rss_delta_bytes'])}; training thread "
              f"{off['averager_us_median']:.0f} vs {r['averager_us_median']:.0f} us/step (median)")
    fold = _fold_summary(by)
    if fold:
        print(fold)
    for m in ("offload", "offload_fold", "offload_multi"):
        if m in by and "none" in by:
            _print_offload_line(m, by[m], by["none"]["step_ms_median"])


def _print_offload_line(m: str, r: dict, step: float) -> None:
    upd = r["update_ms_per_snapshot"]
    # What one snapshot copies (parameters read in place on a CPU-only run are not).
    nbytes = r.get("bytes_copied", 0) / max(r.get("applied", 0), 1)
    copy_gbps = (nbytes / (r["copy_ms_per_snapshot"] / 1e3) / 1e9 if r["copy_ms_per_snapshot"]
                 else float("nan"))
    in_place = (f", {_size(r['read_in_place_bytes'])} per snapshot read in place"
                if r.get("read_in_place_bytes") else "")
    if r.get("saves"):
        print(f"{m}: {r['saves']} snapshot files of {_size(r['save_bytes'] // r['saves'])} "
              f"written at {r['save_gbps']:.2f} GB/s = "
              f"{100 * r['save_gbps'] / r['disk_write_gbps']:.0f}% of the disk's "
              f"sequential write speed ({r['disk_write_gbps']:.2f} GB/s, same size, fsynced)")
    print(f"{m}: skipped+coalesced {r['skipped'] + r['coalesced']} ; CPU update "
          f"{upd:.1f} ms per snapshot vs {step:.1f} ms per step "
          f"({'keeps up' if upd <= step else f'{upd / step:.2f}x slower than a step'})"
          f" ; copy {copy_gbps:.1f} GB/s{in_place} ; training thread "
          f"{r['averager_us_median']:.1f} us/step median ({r['averager_us_per_step']:.1f} "
          f"mean) for {r['tensors']} tensors")


def _print_verdict(by: Dict[str, dict]) -> None:
    """The answer in words: is offload's step slower than none's, and how does it compare with
    the naive synchronous EMA (step time and the training thread's time)?"""
    lines = []
    for a, b in VERDICT_PAIRS:
        if a in by and b in by:
            c = compare(by[a]["round_medians_ms"], by[b]["round_medians_ms"])
            by[a].setdefault("verdict", {})[b] = c
            lines.append(in_words(a, b, c))
    if "offload" in by and "naive" in by:
        o, n = by["offload"]["averager_us_median"], by["naive"]["averager_us_median"]
        if o > 0 and n > 0:
            lines.append(f"offload vs naive, training thread: {o:.0f} vs {n:.0f} us per step "
                         f"(median): offload's is {n / o:.1f}x less"
                         if o <= n else
                         f"offload vs naive, training thread: {o:.0f} vs {n:.0f} us per step "
                         f"(median): offload's is {o / n:.1f}x more")
    if lines:
        rounds = max(len(r["round_medians_ms"]) for r in by.values())
        print(f"\nverdict ({rounds} interleaved rounds; a difference only when the rounds agree):")
        for line in lines:
            print(f"  {line}")


def _fold_summary(by: Dict[str, dict]) -> Optional[str]:
    """offload vs offload_fold, measured in the same run: the worker's update time per snapshot
    (the host's memory traffic) and what the fold costs elsewhere."""
    one, k = by.get("offload"), by.get("offload_fold")
    if one is None or k is None or not one["update_ms_per_snapshot"] or \
            not k["update_ms_per_snapshot"]:  # (a partial record: nothing folded yet)
        return None
    ratio = one["update_ms_per_snapshot"] / k["update_ms_per_snapshot"]
    src = 2 if k["dtype"] == "bf16" else 4  # bytes per parameter read from a snapshot
    bound = (src + 8) / (src + 8 / k["fold"])  # the float32 accumulator: read and written
    line = (f"host update per snapshot: fold 1 {one['update_ms_per_snapshot']:.2f} ms vs fold "
            f"{k['fold']} {k['update_ms_per_snapshot']:.2f} ms ("
            f"{f'{ratio:.2f}x less' if ratio >= 1 else f'{1 / ratio:.2f}x more'}; memory traffic "
            f"{bound:.2f}x less), {k['applied'] / max(k['folds'], 1):.1f} snapshots per pass; copy "
            f"{one['copy_ms_per_snapshot']:.2f} vs {k['copy_ms_per_snapshot']:.2f} ms per snapshot; "
            f"step overhead {one['overhead_pct']:+.1f}% vs {k['overhead_pct']:+.1f}%")
    if one.get("read_in_place_bytes"):
        line += ("\n  (CPU model: fold 1 reads large parameters in place, a held snapshot must be "
                 "a copy: the fold pays that copy)")
    return line


def plot(rows: List[dict], path: str) -> None:
    rows = [r for r in rows if "unavailable" not in r]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit(f"--plot needs matplotlib ({exc}); pip install matplotlib") from exc
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = [r["mode"] for r in rows]
    vals = [r["overhead_pct"] for r in rows]
    bars = ax.bar(names, vals, color=["#999" if n == "none" else "#3a7" if n.startswith("offload")
                                      else "#c55" for n in names])
    ax.bar_label(bars, labels=[f"{v:+.1f}%" for v in vals], fontsize=8)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_ylabel("step-time overhead vs none (%)")
    r0 = rows[0]
    ax.set_title(f"{r0['preset']} ({r0['params'] / 1e6:.3g}M params, {r0['dtype']}) on {r0['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _spread(r: dict) -> str:
    rounds = r.get("overhead_pct_rounds") or []
    if r["mode"] == "none" or not rounds:
        return ""
    return f"({min(rounds):+.1f}..{max(rounds):+.1f})"


def _size(n: int) -> str:
    for unit, k in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if abs(n) >= k:
            return f"{n / k:.1f}{unit}"
    return str(n)


def add_arguments(p: argparse.ArgumentParser) -> None:
    cuda = torch.cuda.is_available()
    p.add_argument("--device", default="cuda" if cuda else "cpu",
                   help="where the model trains: cuda (default when a GPU is there), cuda:N, cpu")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="model size (default: 1b on a GPU, tiny on the CPU)")
    p.add_argument("--layers", type=int, help="override the preset's number of blocks")
    p.add_argument("--width", type=int, help="override the preset's width (heads = width / 128)")
    p.add_argument("--batch", type=int, help="override the preset's sequences per step")
    p.add_argument("--experts", type=int,
                   help="split each block's MLP into N expert MLPs (a dense mixture; 4 tensors "
                        "each): tensors = 5 + layers * (9 + 4 N); 0 for the plain MLP")
    p.add_argument("--expert-hidden", dest="expert_hidden", type=int,
                   help="each expert's hidden width (default 4 * width / experts, at least 1)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="parameter dtype (default: bf16 on a GPU, fp32 on the CPU)")
    p.add_argument("--optimizer", choices=["foreach", "fused"], default="foreach",
                   help="AdamW's implementation (default foreach; fused: one kernel, GPU)")
    p.add_argument("--modes", default=",".join(MODES),
                   help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--rounds", type=int, default=None,
                   help=f"interleaved rounds (default: {AUTO_ROUNDS[0]} to {AUTO_ROUNDS[1]}, "
                        "stopping once the verdict's comparisons are decided or a clear tie)")
    p.add_argument("--wide", action="store_true",
                   help="also print each round's median step time per mode")
    p.add_argument("--steps", type=int, default=None, help="timed steps per mode per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per mode per round")
    p.add_argument("--on-busy", dest="on_busy", choices=["block", "skip", "coalesce"],
                   default="block", help="the offload modes' busy policy when the worker has "
                                         "not finished the previous snapshots (default block)")
    p.add_argument("--threads", type=int,
                   help="threads of offload_ema's host update kernels (default: the cores)")
    p.add_argument("--fold", type=int, default=4,
                   help="snapshots offload_fold folds per pass over the accumulator (default 4)")
    p.add_argument("--save-every", dest="save_every", type=int, default=0,
                   help="offload modes also save their EMA to a safetensors file every N steps")
    p.add_argument("--save-dir", dest="save_dir", default=None,
                   help="directory for --save-every files (default: a temporary directory)")
    p.add_argument("--nproc", type=int, default=1,
                   help="DDP processes (gloo on the CPU, NCCL on GPUs); averages are sharded")
    p.add_argument("--json", metavar="PATH",
                   help="write one record per mode; rewritten after each mode of each round "
                        "(records say partial: true until the run has finished)")
    p.add_argument("--plot", metavar="PATH", help="write a PNG bar chart of the overheads")


def main(args: argparse.Namespace) -> int:
    on_gpu = torch.device(args.device).type == "cuda"
    if on_gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    args.preset = args.preset or ("1b" if on_gpu else "tiny")
    args.dtype = args.dtype or ("bf16" if on_gpu else "fp32")
    args.steps = args.steps or (10 if args.preset == "1b" else 15)
    # Once each: a mode named twice would share one record's timings and print it twice.
    args.modes = list(dict.fromkeys(m.strip() for m in args.modes.split(",") if m.strip()))
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        raise SystemExit(f"--modes: unknown {bad}; choose from {', '.join(MODES)}")
    for name in ("rounds", "steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1")
    if args.warmup < 0:
        raise SystemExit("--warmup must be >= 0")
    if args.save_every < 0:
        raise SystemExit("--save-every must be >= 0")
    if args.nproc < 1:
        raise SystemExit("--nproc must be >= 1")
    if not 1 <= args.fold <= oe.ops.MAX_FOLD:
        raise SystemExit(f"--fold must be from 1 to {oe.ops.MAX_FOLD}")
    if args.experts is not None and args.experts < 0:
        raise SystemExit("--experts must be >= 0")
    if args.expert_hidden is not None and args.expert_hidden < 1:
        raise SystemExit("--expert-hidden must be >= 1")
    if args.nproc > 1 and on_gpu and torch.cuda.device_count() < args.nproc:
        raise SystemExit(f"--nproc {args.nproc}: only {torch.cuda.device_count()} GPUs")
    if args.json:
        args.json = os.path.abspath(args.json)  # rank processes write the partial records
    with tempfile.TemporaryDirectory(prefix="offload_ema_bench_") as tmp:
        if args.save_every and args.save_dir is None:
            args.save_dir = tmp
        elif args.save_dir is not None:
            if os.path.exists(args.save_dir) and not os.path.isdir(args.save_dir):
                raise SystemExit(f"--save-dir {args.save_dir}: a file, not a directory")
            os.makedirs(args.save_dir, exist_ok=True)  # a new directory is made, not an error
        rows = run(args) if args.nproc == 1 else _spawn(args, tmp)
    report(rows, wide=args.wide)
    if args.json:
        write_json(args.json, rows)
        print(f"wrote {len(rows)} records to {args.json}")
    if args.plot:
        plot(rows, args.plot)
        print(f"wrote {args.plot}")
    return 0
