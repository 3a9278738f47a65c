"""Averager on CPU: semantics against independent references (torch.optim.swa_utils, float64,
a plain deque), schedules, busy policies, resume, swapped, faults."""
import copy
import os
import subprocess
import sys
import threading
import time
import traceback

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import offload_ema as oe
from offload_ema import engine as engine_mod
from helpers import RefEMA, RefLAWA, assert_matches, make, snapshot, train_step


def run(model, opt, avg, steps, start=0, on_step=None):
    for s in range(start + 1, start + steps + 1):
        train_step(model, opt, s)
        if on_step:
            on_step(s)


# ---- semantics ------------------------------------------------------------------------------

@pytest.mark.parametrize("every,start", [(1, 0), (3, 0), (2, 5)])
def test_ema_matches_swa_utils_averaged_model(every, start):
    model, opt = make()
    beta = 0.9
    ref = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(beta), use_buffers=False)
    with oe.Averager(model, {"ema": oe.EMA(beta, every=every, start=start)}) as avg:
        avg.attach(opt)

        def on_step(s):
            if s > start and (s - start) % every == 0:
                ref.update_parameters(model)
        run(model, opt, avg, 40, on_step=on_step)
        got = avg.averaged_state_dict("ema")
        assert avg.stats()["snapshots_applied"] == len(
            [s for s in range(1, 41) if s > start and (s - start) % every == 0])
    ref_params = dict(ref.module.named_parameters())
    for name, p in ref_params.items():
        torch.testing.assert_close(got[name], p.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_ema_matches_float64_reference_for_every_param_dtype(dtype):
    model, opt = make(dtype=dtype, lr=0.01)
    ref = RefEMA(0.99)
    with oe.Averager(model, {"ema": oe.EMA(0.99)}) as avg:
        avg.attach(opt)
        run(model, opt, avg, 60, on_step=lambda s: ref.update(snapshot(model)))
        got = avg.averaged_state_dict("ema")
    for k in ref.avg:
        assert got[k].dtype == torch.float32
    # The accumulator is float32 whatever the parameter dtype: it follows the float64 EMA of the
    # (exact) bf16/fp16 snapshots to float32 precision instead of stalling at bf16 resolution.
    assert_matches(got, ref.avg, rtol=1e-5, atol=1e-6)


def test_lawa_matches_a_plain_deque_mean():
    model, opt = make()
    ref = RefLAWA(4)
    with oe.Averager(model, {"lawa": oe.LAWA(window=4, every=3, start=2)}) as avg:
        avg.attach(opt)
        run(model, opt, avg, 31,
            on_step=lambda s: ref.update(snapshot(model)) if s > 2 and (s - 2) % 3 == 0 else None)
        got = avg.averaged_state_dict("lawa")
    assert_matches(got, ref.avg, rtol=2.4e-7, atol=1e-9)


def test_lawa_keeps_bf16_slots_exactly_and_means_in_float64():
    model, opt = make(dtype=torch.bfloat16, lr=0.02)
    ref = RefLAWA(5)
    with oe.Averager(model, {"lawa": oe.LAWA(window=5, every=1)}) as avg:
        avg.attach(opt)
        run(model, opt, avg, 12, on_step=lambda s: ref.update(snapshot(model)))
        got = avg.averaged_state_dict("lawa")
    # Mean of exact bf16 slots in float64, rounded once: within one float32 unit.
    assert_matches(got, ref.avg, rtol=1.2e-7, atol=1e-30)


def test_several_averages_share_one_snapshot():
    model, opt = make()
    refs = {"fast": RefEMA(0.9), "slow": RefEMA(0.999), "lawa": RefLAWA(3), "late": RefEMA(0.5)}
    specs = {"fast": oe.EMA(0.9), "slow": oe.EMA(0.999), "lawa": oe.LAWA(3, every=2),
             "late": oe.EMA(0.5, every=4, start=6)}

    def on_step(s):
        snap = snapshot(model)
        for name, spec in specs.items():
            if spec.is_due(s):
                refs[name].update(snap)

    with oe.Averager(model, specs) as avg:
        avg.attach(opt)
        run(model, opt, avg, 25, on_step=on_step)
        for name in specs:
            assert_matches(avg.averaged_state_dict(name), refs[name].avg, rtol=1e-5, atol=1e-7)
        stats = avg.stats()  # after the reads: every snapshot taken is applied
    # Every step is due for "fast", so one snapshot per step feeds all four averages.
    assert stats["snapshots_taken"] == stats["snapshots_applied"] == 25


def test_manual_step_equals_attach():
    results = []
    for mode in ("attach", "manual", "manual-deferred"):
        model, opt = make()
        with oe.Averager(model, {"ema": oe.EMA(0.8), "lawa": oe.LAWA(2, every=2)}) as avg:
            if mode == "attach":
                avg.attach(opt)
            for s in range(1, 21):
                if mode == "manual-deferred":
                    avg.fence()  # before the optimizer changes the parameters in place
                train_step(model, opt, s)
                if mode == "manual":
                    avg.step()
                elif mode == "manual-deferred":
                    avg.step(fence=False)
            results.append((avg.averaged_state_dict("ema"), avg.averaged_state_dict("lawa")))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            for k in a:
                assert torch.equal(a[k], b[k])


def test_chunked_staging_gives_identical_averages_and_reports_fence_wait():
    outs = []
    for staging in (None, 1003):  # two odd-sized slots: no multiple of any dtype size
        model, opt = make(width=64)
        with oe.Averager(model, {"ema": oe.EMA(0.9), "lawa": oe.LAWA(3, every=2)},
                         staging_bytes=staging) as avg:
            avg.attach(opt)
            run(model, opt, avg, 15)
            st = avg.stats()
            outs.append((avg.averaged_state_dict("ema"), avg.averaged_state_dict("lawa"), st))
    full, chunked = outs
    assert full[2]["chunks_per_snapshot"] == 1
    assert chunked[2]["chunks_per_snapshot"] > 3
    assert chunked[2]["staging_bytes"] <= 1003
    assert chunked[2]["fence_wait_seconds"] > 0
    for a, b in zip(full[:2], chunked[:2]):
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_thousands_of_small_tensors():
    class Many(nn.Module):
        def __init__(self):
            super().__init__()
            self.ps = nn.ParameterList([nn.Parameter(torch.randn(3 + i % 7)) for i in range(3000)])

        def forward(self, x):
            return sum(p.sum() for p in self.ps) * x.sum()

    torch.manual_seed(0)
    model = Many()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    ref = RefEMA(0.7)
    with oe.Averager(model, {"ema": oe.EMA(0.7)}) as avg:
        avg.attach(opt)
        for s in range(5):
            model(torch.ones(2)).backward()
            opt.step()
            opt.zero_grad()
            ref.update(snapshot(model))
        got = avg.averaged_state_dict("ema")
        assert avg.stats()["chunks_per_snapshot"] == 1
    assert len(got) == 3000
    assert_matches(got, ref.avg, rtol=1e-6, atol=1e-7)


# ---- model handling -------------------------------------------------------------------------

def test_frozen_parameters_are_not_averaged_but_reported():
    model, opt = make()
    model.fc1.bias.requires_grad_(False)
    with torch.no_grad():
        model.fc1.bias.fill_(0.25)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with oe.Averager(model, {"ema": oe.EMA(0.5)}) as avg:
        avg.attach(opt)
        run(model, opt, avg, 3)
        assert avg.stats()["snapshot_bytes"] < sum(p.numel() * 4 for p in model.parameters())
        with torch.no_grad():
            model.fc1.bias.fill_(0.5)  # frozen: reported with its value now
        sd = avg.averaged_state_dict("ema")
    assert torch.equal(sd["fc1.bias"], torch.full((16,), 0.5))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(self.emb(x))


def test_tied_parameters_are_averaged_once_under_both_names():
    torch.manual_seed(0)
    model = Tied()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref = RefEMA(0.5)
    with oe.Averager(model, {"ema": oe.EMA(0.5)}) as avg:
        avg.attach(opt)
        for s in range(4):
            model(torch.tensor([1, 2, 3])).sum().backward()
            opt.step()
            opt.zero_grad()
            ref.update(snapshot(model))
        assert 240 <= avg.stats()["snapshot_bytes"] < 2 * 240  # once (plus alignment), not twice
        sd = avg.averaged_state_dict("ema")
    assert set(sd) == {"emb.weight", "head.weight"}
    torch.testing.assert_close(sd["head.weight"].double(), ref.avg["emb.weight"])
    assert torch.equal(sd["emb.weight"], sd["head.weight"])


@pytest.mark.parametrize("buffers", ["copy", "average"])
def test_buffers_copied_or_averaged(buffers):
    model, opt = make()
    model.train()
    ref = RefEMA(0.6)
    with oe.Averager(model, {"ema": oe.EMA(0.6)}, buffers=buffers) as avg:
        avg.attach(opt)

        def on_step(s):
            ref.update({"bn.running_mean": model.bn.running_mean.double().clone()})
        run(model, opt, avg, 6, on_step=on_step)
        sd = avg.averaged_state_dict("ema")
    assert sd["bn.num_batches_tracked"].dtype == torch.int64
    assert int(sd["bn.num_batches_tracked"]) == 6
    if buffers == "copy":
        assert torch.equal(sd["bn.running_mean"], model.bn.running_mean)
    else:
        torch.testing.assert_close(sd["bn.running_mean"].double(), ref.avg["bn.running_mean"])
        assert not torch.equal(sd["bn.running_mean"], model.bn.running_mean)


def test_names_of_compiled_and_wrapped_models_are_normalised():
    model, opt = make()
    compiled = torch.compile(model, backend="eager")
    wrapped = nn.DataParallel(model) if not torch.cuda.is_available() else model
    expected = list(model.state_dict())
    for m in (compiled, wrapped):
        with oe.Averager(m, {"ema": oe.EMA(0.5)}) as avg:
            avg.attach(opt)
            run(model, opt, avg, 2)
            assert list(avg.averaged_state_dict("ema")) == expected


def test_swapped_on_compiled_model_is_seen_by_the_compiled_forward():
    model, opt = make()
    model.eval()
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(3, 8)
    with oe.Averager(compiled, {"ema": oe.EMA(0.5)}) as avg:
        avg.attach(opt)
        model.train()
        run(model, opt, avg, 4)
        model.eval()
        sd = avg.averaged_state_dict("ema")
        ref_model, _ = make()
        ref_model.load_state_dict(sd)
        ref_model.eval()
        before = compiled(x)
        ptrs = [p.data_ptr() for p in model.parameters()]
        with avg.swapped(compiled, "ema"):
            assert [p.data_ptr() for p in model.parameters()] == ptrs  # same storage
            inside = compiled(x)
        after = compiled(x)
    torch.testing.assert_close(inside, ref_model(x))
    assert torch.equal(before, after)


# ---- swapped --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_swapped_puts_the_average_in_and_restores_exactly(dtype):
    model, opt = make(dtype=dtype)
    with oe.Averager(model, {"lawa": oe.LAWA(3, every=1)}) as avg:
        avg.attach(opt)
        run(model, opt, avg, 5)
        original = {k: v.clone() for k, v in model.state_dict().items()}
        expected = avg.averaged_state_dict("lawa")
        with avg.swapped(model, "lawa"):
            for k, v in model.state_dict().items():
                assert torch.equal(v, expected[k].to(v.dtype)), k
        for k, v in model.state_dict().items():
            assert torch.equal(v, original[k]), k
        with pytest.raises(ZeroDivisionError):
            with avg.swapped(model, "lawa"):
                1 / 0
        for k, v in model.state_dict().items():
            assert torch.equal(v, original[k]), k


# ---- busy policies ----------------------------------------------------------------------------

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


# ---- resume -----------------------------------------------------------------------------------

def _specs():
    return {"ema": oe.EMA(0.9), "slow": oe.EMA(0.99, every=2, start=3),
            "lawa": oe.LAWA(4, every=3)}


def test_resume_is_bit_exact():
    model, opt = make()
    with oe.Averager(model, _specs()) as avg:
        avg.attach(opt)
        run(model, opt, avg, 30)
        straight = {n: avg.averaged_state_dict(n) for n in _specs()}

    model, opt = make()
    with oe.Averager(model, _specs()) as avg:
        avg.attach(opt)
        run(model, opt, avg, 13)
        saved = {"model": {k: v.clone() for k, v in model.state_dict().items()},
                 "opt": copy.deepcopy(opt.state_dict()), "avg": avg.state_dict()}
        run(model, opt, avg, 5, start=13)  # the accumulators move on; saved state must not
    model, opt = make(seed=123)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    with oe.Averager(model, _specs()) as avg:
        avg.load_state_dict(saved["avg"])
        assert avg.step_count == 13
        avg.attach(opt)
        run(model, opt, avg, 17, start=13)
        resumed = {n: avg.averaged_state_dict(n) for n in _specs()}
    for n in straight:
        for k in straight[n]:
            assert torch.equal(straight[n][k], resumed[n][k]), (n, k)


def test_load_state_dict_rejects_a_different_model_or_averages():
    model, opt = make()
    with oe.Averager(model, {"ema": oe.EMA(0.9)}) as avg:
        avg.attach(opt)
        run(model, opt, avg, 2)
        state = avg.state_dict()
    other, _ = make(width=32)
    with oe.Averager(other, {"ema": oe.EMA(0.9)}) as avg2:
        with pytest.raises(ValueError, match="different model"):
            avg2.load_state_dict(state)
    with oe.Averager(model, {"ema": oe.EMA(0.95)}) as avg3:
        with pytest.raises(ValueError, match="average 'ema' was saved as"):
            avg3.load_state_dict(state)
    with oe.Averager(model, {"other": oe.EMA(0.9)}) as avg4:
        with pytest.raises(ValueError, match="state holds averages"):
            avg4.load_state_dict(state)
    with oe.Averager(model, {"ema": oe.EMA(0.9)}) as avg5:
        with pytest.raises(ValueError, match="not an offload_ema"):
            avg5.load_state_dict({"something": 1})


# ---- faults and bad input ---------------------------------------------------------------------

@pytest.mark.parametrize("make_spec,message", [
    (lambda: oe.EMA(1.0), "beta must be in \\[0, 1\\)"),
    (lambda: oe.EMA(-0.1), "beta must be in \\[0, 1\\)"),
    (lambda: oe.EMA(float("nan")), "beta must be in \\[0, 1\\)"),
    (lambda: oe.EMA(0.9, every=0), "every must be an int >= 1"),
    (lambda: oe.EMA(0.9, start=-1), "start must be an int >= 0"),
    (lambda: oe.LAWA(0, every=1), "window must be an int >= 1"),
    (lambda: oe.LAWA(2, every=0), "every must be an int >= 1"),
    (lambda: oe.LAWA(2.5, every=1), "window must be an int >= 1"),
])
def test_average_specs_reject_bad_values(make_spec, message):
    with pytest.raises(ValueError, match=message):
        make_spec()


def test_averager_rejects_bad_arguments():
    model, _ = make()
    with pytest.raises(ValueError, match="averages must be a non-empty mapping"):
        oe.Averager(model, {})
    with pytest.raises(TypeError, match="averages\\['x'\\] must be an EMA, PowerEMA, SWA or LAWA"):
        oe.Averager(model, {"x": 0.9})
    with pytest.raises(ValueError, match="on_busy must be one of"):
        oe.Averager(model, {"e": oe.EMA(0.9)}, on_busy="drop")
    with pytest.raises(ValueError, match="buffers must be 'copy' or 'average'"):
        oe.Averager(model, {"e": oe.EMA(0.9)}, buffers="keep")
    with pytest.raises(ValueError, match="staging_bytes must be an int"):
        oe.Averager(model, {"e": oe.EMA(0.9)}, staging_bytes=16)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        oe.Averager({"w": torch.ones(2)}, {"e": oe.EMA(0.9)})
    with pytest.raises(TypeError, match="optimizers\\[0\\] must be a torch.optim.Optimizer"):
        with oe.Averager(model, {"e": oe.EMA(0.9)}) as avg:
            avg.attach(object())


def test_unknown_name_and_no_snapshot_yet():
    model, opt = make()
    with oe.Averager(model, {"ema": oe.EMA(0.9, start=5)}) as avg:
        avg.attach(opt)
        with pytest.raises(ValueError, match="no average named 'lawa'; this Averager has: ema"):
            avg.averaged_state_dict("lawa")
        run(model, opt, avg, 2)
        with pytest.raises(RuntimeError, match="has no snapshot yet \\(first due after step 6"):
            avg.averaged_state_dict("ema")
        with pytest.raises(ValueError, match="no average named"):
            with avg.swapped(model, "nope"):
                pass


def test_parameters_on_several_devices_are_rejected():
    model, _ = make()
    model.fc2.to("meta")
    with pytest.raises(ValueError, match="several devices \\(cpu, meta\\)"):
        oe.Averager(model, {"ema": oe.EMA(0.9)})


def test_a_parameter_that_changes_shape_is_reported():
    model, opt = make()
    with oe.Averager(model, {"ema": oe.EMA(0.9)}) as avg:
        avg.attach(opt)
        run(model, opt, avg, 1)
        avg.fence()  # the contract: parameters change in place only after the fence
        model.fc2.bias.data = torch.zeros(7)
        avg.step()  # checked on the worker (O(1) on this thread): reported by the next call
        with pytest.raises(RuntimeError, match="'fc2.bias' changed shape from \\[4\\] to \\[7\\]"):
            avg.flush()
        model.fc2.bias.data = torch.zeros(4)
        model.fc2.bias = nn.Parameter(torch.zeros(4))
        with pytest.raises(RuntimeError, match="'fc2.bias' was replaced"):
            avg.averaged_state_dict("ema")


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


def test_interpreter_exits_cleanly_with_an_averager_open():
    code = (
        "import torch, offload_ema as oe\n"
        "m = torch.nn.Linear(256, 256)\n"
        "opt = torch.optim.SGD(m.parameters(), lr=0.1)\n"
        "avg = oe.Averager(m, {'ema': oe.EMA(0.9), 'lawa': oe.LAWA(3, every=1)}).attach(opt)\n"
        "for _ in range(5):\n"
        "    m(torch.randn(4, 256)).sum().backward(); opt.step()\n"
        "print('done')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "done"
    assert "Traceback" not in r.stderr and "Error" not in r.stderr


def test_stats_report_counts_and_sizes():
    model, opt = make()
    with oe.Averager(model, {"ema": oe.EMA(0.9, every=2)}) as avg:
        avg.attach(opt)
        run(model, opt, avg, 7)
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


def test_worker_leaves_torch_threads_of_the_training_thread_alone():
    before = torch.get_num_threads()
    model, opt = make()
    with oe.Averager(model, {"ema": oe.EMA(0.9)}) as avg:
        avg.attach(opt)
        run(model, opt, avg, 3)
        avg.flush()
        assert torch.get_num_threads() == before
