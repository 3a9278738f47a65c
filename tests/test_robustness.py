"""The Averager as a misbehaving training script meets it: interrupts at every line of a step,
reads from other threads, a model changed under it, damaged metadata, use after close, resume at
every position of the LAWA ring."""
import contextlib
import functools
import sys
import threading

import pytest
import torch
from torch import nn

import offload_ema as oe
from offload_ema.testing import lazy_device
from offload_ema import engine as engine_mod
from helpers import (RefEMA, RefLAWA, assert_matches, call_with_timeout, make, snapshot,
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
    result["state"] = avg.state_dict()
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


# ---- reads from other threads ------------------------------------------------------------------

def test_reads_from_another_thread_are_never_torn():
    """LAWA(window=1) equals one step's weights exactly: a read mixing two steps is visible."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(6)])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = 300
    history = {}  # step -> the weights of that step
    reads, problems = [], []
    stop = threading.Event()
    with oe.Averager(model, {"last": oe.LAWA(1, every=1)}) as avg:
        avg.attach(opt)

        def reader():
            while not stop.is_set():
                if not avg.ready("last"):
                    continue
                try:
                    sd = avg.averaged_state_dict("last")
                    st = avg.stats()
                    state = avg.state_dict()
                except BaseException as exc:  # noqa: BLE001 - reported below
                    problems.append(repr(exc))
                    return
                reads.append((sd, st, state))
        t = threading.Thread(target=reader)
        t.start()
        for s in range(1, steps + 1):
            model(torch.randn(4, 8)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            history[s] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        stop.set()
        t.join(60)
    assert not problems, problems
    assert len(reads) >= 20, f"only {len(reads)} reads happened"
    for sd, st, state in reads:
        matching = [s for s, w in history.items() if all(torch.equal(sd[k], w[k]) for k in w)]
        assert matching, "a read mixed tensors of different steps"
        assert st["snapshots_applied"] <= st["snapshots_taken"] <= st["step"]
        # A state read from another thread is the state after one applied snapshot.
        ring = state["averages"]["last"]
        assert ring["applied"] == state["step"] == ring["last_step"]
        assert all(torch.equal(a, b) for a, b in zip(
            ring["slots"][ring["order"][0]], _flat(history[state["step"]])))


def _flat(weights):
    return [torch.cat([v.reshape(-1) for v in weights.values()])]


# ---- a model changed under the Averager ---------------------------------------------------------

@pytest.mark.parametrize("change", ["replaced", "frozen", "added", "new storage", "converted"])
def test_a_model_changed_after_construction_is_reported(change, tmp_path):
    model, opt = make()
    avg = oe.Averager(model, {"ema": oe.EMA(0.9)}).attach(opt)
    train_step(model, opt, 1)
    avg.fence()
    if change == "new storage":
        model.fc2.weight.data = model.fc2.weight.detach().clone()
        message = "'fc2.weight' was given new storage"
    elif change == "converted":  # (model.double() gives every parameter new storage too)
        model.double()
        message = "'fc1.weight' is (now )?torch.float64"
    elif change == "replaced":
        model.fc2.weight = nn.Parameter(model.fc2.weight.detach().clone())
        message = "'fc2.weight' was replaced by another tensor"
    elif change == "frozen":
        model.fc2.weight.requires_grad_(False)
        message = "'fc2.weight' was frozen"
    else:
        model.fc2.register_parameter("extra", nn.Parameter(torch.zeros(3)))
        message = "module 'fc2' gained or lost parameters"
    for read in (lambda: avg.averaged_state_dict("ema"),
                 lambda: avg.swapped(model, "ema").__enter__(),
                 lambda: avg.save(tmp_path / "ema.safetensors", "ema")):
        with pytest.raises(RuntimeError, match=message):
            read()
    # Training goes on: the worker stops at the next snapshot and the step says why.
    train_step(model, opt, 2)
    with pytest.raises(RuntimeError, match=message):
        avg.flush()
    assert not (tmp_path / "ema.safetensors").exists()
    with pytest.raises(RuntimeError, match="failed earlier"):
        train_step(model, opt, 3)
    avg.close()  # the error was reported: closing is quiet


@pytest.mark.parametrize("who_issues", ["fence", "issuer"])
def test_new_storage_between_the_step_and_its_copy_never_enters_the_snapshot(who_issues):
    """``p.data = ...`` right after a step, before that step's copy is issued (the lazy
    device's issuer holds it back): the snapshot must not take the new storage, and the next
    call says the parameter has new storage, instead of averaging it silently."""
    with lazy_device(seed=1, max_delay=0.0, claim_policy="fence"):
        model, opt = make()
        with oe.Averager(model, {"last": oe.LAWA(1, every=1)}) as avg:
            avg.attach(opt)
            train_step(model, opt, 1)
            avg.flush()  # step 1 applied before the change
            train_step(model, opt, 2)  # its copy waits for the next fence / read
            model.fc2.weight.data = torch.full_like(model.fc2.weight, 7.0)
            if who_issues == "fence":
                avg.fence()  # the training thread issues step 2's copy now
            with pytest.raises(RuntimeError, match="'fc2.weight' was given new storage"):
                call_with_timeout(avg.flush, 30, "flush", abandon=[avg])
            # Nothing with the new storage was applied.
            assert avg.stats()["snapshots_applied"] == 1


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


# ---- metadata, closed Averagers ----------------------------------------------------------------

def _write_with_meta(path, meta):
    from offload_ema.snapshots import write_atomic
    write_atomic(str(path), {"w": torch.zeros(2)}, meta)


@pytest.mark.parametrize("meta,field", [
    ({"format": "offload_ema.snapshot", "name": "ema", "step": "3"}, "'average'"),
    ({"format": "offload_ema.snapshot", "average": "{not json", "step": "3"}, "'average'"),
    ({"format": "offload_ema.snapshot", "average": "[1]", "step": "3"}, "'average'"),
    ({"format": "offload_ema.snapshot", "average": "{}", "step": "three"}, "'step'"),
])
def test_damaged_metadata_is_a_value_error_naming_the_file_and_field(tmp_path, meta, field):
    path = tmp_path / "bad.safetensors"
    _write_with_meta(path, meta)
    with pytest.raises(ValueError, match=f"bad.safetensors.*{field}"):
        oe.load_snapshot(path)


def test_every_method_of_a_closed_averager_raises(tmp_path):
    model, opt = make()
    avg = oe.Averager(model, {"ema": oe.EMA(0.9)}).attach(opt)
    train_step(model, opt, 1)
    avg.close()
    calls = [lambda: avg.save_every(2, str(tmp_path / "{name}-{step}.safetensors")),
             lambda: avg.save(tmp_path / "e.safetensors", "ema"), avg.step, avg.flush,
             lambda: avg.averaged_state_dict("ema"), lambda: avg.attach(opt),
             lambda: avg.swapped(model, "ema").__enter__()]
    for call in calls:
        with pytest.raises(RuntimeError, match="closed"):
            call()


# ---- resume at every position of the ring --------------------------------------------------------

def _specs():
    return {"ema": oe.EMA(0.8), "lawa": oe.LAWA(4, every=1), "lawa3": oe.LAWA(3, every=2)}


@functools.lru_cache(maxsize=None)
def _straight(steps):
    """The averages after every step of an uninterrupted run."""
    model, opt = make()
    out = {}
    with oe.Averager(model, _specs()) as avg:
        avg.attach(opt)
        for s in range(1, steps + 1):
            train_step(model, opt, s)
            out[s] = {n: avg.averaged_state_dict(n) for n in _specs() if avg.ready(n)}
    return out


@pytest.mark.parametrize("stop", range(1, 9))
def test_resume_at_every_ring_position_is_bit_exact(stop):
    """Compared after every step once resumed: the ring's order matters until the window has
    been refilled, so resuming at the wrong ring position shows there."""
    steps = 13
    straight = _straight(steps)
    model, opt = make()
    with oe.Averager(model, _specs()) as avg:
        avg.attach(opt)
        for s in range(1, stop + 1):
            train_step(model, opt, s)
        state = avg.state_dict()
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        opt_state = opt.state_dict()
    assert state["averages"]["lawa"]["next_pos"] == stop % 4
    model, opt = make(seed=99)
    model.load_state_dict(saved)
    opt.load_state_dict(opt_state)
    with oe.Averager(model, _specs()) as avg:
        avg.load_state_dict(state)
        avg.attach(opt)
        for s in range(stop + 1, steps + 1):
            train_step(model, opt, s)
            for n, expected in straight[s].items():
                got = avg.averaged_state_dict(n)
                for k in expected:
                    assert torch.equal(got[k], expected[k]), (stop, s, n, k)


def test_resume_with_coalesced_periods_pending_is_bit_exact(monkeypatch):
    """Saved while EMA periods are coalesced (pending) and resumed: the next snapshot carries
    them, exactly as in the run that was not interrupted."""
    gate = threading.Event()
    real = engine_mod.Worker._apply

    def gated(eng, *a, **k):
        assert gate.wait(30)
        return real(eng, *a, **k)

    def run(split):
        gate.clear()
        model, opt = make()
        one = oe.averager.Layout(model).nbytes
        avg = oe.Averager(model, {"ema": oe.EMA(0.8)}, on_busy="coalesce", staging_bytes=one)
        avg.attach(opt)
        train_step(model, opt, 1)  # taken, held at the gate
        train_step(model, opt, 2)  # coalesced
        train_step(model, opt, 3)  # coalesced
        # Pending periods in the state: read from the schedule without flushing the gate.
        pending = avg._schedule.coalesced["ema"]
        gate.set()
        avg.flush()  # both runs go on from an idle worker: the same steps are taken after
        if split:
            state = avg.state_dict()
            assert state["averages"]["ema"]["pending"] == pending == 2
            saved = {k: v.clone() for k, v in model.state_dict().items()}
            opt_state = opt.state_dict()
            avg.close()
            model, opt = make(seed=5)
            model.load_state_dict(saved)
            opt.load_state_dict(opt_state)
            avg = oe.Averager(model, {"ema": oe.EMA(0.8)}, on_busy="coalesce",
                              staging_bytes=one)
            avg.load_state_dict(state)
            avg.attach(opt)
        for s in range(4, 7):
            train_step(model, opt, s)
            avg.flush()
        out = avg.averaged_state_dict("ema")
        avg.close()
        return out

    monkeypatch.setattr(engine_mod.Worker, "_apply", gated)
    straight, resumed = run(False), run(True)
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k


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


# ---- a second interrupt --------------------------------------------------------------------------

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


def test_fsdp1_is_refused_at_construction():
    from torch.distributed.fsdp import FullyShardedDataParallel
    model, _ = make()
    wrapper = FullyShardedDataParallel.__new__(FullyShardedDataParallel)  # (no process group)
    nn.Module.__init__(wrapper)
    wrapper.inner = model
    with pytest.raises(NotImplementedError, match="FSDP1.*fully_shard"):
        oe.Averager(wrapper, {"ema": oe.EMA(0.9)})
