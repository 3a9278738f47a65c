"""The worker thread (``offload_ema.engine.worker``): its queue taken in order, folding
(``Averager(fold=K)``: K staged snapshots in one pass with the bits of one by one, every read
applies what is held first), failures reaching the user with the staging given back, and its
thread's set-up."""
import contextlib
import copy
import threading
import time
import traceback

import pytest
import torch
from torch import nn

import offload_ema as oe
from offload_ema import device as device_mod
from offload_ema import engine as engine_mod
from offload_ema import ops
from offload_ema.layout import Layout
from offload_ema.testing import LazyOps, lazy_device
from helpers import (RefEMA, RefLAWA, assert_matches, call_with_timeout, make, run_steps, slab,
                     slab_reference, snapshot, train_step)


def _boom():
    raise RuntimeError("injected: no CUDA context on this thread")


@pytest.mark.parametrize("on", ["host", "lazy"])
def test_a_worker_that_cannot_start_reports_it_at_the_next_call(on, monkeypatch):
    """The worker's thread set-up (device, stream, capture mode) raising must not leave a dead
    worker that every later call waits for."""
    ops_cls = LazyOps if on == "lazy" else device_mod.HostOps
    monkeypatch.setattr(ops_cls, "thread_init", lambda self: _boom(), raising=False)
    ctx = lazy_device(seed=0, max_delay=0.0) if on == "lazy" else _nothing()
    with ctx:
        model, opt = make()
        avg = oe.Averager(model, {"ema": oe.EMA(0.9)}).attach(opt)

        def train_and_flush():
            train_step(model, opt, 1)
            train_step(model, opt, 2)
            avg.flush()
        with pytest.raises(RuntimeError, match="injected: no CUDA context"):
            call_with_timeout(train_and_flush, 30, "training after a failed worker start",
                              abandon=[avg])
        call_with_timeout(avg.close, 30, "close", abandon=[avg])


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_a_failing_callable_on_the_worker_does_not_end_it():
    model, opt = make()
    avg = oe.Averager(model, {"ema": oe.EMA(0.9)}).attach(opt)
    train_step(model, opt, 1)
    avg._engine.run_after(lambda: 1 / 0)  # e.g. a save's copy that fails unexpectedly
    with pytest.raises(ZeroDivisionError):
        call_with_timeout(avg.flush, 30, "flush after a failing callable", abandon=[avg])
    with pytest.raises(RuntimeError, match="failed earlier"):
        call_with_timeout(lambda: train_step(model, opt, 2), 30, "the next step", abandon=[avg])
    call_with_timeout(avg.close, 30, "close", abandon=[avg])


def _specs():
    return {"ema": oe.EMA(0.9), "warm": oe.EMA(0.99, warmup_gamma=1.0),
            "power": oe.PowerEMA(0.2), "swa": oe.SWA(),
            "slow": oe.EMA(0.95, every=2, start=3), "lawa": oe.LAWA(4, every=3)}


def _device(kind, seed=0):
    return lazy_device(seed=seed) if kind == "lazy" else contextlib.nullcontext()


def _train(fold, kind, steps=30, reads=(7, 13), dtype=torch.float32, seed=0, **kw):
    """Averages after ``steps`` steps, and those read at the steps in ``reads`` (mid-fold)."""
    model, opt = make(dtype=dtype)
    out = {}
    with _device(kind, seed):
        with oe.Averager(model, _specs(), fold=fold, buffers="average", **kw) as avg:
            avg.attach(opt)
            for s in range(1, steps + 1):
                train_step(model, opt, s)
                if s in reads:
                    out[s] = {n: avg.averaged_state_dict(n) for n in _specs()}
            out["end"] = {n: avg.averaged_state_dict(n) for n in _specs()}
            out["stats"] = avg.stats()
    return out


def _assert_equal(a, b):
    for n in a:
        for k in a[n]:
            assert torch.equal(a[n][k], b[n][k]), (n, k)


@pytest.mark.parametrize("kind", ["host", "lazy"])
@pytest.mark.parametrize("fold", [2, 4, 16])
def test_fold_gives_the_bits_of_one_snapshot_per_pass(kind, fold):
    one = _train(1, kind)
    folded = _train(fold, kind)
    for when in (7, 13, "end"):
        _assert_equal(one[when], folded[when])
    st = folded["stats"]
    assert st["fold"] == fold and st["snapshots_applied"] == 30
    assert st["snapshots_folded"] == 30
    # Reads at 7 and 13 apply what is held; otherwise passes of `fold` snapshots.
    assert st["folds"] < 30 and st["staging_buffers"] == 2 * fold
    assert st["read_in_place_bytes"] == 0  # a held snapshot is a copy


def test_fold_matches_float64_references_with_bfloat16_parameters():
    """bf16 parameters stage as bf16: the fold kernel reads bf16 sources."""
    model, opt = make(dtype=torch.bfloat16)
    refs = {"ema": RefEMA(0.9), "lawa": RefLAWA(3)}
    with oe.Averager(model, {"ema": oe.EMA(0.9), "lawa": oe.LAWA(3, every=1)}, fold=4) as avg:
        avg.attach(opt)
        for s in range(1, 23):
            train_step(model, opt, s)
            for r in refs.values():
                r.update(snapshot(model))
        for n, r in refs.items():
            assert_matches(avg.averaged_state_dict(n), r.avg, rtol=1e-5, atol=1e-6)
    one = _train(1, "host", dtype=torch.bfloat16)
    _assert_equal(one["end"], _train(3, "host", dtype=torch.bfloat16)["end"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fold_on_the_simulated_copy_engine_matches_synchronous_updates(seed):
    """Deferred copies, a low-density model: each held snapshot must be the step's weights."""
    beta, steps = 0.9, 41
    model, opt = slab()
    with lazy_device(seed=seed):
        with oe.Averager(model, {"ema": oe.EMA(beta)}, fold=4) as avg:
            avg.attach(opt)
            for s in range(1, steps + 1):
                model.fake_backward(s)
                opt.step()
            got = avg.averaged_state_dict("ema")
    for name, ref in zip(sorted(got, key=lambda n: int(n.split(".")[-1])), slab_reference(beta, steps)):
        assert torch.equal(got[name], ref), name


def _gate(avg):
    """Holds the worker (before anything queued after it) until the event is set."""
    gate = threading.Event()
    avg._engine.run_after(lambda: gate.wait(30))
    return gate


def _busy_run(fold, policy, cycles=3, taken=5, busy=3):
    """Busy steps made deterministic: the worker is held while ``taken + busy`` steps run, so
    the first ``taken`` (the staging) are taken and the rest skipped / coalesced."""
    model, opt = make()
    staging = taken * Layout(model).nbytes
    with lazy_device(seed=1):
        with oe.Averager(model, _specs(), fold=fold, on_busy=policy,
                         staging_bytes=staging) as avg:
            avg.attach(opt)
            s = 0
            for _ in range(cycles):
                gate = _gate(avg)
                for _ in range(taken + busy):
                    s += 1
                    train_step(model, opt, s)
                gate.set()
                avg.flush()
            train_step(model, opt, s + 1)  # the busy steps' periods go to this one
            return {n: avg.averaged_state_dict(n) for n in _specs()}, avg.stats()


@pytest.mark.parametrize("policy", ["skip", "coalesce"])
def test_busy_policies_give_the_same_bits_when_folding(policy):
    one, st1 = _busy_run(1, policy)
    four, st4 = _busy_run(4, policy)
    _assert_equal(one, four)
    key = "snapshots_skipped" if policy == "skip" else "snapshots_coalesced"
    assert st1[key] == st4[key] == 9
    assert st4["snapshots_applied"] == st1["snapshots_applied"] == 16
    # Per cycle: 4 held, then the 5th applied at the flush; the last step's at the read.
    assert st4["folds"] == 7


def test_resume_while_snapshots_are_held_is_bit_exact():
    specs = _specs()
    straight = _train(1, "host", reads=())["end"]
    model, opt = make()
    with oe.Averager(model, specs, fold=4, buffers="average") as avg:
        avg.attach(opt)
        for s in range(1, 14):  # 13 = 3 * 4 + 1: one snapshot held when the state is taken
            train_step(model, opt, s)
        saved = {"model": {k: v.clone() for k, v in model.state_dict().items()},
                 "opt": copy.deepcopy(opt.state_dict()), "avg": avg.state_dict()}
        assert saved["avg"] is not None and avg.stats()["snapshots_applied"] == 13
    for fold in (3, 1):
        model, opt = make(seed=123)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(copy.deepcopy(saved["opt"]))  # it keeps (and steps) the tensors
        with oe.Averager(model, specs, fold=fold, buffers="average") as avg:
            avg.load_state_dict(saved["avg"])
            avg.attach(opt)
            for s in range(14, 31):
                train_step(model, opt, s)
            resumed = {n: avg.averaged_state_dict(n) for n in specs}
        _assert_equal(straight, resumed)


def _wait_until(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def test_fold_holds_snapshots_until_k_and_applies_them_before_a_read():
    model, opt = make()
    with oe.Averager(model, {"ema": oe.EMA(0.9)}, fold=4) as avg:
        avg.attach(opt)
        for s in range(1, 4):
            train_step(model, opt, s)
        avg.fence()
        _wait_until(lambda: avg.stats()["in_flight"] == 3)
        time.sleep(0.05)
        st = avg.stats()
        assert st["snapshots_applied"] == 0 and st["in_flight"] == 3  # held, not applied
        avg.averaged_state_dict("ema")  # the read folds the three
        st = avg.stats()
        assert st["snapshots_applied"] == 3 and st["folds"] == 1 and st["in_flight"] == 0
        for s in range(4, 12):
            train_step(model, opt, s)
        avg.fence()
        _wait_until(lambda: avg.stats()["snapshots_applied"] == 11)
        assert avg.stats()["folds"] == 3  # two passes of four, none for the held ones
        assert avg.stats()["snapshots_folded"] == 11


def test_auto_folds_a_backlog_and_holds_nothing_while_keeping_up():
    one = {}
    model, opt = make()
    with lazy_device(seed=2):
        with oe.Averager(model, _specs(), fold=1, staging_bytes=8 * Layout(model).nbytes) as avg:
            avg.attach(opt)
            for s in range(1, 13):
                train_step(model, opt, s)
                if s == 7:
                    avg.flush()
            one = {n: avg.averaged_state_dict(n) for n in _specs()}
    model, opt = make()
    with lazy_device(seed=2):
        with oe.Averager(model, _specs(), fold="auto") as avg:
            st = avg.stats()
            assert st["fold"] == 8 and st["staging_buffers"] == 8  # default: 2 x 4 snapshots
            avg.attach(opt)
            gate = _gate(avg)
            for s in range(1, 8):  # a backlog of seven: one pass
                train_step(model, opt, s)
            # All seven queued for the worker before it goes on (the issuer may still be
            # issuing the last one's copies: the worker would find its queue empty and fold 6).
            _wait_until(lambda: avg._engine.worker.queue.qsize() >= 7)
            gate.set()
            avg.flush()
            st = avg.stats()
            assert st["folds"] == 1 and st["snapshots_folded"] == 7
            for s in range(8, 13):
                train_step(model, opt, s)
                avg.fence()
                # Keeping up: nothing is held while the worker would be idle.
                _wait_until(lambda: avg.stats()["in_flight"] == 0)
            st = avg.stats()
            assert st["folds"] == 6 and st["snapshots_applied"] == 12
            _assert_equal(one, {n: avg.averaged_state_dict(n) for n in _specs()})


def test_auto_on_a_cpu_model_is_one_snapshot_per_pass():
    model, _ = make()
    with oe.Averager(model, {"ema": oe.EMA(0.9)}, fold="auto") as avg:
        st = avg.stats()
        assert st["fold"] == 1 and st["staging_buffers"] == 2


def test_steps_dropped_by_grad_scaler_are_left_out_of_a_fold():
    """A fused optimizer's inf/NaN step: its snapshot is held, then dropped, not folded."""
    def run(fold):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
        opt = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
        ref = RefEMA(0.7)
        with oe.Averager(model, {"ema": oe.EMA(0.7), "lawa": oe.LAWA(3, every=1)}, fold=fold) as avg:
            avg.attach(opt)
            for s in range(1, 12):
                g = torch.Generator().manual_seed(s)
                loss = model(torch.randn(8, 4, generator=g)).pow(2).mean()
                if s in (1, 4, 5, 9):
                    loss = loss * float("inf")
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                opt.zero_grad()
                if s not in (1, 4, 5, 9):
                    ref.update(snapshot(model))
            out = {n: avg.averaged_state_dict(n) for n in ("ema", "lawa")}
            st = avg.stats()
        assert st["snapshots_dropped_nonfinite"] == 4 and st["snapshots_applied"] == 7
        assert_matches(out["ema"], ref.avg, rtol=1e-6, atol=1e-7)
        return out
    _assert_equal(run(1), run(4))


def test_a_failing_fold_reaches_the_user_and_releases_the_staging(monkeypatch):
    def broken(*a, **kw):
        raise RuntimeError("injected fold failure")
    monkeypatch.setattr(ops, "ema_fold_multi_", broken)
    model, opt = make()
    avg = oe.Averager(model, {"ema": oe.EMA(0.9)}, fold=2)
    avg.attach(opt)
    with pytest.raises(RuntimeError, match="injected fold failure"):
        # The first snapshot initialises (a copy), the second is folded: the error comes at
        # the next step or the flush, whichever is first.
        for s in range(1, 6):
            train_step(model, opt, s)
            avg.fence()
            time.sleep(0.05)
        avg.flush()
    assert avg.stats()["in_flight"] == 0  # every ticket and buffer given back
    avg.close()  # returns: the error was reported once


@pytest.mark.parametrize("fold", [0, 17, "fast", 2.5, True, None])
def test_bad_fold_is_named(fold):
    model, _ = make()
    with pytest.raises(ValueError, match="fold must be an int from 1 to 16 or 'auto'"):
        oe.Averager(model, {"ema": oe.EMA(0.9)}, fold=fold)


def test_snapshots_held_when_the_worker_fails_are_given_back(monkeypatch):
    real = engine_mod.Worker._stage

    def failing(eng, job):
        if job.step == 3:
            raise RuntimeError("injected staging failure")
        return real(eng, job)
    monkeypatch.setattr(engine_mod.Worker, "_stage", failing)
    model, opt = make()
    avg = oe.Averager(model, {"ema": oe.EMA(0.9)}, fold=4).attach(opt)
    for s in range(1, 4):
        train_step(model, opt, s)
    avg.fence()
    _wait_until(lambda: avg.stats()["in_flight"] == 0)  # steps 1 and 2 were held: released
    assert avg.stats()["snapshots_applied"] == 0
    with pytest.raises(RuntimeError, match="injected staging failure"):
        avg.flush()
    avg.close()


def test_worker_error_reaches_the_main_thread_with_its_traceback(monkeypatch):
    def boom(*args, **kw):
        raise RuntimeError("kernel exploded")

    model, opt = make()
    avg = oe.Averager(model, {"ema": oe.EMA(0.9)})
    avg.attach(opt)
    train_step(model, opt, 1)  # initialisation: a copy, no kernel
    monkeypatch.setattr(oe.ops, "ema_update_multi_", boom)
    train_step(model, opt, 2)
    with pytest.raises(RuntimeError, match="kernel exploded") as info:
        avg.flush()
    frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert "boom" in frames and "_apply" in frames  # the worker's frames, not only ours
    with pytest.raises(RuntimeError, match="failed earlier"):
        train_step(model, opt, 3)
    avg.close()
    avg.close()  # idempotent


def test_error_is_reported_by_close_if_not_yet_seen(monkeypatch):
    monkeypatch.setattr(oe.ops, "ema_update_multi_", lambda *a, **k: 1 / 0)
    model, opt = make()
    avg = oe.Averager(model, {"ema": oe.EMA(0.9)})
    avg.step()
    avg.step()
    with pytest.raises(ZeroDivisionError):
        avg.close()
    avg.close()
    with pytest.raises(RuntimeError, match="closed"):
        avg.step()


def test_worker_leaves_torch_threads_of_the_training_thread_alone():
    before = torch.get_num_threads()
    model, opt = make()
    with oe.Averager(model, {"ema": oe.EMA(0.9)}) as avg:
        avg.attach(opt)
        run_steps(model, opt, avg, 3)
        avg.flush()
        assert torch.get_num_threads() == before
