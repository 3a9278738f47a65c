"""The coordinator (``offload_ema.engine.Engine``): the training thread's calls (submit, fence,
recover, the busy policies) and every wait on a background thread, under interrupts at any
instruction, failures, full queues and dead threads."""
import contextlib
import gc
import sys
import threading
import time
import weakref

import pytest
import torch

import offload_ema as oe
from offload_ema import engine as engine_mod
from offload_ema.testing import lazy_device
from helpers import (RefEMA, RefLAWA, assert_matches, call_with_timeout, make, run_steps, snapshot,
                     train_step)

PKG = oe.__file__.rsplit("/", 1)[0]


SIMULATED = oe.testing.__file__


def _in_library(frame):
    # The simulated copy engine stands for the driver and the GPU (C code, atomic for Python):
    # no interrupt is injected there.
    name = frame.f_code.co_filename
    return name.startswith(PKG) and name != SIMULATED


class InterruptAt:
    """A tracer (this thread only) that counts the library's bytecode instructions ("opcode"
    events, so an interrupt can land between any two of them, not only between lines) and
    raises KeyboardInterrupt at the ``at``-th one (never, with at=None)."""

    def __init__(self, at=None):
        self.at, self.count = at, 0

    def __call__(self, frame, event, arg):
        if not _in_library(frame):
            return None
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        return self._local

    def _local(self, frame, event, arg):
        if event == "opcode":
            self.count += 1
            if self.count == self.at:
                raise KeyboardInterrupt(f"injected at instruction {self.count}")
        return self._local


SPECS = lambda: {"ema": oe.EMA(0.7), "lawa": oe.LAWA(2, every=1)}  # noqa: E731


INTERRUPTED_STEP = 3


# Each configuration is deterministic: the engine is idle (or, "busy", held full) when step 3
# starts, and the lazy device's claim policy decides who issues a whole snapshot's copies: the
# training thread's fence ("fence") or the issuer thread ("issuer").
CONFIGS = {
    "host": dict(device="host", on_busy="block"),
    "lazy-fence-issues": dict(device="lazy", claim="fence", on_busy="block"),
    "lazy-issuer-issues": dict(device="lazy", claim="issuer", on_busy="block"),
    "lazy-busy-coalesce": dict(device="lazy", claim="fence", on_busy="coalesce", busy=True),
}


def _run_with_interrupt(at, config):
    """Trains 5 steps; step 3's optimizer.step() is interrupted at the ``at``-th library
    instruction. Returns the averages, both references (with and without step 3's snapshot),
    the instruction count and whether the interrupt landed; fails the test if anything hangs
    (the whole run is on a thread of its own, with a timeout)."""
    built = []
    return call_with_timeout(lambda: _run(at, config, built), 60,
                             f"a run interrupted at instruction {at}", abandon=built)


def _run(at, config, built):
    if config["device"] == "lazy":
        with lazy_device(seed=at or 0, max_delay=0.0, claim_policy=config["claim"]):
            return _run(at, dict(config, device="host"), built)
    model, opt = make()
    avg = oe.Averager(model, SPECS(), on_busy=config["on_busy"], buffers="average").attach(opt)
    built.append(avg)
    gate = threading.Event()
    if config.get("busy"):
        # The worker waits here: steps 1 and 2 take both tickets, so step 3 finds no staging.
        avg._engine.run_after(lambda: gate.wait(20))
        # Until step 3 is over, or until an interrupted step 3 waits for the worker to settle.
        recover = avg._engine.recover
        avg._engine.recover = lambda step: (gate.set(), recover(step))[1]
    with_refs = {"ema": RefEMA(0.7), "lawa": RefLAWA(2)}
    without_refs = {"ema": RefEMA(0.7), "lawa": RefLAWA(2)}
    tracer, interrupted, pending = None, False, 0
    for s in range(1, 6):
        if s == INTERRUPTED_STEP:
            if not config.get("busy"):
                avg.flush()  # idle: the same instructions run in every repeat
            tracer = InterruptAt(at)
            sys.settrace(tracer)
        try:
            train_step(model, opt, s)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            sys.settrace(None)
        if s == INTERRUPTED_STEP and config.get("busy"):
            gate.set()
            avg.flush()
        snap = snapshot(model)
        snap.update({k: v.double().clone() for k, v in model.named_buffers()
                     if v.is_floating_point()})
        if s == INTERRUPTED_STEP and config.get("busy"):
            pending = 1  # coalesced into the next snapshot (EMA) / dropped (LAWA)
        else:
            with_refs["ema"].update(snap, periods=1 + pending)
            with_refs["lawa"].update(snap)
            pending = 0
        if s != INTERRUPTED_STEP:
            for r in without_refs.values():
                r.update(snap)
    result = {}

    # Every later call must return (or raise a clear error), never hang.
    avg.flush()
    result["avgs"] = {n: avg.averaged_state_dict(n) for n in SPECS()}
    result["stats"] = avg.stats()
    result["state"] = avg._rank_state_dict()
    avg.close()
    return result, with_refs, without_refs, tracer.count, interrupted


def _matches(got, refs):
    try:
        for n, r in refs.items():
            assert_matches(got[n], r.avg, rtol=1e-6, atol=1e-7)
        return True
    except AssertionError:
        return False


@pytest.mark.parametrize("config", list(CONFIGS))
def test_an_interrupt_at_any_instruction_of_a_step_leaves_a_consistent_averager(config):
    config = CONFIGS[config]
    _, _, _, count, interrupted = _run_with_interrupt(None, config)
    assert not interrupted and count > 200  # the library's instructions in one optimizer.step()
    outcomes = {"with": 0, "without": 0}
    for at in range(1, count + 1):
        result, with_refs, without_refs, seen, interrupted = _run_with_interrupt(at, config)
        assert interrupted, f"instruction {at} of {count} not reached ({seen}): not deterministic"
        # The step's snapshot is in every average, or in none.
        if _matches(result["avgs"], with_refs):
            outcomes["with"] += 1
        else:
            assert _matches(result["avgs"], without_refs), \
                f"interrupt at instruction {at}: the averages hold part of step 3's snapshot"
            outcomes["without"] += 1
        st = result["stats"]
        assert st["in_flight"] == 0
        assert st["snapshots_applied"] == st["snapshots_taken"]
        # The counted step and the saved state agree with what was applied.
        assert result["state"]["step"] == st["step"]
        assert st["step"] == (5 if _matches(result["avgs"], with_refs) else 4)
    assert outcomes["with"] and outcomes["without"], outcomes


def test_an_unfenced_reshape_names_the_tensor_and_the_missing_fence(monkeypatch):
    held = threading.Event()
    real = engine_mod.Worker._process

    def late(eng, job):  # the worker reaches the copy only after the change below
        assert held.wait(30)
        return real(eng, job)
    monkeypatch.setattr(engine_mod.Worker, "_process", late)
    model, opt = make()
    avg = oe.Averager(model, {"ema": oe.EMA(0.9)})
    train_step(model, opt, 1)
    avg.step(fence=False)
    model.fc2.bias.data = torch.zeros(7)  # no fence() first: breaks the contract
    held.set()
    with pytest.raises(RuntimeError, match=r"'fc2.bias' changed shape from \[4\] to \[7\].*"
                                           r"without avg.fence\(\) first"):
        avg.flush()
    avg.close()


@pytest.mark.parametrize("device", ["host", "lazy"])
def test_an_interrupt_right_after_the_job_is_queued_is_not_a_lost_snapshot(device):
    """The one point no line-level injection reaches: after the job's put, before the next
    statement. The job reached the worker, so the step counts and its snapshot is applied; its
    ticket is given back once (a second give-back would let one more snapshot than there are
    staging buffers in flight)."""
    ctx = lazy_device(seed=1, max_delay=0.001) if device == "lazy" else contextlib.nullcontext()
    with ctx:
        model, opt = make()
        avg = oe.Averager(model, SPECS(), buffers="average").attach(opt)
        engine = avg._engine
        capacity = engine.capacity
        refs = {"ema": RefEMA(0.7), "lawa": RefLAWA(2)}
        inbox, put_done = engine._inbox, []

        class Inbox:  # records that the put has happened
            def put(self, item):
                inbox.put(item)
                put_done.append(item)

            def __getattr__(self, name):
                return getattr(inbox, name)

        def tracer(frame, event, arg):
            if frame.f_code is not engine_mod.Engine.submit.__code__:
                return None
            frame.f_trace_opcodes = True

            def local(frame, event, arg):
                if event == "opcode" and put_done:
                    put_done.clear()
                    raise KeyboardInterrupt("injected right after the put")
                return local
            return local

        for s in range(1, 6):
            if s == 3:
                engine._inbox = Inbox()
                sys.settrace(tracer)
            try:
                train_step(model, opt, s)
                interrupted = False
            except KeyboardInterrupt:
                interrupted = True
            finally:
                sys.settrace(None)
                engine._inbox = inbox
            assert interrupted == (s == 3)
            snap = snapshot(model)
            snap.update({k: v.double().clone() for k, v in model.named_buffers()
                         if v.is_floating_point()})
            for r in refs.values():
                r.update(snap)
        avg.flush()
        st = avg.stats()
        assert st["step"] == 5 and st["snapshots_applied"] == 5 and st["in_flight"] == 0
        assert engine.pools.tickets.qsize() == capacity
        for n, r in refs.items():
            assert_matches(avg.averaged_state_dict(n), r.avg, rtol=1e-6, atol=1e-7)
        avg.close()


def test_a_fence_claim_left_by_a_second_interrupt_is_handed_back():
    """A second interrupt can land between an interrupted fence's check and its hand-back of
    the claim: the claim stays the fence's with nothing issued. flush / reads / close on the
    training thread hand it to the issuer instead of waiting for a copy nobody issues."""
    with lazy_device(seed=3, max_delay=0.0, claim_policy="fence"):
        model, opt = make()
        avg = oe.Averager(model, {"ema": oe.EMA(0.7)}).attach(opt)
        ref = RefEMA(0.7)
        for s in (1, 2):
            train_step(model, opt, s)
            ref.update(snapshot(model))
        eng = avg._engine
        eng._unfenced.claim["by"] = engine_mod.FENCE  # as left by the fence: never issued

        def as_the_training_thread(call):  # (the thread that fences: here, the timed one)
            def run():
                eng._fence_thread = threading.get_ident()
                return call()
            return run
        call_with_timeout(as_the_training_thread(avg.flush), 30,
                          "flush after an abandoned claim", abandon=[avg])
        assert_matches(avg.averaged_state_dict("ema"), ref.avg, rtol=1e-6, atol=1e-7)
        train_step(model, opt, 3)
        eng._unfenced.claim["by"] = engine_mod.FENCE
        call_with_timeout(as_the_training_thread(avg.close), 30,
                          "close after an abandoned claim", abandon=[avg])


def test_a_recover_cut_short_by_a_second_interrupt_is_finished_by_the_next_step():
    """A second interrupt inside recover() (before it refilled the tickets) must not lose a
    ticket for good: with one snapshot in flight at most, the next step would wait forever."""
    model, opt = make()
    staging = oe.averager.Layout(model).nbytes // 2  # chunked: one snapshot in flight
    with oe.Averager(model, {"ema": oe.EMA(0.7)}, staging_bytes=staging) as avg:
        avg.attach(opt)
        ref = RefEMA(0.7)
        train_step(model, opt, 1)
        ref.update(snapshot(model))
        avg.flush()
        eng = avg._engine
        assert eng.capacity == 1
        eng.pools.tickets.get_nowait()  # taken by a submit, then interrupted before it was recorded
        eng._dirty = True          # recover() began and was interrupted before its refill
        for s in (2, 3):
            call_with_timeout(lambda: train_step(model, opt, s), 30, f"step {s}", abandon=[avg])
            ref.update(snapshot(model))
        assert_matches(avg.averaged_state_dict("ema"), ref.avg, rtol=1e-6, atol=1e-7)
        assert avg.stats()["in_flight"] == 0


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


def test_a_failing_submit_leaves_nothing_behind(monkeypatch):
    model, opt = make()
    refs = {"ema": RefEMA(0.8), "lawa": RefLAWA(2)}
    real = engine_mod.Engine._issue
    fail_at = {3}
    calls = []

    def flaky(eng, job):
        calls.append(job.step)
        if job.step in fail_at and len(calls) == job.step:
            raise torch.OutOfMemoryError("injected: out of memory on a conversion temporary")
        return real(eng, job)
    monkeypatch.setattr(engine_mod.Engine, "_issue", flaky)
    with oe.Averager(model, {"ema": oe.EMA(0.8), "lawa": oe.LAWA(2, every=1)},
                     buffers="average", staging_bytes=_one_snapshot(model)) as avg:
        avg.attach(opt)
        for s in range(1, 8):
            if s == 3:
                with pytest.raises(torch.OutOfMemoryError, match="injected"):
                    train_step(model, opt, s)
                continue  # the optimizer stepped; the Averager did not count it
            train_step(model, opt, s)
            snap = snapshot(model)
            snap.update({k: v.double().clone() for k, v in model.named_buffers()
                         if v.is_floating_point()})
            for r in refs.values():
                r.update(snap)
        done = threading.Event()
        threading.Thread(target=lambda: (avg.flush(), done.set()), daemon=True).start()
        assert done.wait(30), "flush() hung after a failed submit"
        st = avg.stats()
        assert st["in_flight"] == 0 and st["step"] == 6 and st["snapshots_applied"] == 6
        for name, ref in refs.items():
            assert_matches(avg.averaged_state_dict(name), ref.avg, rtol=1e-6, atol=1e-7)


def _one_snapshot(model):
    return oe.averager.Layout(model).nbytes


def _worker_threads():
    return [t for t in threading.enumerate() if t.name.startswith("offload_ema-")]


def test_a_dropped_averager_releases_its_worker_and_staging(tmp_path):
    before = len(_worker_threads())
    model, opt = make()
    avg = oe.Averager(model, {"ema": oe.EMA(0.9)}).attach(opt)
    for s in range(1, 4):
        train_step(model, opt, s)
    avg.save(tmp_path / "ema.safetensors", "ema").result(timeout=60)
    staging = weakref.ref(avg._engine.staging.buffers[0])
    assert len(_worker_threads()) == before + 2  # worker and writer
    del avg
    gc.collect()
    assert staging() is None, "staging still referenced"
    assert len(_worker_threads()) == before
    train_step(model, opt, 4)  # the hooks left on the optimizer do nothing now


def test_flush_from_another_thread_returns_while_training_goes_on():
    """A snapshot submitted after flush's marker may be held until K are: flush waits for what
    was submitted before it, not for every snapshot to be applied."""
    model, opt = make()
    with oe.Averager(model, {"ema": oe.EMA(0.9)}, fold=4) as avg:
        avg.attach(opt)
        train_step(model, opt, 1)
        engine, queued, go = avg._engine, threading.Event(), threading.Event()
        run_after = engine.run_after

        def marker_then_wait(fn):
            run_after(fn)
            queued.set()
            go.wait(10)
        engine.run_after = marker_then_wait
        done = []
        t = threading.Thread(target=lambda: (avg.flush(), done.append(True)), daemon=True)
        t.start()
        assert queued.wait(10)
        engine.run_after = run_after
        train_step(model, opt, 2)  # after the marker: held
        go.set()
        t.join(10)
        assert done and avg.stats()["snapshots_applied"] >= 1


class Gate:
    """Holds the worker before it applies anything until released, so 'busy' is deterministic."""

    def __init__(self, monkeypatch):
        self.open = threading.Event()
        original = engine_mod.Worker._apply

        def gated(eng, *args, **kw):
            assert self.open.wait(30), "gate never opened"
            return original(eng, *args, **kw)
        monkeypatch.setattr(engine_mod.Worker, "_apply", gated)


def _one_slot(model):
    return oe.averager.Layout(model).nbytes  # staging for exactly one snapshot in flight


@pytest.mark.parametrize("policy", ["coalesce", "skip"])
def test_busy_policies_coalesce_and_skip(monkeypatch, policy):
    gate = Gate(monkeypatch)
    model, opt = make()
    beta = 0.8
    ref = RefEMA(beta)
    ref_lawa = RefLAWA(3)
    with oe.Averager(model, {"ema": oe.EMA(beta), "lawa": oe.LAWA(3, every=1)}, on_busy=policy,
                     staging_bytes=_one_slot(model)) as avg:
        avg.attach(opt)
        train_step(model, opt, 1)      # taken, held at the gate
        ref.update(snapshot(model))
        ref_lawa.update(snapshot(model))
        train_step(model, opt, 2)      # busy -> coalesced / skipped
        train_step(model, opt, 3)      # busy -> coalesced / skipped
        gate.open.set()
        avg.flush()
        train_step(model, opt, 4)      # taken: stands for steps 2..4 when coalescing
        snap = snapshot(model)
        ref.update(snap, periods=3 if policy == "coalesce" else 1)
        ref_lawa.update(snap)
        avg.flush()
        st = avg.stats()
        assert st["snapshots_taken"] == 2 and st["snapshots_applied"] == 2
        key = "snapshots_coalesced" if policy == "coalesce" else "snapshots_skipped"
        other = "snapshots_skipped" if policy == "coalesce" else "snapshots_coalesced"
        assert st[key] == 2 and st[other] == 0
        assert_matches(avg.averaged_state_dict("ema"), ref.avg, rtol=1e-6, atol=1e-7)
        assert_matches(avg.averaged_state_dict("lawa"), ref_lawa.avg, rtol=2.4e-7, atol=1e-9)


def test_block_policy_waits_and_stays_exact(monkeypatch):
    gate = Gate(monkeypatch)
    model, opt = make()
    ref = RefEMA(0.8)
    with oe.Averager(model, {"ema": oe.EMA(0.8)}, on_busy="block",
                     staging_bytes=_one_slot(model)) as avg:
        avg.attach(opt)
        train_step(model, opt, 1)
        ref.update(snapshot(model))
        # The gate opens 0.3 s after the training thread starts waiting (not after a fixed
        # time from here: a slow forward under load would eat into it).
        waiting = threading.Event()
        wait_capacity = avg._engine.wait_capacity
        avg._engine.wait_capacity = lambda: (waiting.set(), wait_capacity())[1]

        def open_later():
            if waiting.wait(30):
                time.sleep(0.3)
            gate.open.set()
        opener = threading.Thread(target=open_later, daemon=True)
        opener.start()
        train_step(model, opt, 2)  # blocks until the gate opens
        opener.join(30)
        ref.update(snapshot(model))
        st = avg.stats()
        assert waiting.is_set() and st["busy_wait_seconds"] >= 0.29
        assert st["snapshots_skipped"] == st["snapshots_coalesced"] == 0
        assert_matches(avg.averaged_state_dict("ema"), ref.avg, rtol=1e-6, atol=1e-7)


def test_stats_report_counts_and_sizes():
    model, opt = make()
    with oe.Averager(model, {"ema": oe.EMA(0.9, every=2)}) as avg:
        avg.attach(opt)
        run_steps(model, opt, avg, 7)
        avg.flush()
        st = avg.stats()
    nbytes = sum(p.numel() * 4 for p in model.parameters())
    assert st["step"] == 7
    assert st["snapshots_taken"] == st["snapshots_applied"] == 3
    assert st["bytes_copied"] == 3 * st["snapshot_bytes"] and st["snapshot_bytes"] >= nbytes
    assert st["lag_steps"] == 1  # last applied at step 6
    assert st["pinned_bytes"] == 0 and st["device"] == "cpu"
    for k in ("copy_seconds", "update_seconds", "fence_wait_seconds", "busy_wait_seconds"):
        assert st[k] >= 0
