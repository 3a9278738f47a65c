"""The averages' store (``offload_ema.engine.store``): EMA and LAWA arithmetic against independent
references (torch.optim.swa_utils, float64, a plain deque mean), buffers, and the export / import
of state: a resume is bit exact at every position of the LAWA ring and with periods pending."""
import copy
import functools
import threading

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import offload_ema as oe
from offload_ema import engine as engine_mod
from helpers import RefEMA, RefLAWA, assert_matches, make, run_steps, snapshot, train_step


def _ring_specs():
    return {"ema": oe.EMA(0.8), "lawa": oe.LAWA(4, every=1), "lawa3": oe.LAWA(3, every=2)}


@functools.lru_cache(maxsize=None)
def _straight(steps):
    """The averages after every step of an uninterrupted run."""
    model, opt = make()
    out = {}
    with oe.Averager(model, _ring_specs()) as avg:
        avg.attach(opt)
        for s in range(1, steps + 1):
            train_step(model, opt, s)
            out[s] = {n: avg.averaged_state_dict(n) for n in _ring_specs() if avg.ready(n)}
    return out


def _state(avg, kind):
    """kind "global": state_dict() (names, ring in order); "rank": this rank's flat buffers."""
    return avg.state_dict() if kind == "global" else avg._rank_state_dict()


def _meta(state):
    return oe.resume.read_meta(state[oe.resume.META_KEY])


@pytest.mark.parametrize("kind", ["global", "rank"])
@pytest.mark.parametrize("stop", range(1, 9))
def test_resume_at_every_ring_position_is_bit_exact(stop, kind):
    """Compared after every step once resumed: the ring's order matters until the window has
    been refilled, so resuming at the wrong ring position shows there. The global state holds
    the ring oldest first; the rank's state its positions."""
    steps = 13
    straight = _straight(steps)
    model, opt = make()
    with oe.Averager(model, _ring_specs()) as avg:
        avg.attach(opt)
        for s in range(1, stop + 1):
            train_step(model, opt, s)
        state = _state(avg, kind)
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        opt_state = opt.state_dict()
    if kind == "rank":
        assert state["averages"]["lawa"]["next_pos"] == stop % 4
    else:
        assert _meta(state)["averages"]["lawa"]["filled"] == min(stop, 4)
    model, opt = make(seed=99)
    model.load_state_dict(saved)
    opt.load_state_dict(opt_state)
    with oe.Averager(model, _ring_specs()) as avg:
        avg.load_state_dict(state)
        avg.attach(opt)
        for s in range(stop + 1, steps + 1):
            train_step(model, opt, s)
            for n, expected in straight[s].items():
                got = avg.averaged_state_dict(n)
                for k in expected:
                    assert torch.equal(got[k], expected[k]), (stop, s, n, k)


@pytest.mark.parametrize("kind", ["global", "rank"])
def test_resume_with_coalesced_periods_pending_is_bit_exact(monkeypatch, kind):
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
            state = _state(avg, kind)
            held = state if kind == "rank" else _meta(state)
            assert held["averages"]["ema"]["pending"] == pending == 2
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
        run_steps(model, opt, avg, 40, on_step=on_step)
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
        run_steps(model, opt, avg, 60, on_step=lambda s: ref.update(snapshot(model)))
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
        run_steps(model, opt, avg, 31,
            on_step=lambda s: ref.update(snapshot(model)) if s > 2 and (s - 2) % 3 == 0 else None)
        got = avg.averaged_state_dict("lawa")
    assert_matches(got, ref.avg, rtol=2.4e-7, atol=1e-9)


def test_lawa_keeps_bf16_slots_exactly_and_means_in_float64():
    model, opt = make(dtype=torch.bfloat16, lr=0.02)
    ref = RefLAWA(5)
    with oe.Averager(model, {"lawa": oe.LAWA(window=5, every=1)}) as avg:
        avg.attach(opt)
        run_steps(model, opt, avg, 12, on_step=lambda s: ref.update(snapshot(model)))
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
        run_steps(model, opt, avg, 25, on_step=on_step)
        for name in specs:
            assert_matches(avg.averaged_state_dict(name), refs[name].avg, rtol=1e-5, atol=1e-7)
        stats = avg.stats()  # after the reads: every snapshot taken is applied
    # Every step is due for "fast", so one snapshot per step feeds all four averages.
    assert stats["snapshots_taken"] == stats["snapshots_applied"] == 25


@pytest.mark.parametrize("buffers", ["copy", "average"])
def test_buffers_copied_or_averaged(buffers):
    model, opt = make()
    model.train()
    ref = RefEMA(0.6)
    with oe.Averager(model, {"ema": oe.EMA(0.6)}, buffers=buffers) as avg:
        avg.attach(opt)

        def on_step(s):
            ref.update({"bn.running_mean": model.bn.running_mean.double().clone()})
        run_steps(model, opt, avg, 6, on_step=on_step)
        sd = avg.averaged_state_dict("ema")
    assert sd["bn.num_batches_tracked"].dtype == torch.int64
    assert int(sd["bn.num_batches_tracked"]) == 6
    if buffers == "copy":
        assert torch.equal(sd["bn.running_mean"], model.bn.running_mean)
    else:
        torch.testing.assert_close(sd["bn.running_mean"].double(), ref.avg["bn.running_mean"])
        assert not torch.equal(sd["bn.running_mean"], model.bn.running_mean)


def _specs():
    return {"ema": oe.EMA(0.9), "slow": oe.EMA(0.99, every=2, start=3),
            "lawa": oe.LAWA(4, every=3)}


def test_resume_is_bit_exact():
    model, opt = make()
    with oe.Averager(model, _specs()) as avg:
        avg.attach(opt)
        run_steps(model, opt, avg, 30)
        straight = {n: avg.averaged_state_dict(n) for n in _specs()}

    model, opt = make()
    with oe.Averager(model, _specs()) as avg:
        avg.attach(opt)
        run_steps(model, opt, avg, 13)
        saved = {"model": {k: v.clone() for k, v in model.state_dict().items()},
                 "opt": copy.deepcopy(opt.state_dict()), "avg": avg.state_dict()}
        run_steps(model, opt, avg, 5, start=13)  # the accumulators move on; saved state must not
    model, opt = make(seed=123)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    with oe.Averager(model, _specs()) as avg:
        avg.load_state_dict(saved["avg"])
        assert avg.step_count == 13
        avg.attach(opt)
        run_steps(model, opt, avg, 17, start=13)
        resumed = {n: avg.averaged_state_dict(n) for n in _specs()}
    for n in straight:
        for k in straight[n]:
            assert torch.equal(straight[n][k], resumed[n][k]), (n, k)


@pytest.mark.parametrize("kind", ["global", "rank"])
def test_load_state_dict_rejects_a_different_model_or_averages(kind):
    model, opt = make()
    with oe.Averager(model, {"ema": oe.EMA(0.9)}) as avg:
        avg.attach(opt)
        run_steps(model, opt, avg, 2)
        state = _state(avg, kind)
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
