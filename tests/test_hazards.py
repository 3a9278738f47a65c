"""Hazards of the GPU and distributed paths, reproduced on the CPU: saves pending at exit, steps
skipped inside fused optimizers, failed submits, optimizers that do not match the averaged
tensors, compiled optimizer steps, dropped Averagers, the consolidate command."""
import gc
import os
import subprocess
import sys
import threading
import weakref

import pytest
import torch
from torch import nn

import offload_ema as oe
from offload_ema import engine as engine_mod
from helpers import RefEMA, RefLAWA, assert_matches, make, snapshot, train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code, tmp_path, timeout=120):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, cwd=tmp_path, env=env)


# The worker is slowed down so that the save is still queued behind the updates when the script
# ends: it must be written before the process exits.
_EXIT_SCRIPT = """
import sys, time, torch, offload_ema as oe

real = oe.ops.ema_update_multi_
def slow(*a, **k):
    time.sleep(0.2)
    return real(*a, **k)
oe.ops.ema_update_multi_ = slow
if sys.argv[2] == "fail":
    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")
    import offload_ema.writer as writer_mod
    writer_mod.write_atomic = disk_full
m = torch.nn.Linear(64, 64)
opt = torch.optim.SGD(m.parameters(), lr=0.1)
avg = oe.Averager(m, {"ema": oe.EMA(0.9)}, staging_bytes=1 << 20).attach(opt)
for _ in range(4):
    m(torch.randn(4, 64)).sum().backward(); opt.step(); opt.zero_grad()
avg.save(sys.argv[1], "ema")
print("end of script", flush=True)
"""


def test_a_save_pending_at_exit_is_written(tmp_path):
    path = tmp_path / "ema.safetensors"
    r = _python(_EXIT_SCRIPT.replace("sys.argv[1]", repr(str(path))).replace(
        "sys.argv[2]", "'ok'"), tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "end of script"
    tensors, meta = oe.load_snapshot(path)
    assert meta["step"] == 4 and meta["applied"] == 4 and set(tensors) == {"weight", "bias"}


def test_a_save_that_fails_at_exit_is_loud_and_the_exit_status_is_not_zero(tmp_path):
    path = tmp_path / "ema.safetensors"
    r = _python(_EXIT_SCRIPT.replace("sys.argv[1]", repr(str(path))).replace(
        "sys.argv[2]", "'fail'"), tmp_path)
    assert r.returncode != 0
    assert "No space left on device" in r.stderr and "pending snapshot" in r.stderr
    assert not path.exists()


# ---- steps skipped inside the optimizer ------------------------------------------------------

def _scaled_training(fused, bad_steps, steps=10):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    refs = {"ema": RefEMA(0.7), "lawa": RefLAWA(3)}
    avg = oe.Averager(model, {"ema": oe.EMA(0.7), "lawa": oe.LAWA(3, every=1)}).attach(opt)
    for s in range(1, steps + 1):
        g = torch.Generator().manual_seed(s)
        loss = model(torch.randn(8, 4, generator=g)).pow(2).mean()
        if s in bad_steps:
            loss = loss * float("inf")  # inf/NaN gradients: the scaler skips this step
        before = [p.detach().clone() for p in model.parameters()]
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        stepped = any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
        assert stepped == (s not in bad_steps)
        if stepped:
            for r in refs.values():
                r.update(snapshot(model))
    return avg, refs


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_steps_skipped_by_grad_scaler_never_enter_an_average(fused):
    bad = {1, 4, 5, 9}  # also the very first step: the EMA starts from the next good one
    avg, refs = _scaled_training(fused, bad)
    with avg:
        for name, ref in refs.items():
            assert_matches(avg.averaged_state_dict(name), ref.avg, rtol=1e-6, atol=1e-7)
        st = avg.stats()  # after the reads: every snapshot applied
    assert st["snapshots_applied"] == 10 - len(bad)
    if fused:  # the optimizer ran (its post-hook too): counted, its snapshot dropped
        assert st["step"] == 10 and st["snapshots_dropped_nonfinite"] == len(bad)
    else:      # GradScaler never called step(): not counted at all
        assert st["step"] == 10 - len(bad) and st["snapshots_dropped_nonfinite"] == 0


# ---- a failing submit ----------------------------------------------------------------------

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


# ---- attach ----------------------------------------------------------------------------------

def test_several_optimizers_count_as_one_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    matrices = [p for p in model.parameters() if p.dim() == 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    opt_a = torch.optim.SGD(matrices, lr=0.05, momentum=0.9)
    opt_b = torch.optim.AdamW(vectors, lr=0.01)
    ref = RefEMA(0.6)
    with oe.Averager(model, {"ema": oe.EMA(0.6)}) as avg:
        avg.attach(opt_a, opt_b)
        for s in range(1, 9):
            g = torch.Generator().manual_seed(s)
            model(torch.randn(4, 6, generator=g)).pow(2).mean().backward()
            opt_a.step()
            opt_b.step()
            opt_a.zero_grad()
            opt_b.zero_grad()
            ref.update(snapshot(model))
        avg.flush()
        assert avg.stats()["step"] == 8 and avg.stats()["snapshots_applied"] == 8
        assert_matches(avg.averaged_state_dict("ema"), ref.avg, rtol=1e-6, atol=1e-7)


class TwoParts(nn.Module):
    """Two halves trained by two optimizers; ``blow_up`` makes only the second half's
    gradients non-finite (GradScaler then skips that optimizer alone)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 2)

    def forward(self, x, blow_up=False):
        h = torch.tanh(self.a(x))
        out = self.b(h.detach())  # b's loss does not reach a's gradients
        return h.pow(2).mean() + out.pow(2).mean() * (float("inf") if blow_up else 1.0)


@pytest.mark.parametrize("order", ["a-then-b", "b-then-a"])
@pytest.mark.parametrize("skipped", ["a", "b"])
def test_several_optimizers_stay_aligned_when_grad_scaler_skips_one_of_them(order, skipped):
    """GradScaler skips the step of the optimizer whose own gradients overflowed (a non-fused
    one is not called at all): the snapshot of that step still follows the other optimizer's
    update, and every later snapshot follows both (not one optimizer's step behind)."""
    torch.manual_seed(0)
    model = TwoParts()
    opts = {"a": torch.optim.SGD(model.a.parameters(), lr=0.1, momentum=0.9),
            "b": torch.optim.SGD(model.b.parameters(), lr=0.1, momentum=0.9)}
    first, second = order.split("-then-")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    bad = {2, 5}
    refs = {"ema": RefEMA(0.6), "lawa": RefLAWA(2)}
    with oe.Averager(model, {"ema": oe.EMA(0.6), "lawa": oe.LAWA(2, every=1)}) as avg:
        avg.attach(opts["a"], opts["b"])
        for s in range(1, 10):
            g = torch.Generator().manual_seed(s)
            x = torch.randn(4, 6, generator=g)
            if skipped == "a":  # a's gradients overflow: scale a's loss instead
                loss = model(x) if s not in bad else (
                    torch.tanh(model.a(x)).pow(2).mean() * float("inf")
                    + model.b(torch.tanh(model.a(x)).detach()).pow(2).mean())
            else:
                loss = model(x, blow_up=s in bad)
            scaler.scale(loss).backward()
            before = {k: [p.detach().clone() for p in o.param_groups[0]["params"]]
                      for k, o in opts.items()}
            scaler.step(opts[first])
            scaler.step(opts[second])
            scaler.update()
            for o in opts.values():
                o.zero_grad()
            moved = {k: any(not torch.equal(b, p) for b, p in
                            zip(before[k], opts[k].param_groups[0]["params"])) for k in opts}
            assert moved[skipped] == (s not in bad) and moved[
                "b" if skipped == "a" else "a"], (s, moved)
            for r in refs.values():
                r.update(snapshot(model))
        # The last step's snapshot is whole: flush (or any read here) takes a pending one.
        avg.flush()
        st = avg.stats()
        assert st["step"] == 9 and st["snapshots_applied"] == 9
        for name, ref in refs.items():
            assert_matches(avg.averaged_state_dict(name), ref.avg, rtol=1e-6, atol=1e-7)


def test_a_step_whose_second_optimizer_was_skipped_last_is_taken_by_a_read():
    """The training loop ends on a step where GradScaler skipped one optimizer: the read takes
    that step's snapshot (it waits for no later step)."""
    torch.manual_seed(0)
    model = TwoParts()
    opt_a = torch.optim.SGD(model.a.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(model.b.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    ref = RefEMA(0.5)
    with oe.Averager(model, {"ema": oe.EMA(0.5)}) as avg:
        avg.attach(opt_a, opt_b)
        for s in range(1, 4):
            scaler.scale(model(torch.randn(4, 6), blow_up=s == 3)).backward()
            scaler.step(opt_a)
            scaler.step(opt_b)
            scaler.update()
            opt_a.zero_grad()
            opt_b.zero_grad()
            ref.update(snapshot(model))
        assert_matches(avg.averaged_state_dict("ema"), ref.avg, rtol=1e-6, atol=1e-7)
        assert avg.stats()["step"] == 3


def test_attach_refuses_optimizers_that_do_not_update_the_averaged_tensors():
    model, _ = make()
    with oe.Averager(model, {"ema": oe.EMA(0.9)}) as avg:
        # Only part of the model: the other optimizer's steps would be neither fenced nor seen.
        part = torch.optim.SGD(model.fc1.parameters(), lr=0.1)
        with pytest.raises(ValueError, match=r"'fc2.weight'.*updated by none of the optimizers"):
            avg.attach(part)
        # Another model's optimizer.
        other, other_opt = make()
        with pytest.raises(ValueError, match="not a parameter of the model this Averager"):
            avg.attach(torch.optim.SGD([*model.parameters(), other.fc1.weight], lr=0.1))
        # Parameters re-created after the Averager was built (as fully_shard or to_empty do).
        model.fc2.weight = nn.Parameter(model.fc2.weight.detach().clone())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with pytest.raises(RuntimeError, match="'fc2.weight' was replaced by another tensor"):
            avg.attach(opt)
        with pytest.raises(TypeError, match="at least one optimizer"):
            avg.attach()


def test_attach_refuses_a_model_converted_after_the_averager_was_built():
    model, opt = make()
    with oe.Averager(model, {"ema": oe.EMA(0.9)}) as avg:
        model.double()  # same Parameter objects, new data (as model.cuda() does)
        with pytest.raises(RuntimeError, match=r"is torch.float64 on cpu, but was torch.float32 "
                                               r"on cpu.*build the Averager after moving"):
            avg.attach(opt)


# ---- compiled optimizer steps -----------------------------------------------------------------

def test_a_compiled_optimizer_step_keeps_the_hooks_out_of_the_graph():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    ref = RefEMA(0.5)

    @torch.compile(backend="eager")
    def step():
        opt.step()

    with oe.Averager(model, {"ema": oe.EMA(0.5)}) as avg:
        avg.attach(opt)
        for s in range(1, 7):
            model(torch.randn(2, 4)).pow(2).mean().backward()
            step()
            opt.zero_grad()
            ref.update(snapshot(model))
        avg.flush()
        assert avg.stats()["snapshots_applied"] == 6
        assert_matches(avg.averaged_state_dict("ema"), ref.avg, rtol=1e-6, atol=1e-7)
    # Dynamo skipped the hooks as a whole; it never tried to trace the engine (its lock,
    # timers, queue) into a graph.
    traced_into_us = [k for k in counters["graph_break"] if "disable" not in k]
    assert not traced_into_us, traced_into_us


# ---- an Averager dropped without close() --------------------------------------------------------

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


# ---- the command line ---------------------------------------------------------------------------

def test_consolidate_runs_as_a_module(tmp_path):
    model, opt = make()
    with oe.Averager(model, {"ema": oe.EMA(0.9)}) as avg:
        avg.attach(opt)
        train_step(model, opt, 1)
        avg.save(tmp_path / "ema.safetensors", "ema").result(timeout=60)
    r = subprocess.run([sys.executable, "-m", "offload_ema.cli", "consolidate",
                        str(tmp_path / "ema.safetensors"), str(tmp_path / "one.safetensors")],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    one, meta = oe.load_snapshot(tmp_path / "one.safetensors")
    assert set(one) == set(model.state_dict()) and meta["name"] == "ema"


def test_closure_optimizers_attached_together_count_each_step_once():
    """A closure optimizer runs the model's forward inside its step: that forward must not end
    the training step (the first optimizer's update alone, before the second's)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    a = torch.optim.SGD(model[0].parameters(), lr=0.1)
    b = torch.optim.SGD(model[1].parameters(), lr=0.1)
    x = torch.randn(16, 4)
    ref = RefEMA(0.9)
    with oe.Averager(model, {"ema": oe.EMA(0.9)}) as avg:
        avg.attach(a, b)
        for _ in range(5):
            def closure():
                a.zero_grad()
                b.zero_grad()
                loss = model(x).pow(2).mean()
                loss.backward()
                return loss
            closure()
            a.step(closure)
            b.step(closure)
            ref.update(snapshot(model))
        avg.flush()
        st = avg.stats()
        assert st["step"] == 5 and st["snapshots_taken"] == 5, st
        assert_matches(avg.averaged_state_dict("ema"), ref.avg, rtol=1e-6, atol=1e-7)
