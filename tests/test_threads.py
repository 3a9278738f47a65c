"""The Averager's background threads (worker, issuer, snapshot writer) fail loudly, never
silently and never with a hang: each failure reaches the training thread as an error."""
import threading

import pytest

import offload_ema as oe
from offload_ema import device as device_mod
from offload_ema import snapshots
from offload_ema.testing import LazyOps, lazy_device
from helpers import RefEMA, assert_matches, call_with_timeout, make, snapshot, train_step


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


@pytest.mark.parametrize("thread", ["worker", "issuer"])
def test_a_dead_background_thread_is_an_error_not_a_hang(thread, monkeypatch):
    """Whatever ends the worker or the issuer thread (here: it returns at once), the calls that
    wait for it raise instead of waiting forever."""
    from offload_ema import engine as engine_mod
    monkeypatch.setattr(engine_mod.Worker if thread == "worker" else engine_mod.Issuer, "_run",
                        lambda self: None)
    with lazy_device(seed=0, max_delay=0.0):
        model, opt = make()
        avg = oe.Averager(model, {"ema": oe.EMA(0.9)}).attach(opt)
        with pytest.raises(RuntimeError, match=f"offload_ema-{thread} thread stopped unexpectedly"):
            call_with_timeout(lambda: (train_step(model, opt, 1), train_step(model, opt, 2),
                                       avg.flush()), 30, "steps and flush", abandon=[avg])
        call_with_timeout(avg.close, 30, "close", abandon=[avg])


def test_the_writer_thread_runs_before_any_save_and_a_save_handed_over_at_exit_is_written(
        tmp_path, monkeypatch):
    """Python 3.12.0-3.12.2 cannot start a thread inside the exit's close: the writer's thread
    exists from the start, so a first save whose copy runs in that close is still written."""
    model, opt = make()
    avg = oe.Averager(model, {"ema": oe.EMA(0.9)}).attach(opt)
    assert avg._writer._thread.is_alive()  # before any save
    for s in range(1, 4):
        train_step(model, opt, s)
    ref = RefEMA(0.9)
    # (the reference of the three steps, replayed)
    model2, opt2 = make()
    for s in range(1, 4):
        train_step(model2, opt2, s)
        ref.update(snapshot(model2))

    start = threading.Thread.start

    def refuse(self):  # as at exit on those versions (the test's own timer thread may start)
        if self.name.startswith("offload_ema"):
            raise RuntimeError("can't create new thread at interpreter shutdown")
        return start(self)
    monkeypatch.setattr(threading.Thread, "start", refuse)
    fut = avg.save(tmp_path / "ema.safetensors", "ema")
    call_with_timeout(avg.close, 30, "close", abandon=[avg])
    monkeypatch.undo()
    assert fut.result(timeout=5) == str(tmp_path / "ema.safetensors")
    tensors, _ = snapshots.load_snapshot(tmp_path / "ema.safetensors")
    assert_matches(tensors, ref.avg, rtol=1e-6, atol=1e-7)


def test_an_averager_left_open_past_its_lazy_device_closes_without_a_hang():
    with lazy_device(seed=2, max_delay=0.002):
        model, opt = make()
        avg = oe.Averager(model, {"ema": oe.EMA(0.8)}).attach(opt)
        ref = RefEMA(0.8)
        for s in range(1, 4):
            train_step(model, opt, s)
            ref.update(snapshot(model))
    # The block is over: the simulated copy engine has stopped; the Averager still works.
    train_step(model, opt, 4)
    ref.update(snapshot(model))
    sd = call_with_timeout(lambda: avg.averaged_state_dict("ema"), 20, "a read after the block",
                           abandon=[avg])
    assert_matches(sd, ref.avg, rtol=1e-6, atol=1e-7)
    call_with_timeout(avg.close, 20, "close after the block", abandon=[avg])
