"""EMA warm-up, EDM2's power-function EMA and the SWA mean, against float64 references of each
recurrence (and swa_utils for SWA), with coalescing, drops and resume."""
import copy
import math
import threading

import numpy as np
import pytest
import torch
from torch.optim.swa_utils import AveragedModel

import offload_ema as oe
from offload_ema import engine as engine_mod
from helpers import RefDecay, assert_matches, make, snapshot, train_step


def timm_warmup(beta, gamma, power, min_beta):
    """timm ModelEmaV3 / diffusers EMAModel's warm-up, written out independently."""
    def beta_at(k):
        if k == 1:
            return 0.0
        step = k - 1
        return min(beta, max(min_beta, 1 - (1 + step / gamma) ** -power))
    return beta_at


def edm2_power(gamma):
    return lambda k: 0.0 if k == 1 else (1 - 1 / k) ** (gamma + 1)


def _run(specs, refs, steps=30):
    model, opt = make(lr=0.02)
    with oe.Averager(model, specs) as avg:
        avg.attach(opt)
        for s in range(1, steps + 1):
            train_step(model, opt, s)
            snap = snapshot(model)
            for name, spec in specs.items():
                if spec.is_due(s):
                    refs[name].update(snap)
        return {n: avg.averaged_state_dict(n) for n in specs}, model


def test_ema_warmup_matches_the_timm_recurrence():
    specs = {"warm": oe.EMA(0.99, warmup_gamma=1.0, warmup_power=2 / 3),
             "warm34": oe.EMA(0.999, warmup_gamma=2.0, warmup_power=0.75, min_beta=0.3, every=2)}
    refs = {"warm": RefDecay(timm_warmup(0.99, 1.0, 2 / 3, 0.0)),
            "warm34": RefDecay(timm_warmup(0.999, 2.0, 0.75, 0.3))}
    got, _ = _run(specs, refs)
    for n in specs:
        assert_matches(got[n], refs[n].avg, rtol=2e-6, atol=1e-7)


def test_power_ema_matches_edm2_and_sigma_rel_converts_as_edm2():
    # EDM2's table: sigma_rel 0.05 <-> gamma 16.97, 0.10 <-> 6.94.
    assert oe.PowerEMA(0.05).gamma == pytest.approx(16.97, abs=0.01)
    assert oe.PowerEMA(0.10).gamma == pytest.approx(6.94, abs=0.01)
    # ... and the conversion inverts EDM2's formula for sigma_rel.
    g = oe.PowerEMA(0.08).gamma
    assert ((g + 1) / ((g + 2) ** 2 * (g + 3))) ** 0.5 == pytest.approx(0.08, rel=1e-9)
    specs = {"p": oe.PowerEMA(0.1), "g": oe.PowerEMA(gamma=3.0, every=3, start=2)}
    refs = {"p": RefDecay(edm2_power(specs["p"].gamma)), "g": RefDecay(edm2_power(3.0))}
    got, _ = _run(specs, refs)
    for n in specs:
        assert_matches(got[n], refs[n].avg, rtol=2e-6, atol=1e-7)


def test_power_ema_with_gamma_zero_and_swa_are_the_plain_mean():
    model, opt = make(lr=0.02)
    swa_ref = AveragedModel(model)  # swa_utils' default: the equal running mean
    snaps = []
    with oe.Averager(model, {"swa": oe.SWA(every=2), "p0": oe.PowerEMA(gamma=0.0, every=2)}) as avg:
        avg.attach(opt)
        for s in range(1, 25):
            train_step(model, opt, s)
            if s % 2 == 0:
                swa_ref.update_parameters(model)
                snaps.append(snapshot(model))
        swa, p0 = avg.averaged_state_dict("swa"), avg.averaged_state_dict("p0")
    mean = {k: sum(sn[k] for sn in snaps) / len(snaps) for k in snaps[0]}
    assert_matches(swa, mean, rtol=2e-6, atol=1e-7)
    assert_matches(p0, mean, rtol=2e-6, atol=1e-7)
    for name, p in swa_ref.module.named_parameters():
        torch.testing.assert_close(swa[name], p.detach(), rtol=1e-5, atol=1e-6)


def test_coalescing_against_a_replayed_reference(monkeypatch):
    """A snapshot standing for p due periods (on_busy="coalesce") has weight 1 - prod(beta_k)
    over those periods. The worker is held so that exactly steps 2-3 and 6-7 are coalesced into
    steps 4 and 8; the reference replays the same periods."""
    gate = threading.Event()
    gate.set()
    real = engine_mod.Worker._apply

    def gated(eng, *a, **k):
        assert gate.wait(30)
        return real(eng, *a, **k)
    monkeypatch.setattr(engine_mod.Worker, "_apply", gated)
    specs = {"warm": oe.EMA(0.95, warmup_gamma=1.0), "power": oe.PowerEMA(gamma=2.0),
             "swa": oe.SWA(), "ema": oe.EMA(0.8)}
    betas = {"warm": timm_warmup(0.95, 1.0, 2 / 3, 0.0), "power": edm2_power(2.0),
             "swa": lambda k: (k - 1) / k, "ema": lambda k: 0.0 if k == 1 else 0.8}
    refs = {n: RefDecay(b) for n, b in betas.items()}
    model, opt = make(lr=0.02)
    one = oe.averager.Layout(model).nbytes
    plan = {1: "take-hold", 2: "coalesce", 3: "coalesce", 4: "take", 5: "take-hold",
            6: "coalesce", 7: "coalesce", 8: "take", 9: "take", 10: "take"}
    with oe.Averager(model, specs, on_busy="coalesce", staging_bytes=one) as avg:
        avg.attach(opt)
        periods = 0
        for s, what in plan.items():
            if what == "take-hold":
                gate.clear()
            train_step(model, opt, s)
            periods += 1
            if what.startswith("take"):
                for r in refs.values():
                    r.update(snapshot(model), periods=periods)
                periods = 0
            if what == "coalesce" and plan.get(s + 1) == "take":
                gate.set()
                avg.flush()
            elif what == "take":
                avg.flush()
        got = {n: avg.averaged_state_dict(n) for n in specs}
        st = avg.stats()
    assert st["snapshots_coalesced"] == 4 and st["snapshots_taken"] == 6
    for n in specs:
        assert_matches(got[n], refs[n].avg, rtol=2e-6, atol=1e-7)


def test_schedules_resume_bit_exact():
    specs = {"warm": oe.EMA(0.99, warmup_gamma=1.0), "power": oe.PowerEMA(0.1),
             "swa": oe.SWA(every=2)}
    model, opt = make()
    with oe.Averager(model, specs) as avg:
        avg.attach(opt)
        for s in range(1, 21):
            train_step(model, opt, s)
        straight = {n: avg.averaged_state_dict(n) for n in specs}
    model, opt = make()
    with oe.Averager(model, specs) as avg:
        avg.attach(opt)
        for s in range(1, 8):
            train_step(model, opt, s)
        state = avg.state_dict()
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        opt_state = copy.deepcopy(opt.state_dict())
    model, opt = make(seed=3)
    model.load_state_dict(saved)
    opt.load_state_dict(opt_state)
    with oe.Averager(model, specs) as avg:
        avg.load_state_dict(state)
        avg.attach(opt)
        for s in range(8, 21):
            train_step(model, opt, s)
        for n in specs:
            got = avg.averaged_state_dict(n)
            for k in straight[n]:
                assert torch.equal(got[k], straight[n][k]), (n, k)
    with pytest.raises(ValueError, match="average 'power' was saved as"):
        with oe.Averager(model, {**specs, "power": oe.PowerEMA(0.05)}) as other:
            other.load_state_dict(state)


@pytest.mark.parametrize("make_spec,message", [
    (lambda: oe.EMA(0.9, warmup_gamma=0), "warmup_gamma must be a number > 0"),
    (lambda: oe.EMA(0.9, warmup_gamma=1.0, warmup_power=-1), "warmup_power must be a number > 0"),
    (lambda: oe.EMA(0.9, min_beta=0.95), r"min_beta must be <= beta \(0.9\)"),
    (lambda: oe.PowerEMA(), "exactly one of sigma_rel and gamma"),
    (lambda: oe.PowerEMA(0.1, gamma=3.0), "exactly one of sigma_rel and gamma"),
    (lambda: oe.PowerEMA(0.3), r"sigma_rel must be in \(0, 0.2887\)"),
    (lambda: oe.PowerEMA(gamma=-1.0), "gamma must be a number >= 0"),
    (lambda: oe.SWA(every=0), "every must be an int >= 1"),
])
def test_bad_schedule_arguments_are_named(make_spec, message):
    with pytest.raises(ValueError, match=message):
        make_spec()


def test_sigma_rel_to_gamma_over_a_range():
    for s in np.linspace(0.01, 0.28, 12):
        g = oe.averages.sigma_rel_to_gamma(float(s))
        assert g >= 0 and ((g + 1) / ((g + 2) ** 2 * (g + 3))) ** 0.5 == pytest.approx(s, rel=1e-8)


# ---- post-hoc EMA -------------------------------------------------------------------------------

def test_posthoc_ema_reproduces_a_directly_tracked_power_ema(tmp_path):
    """Two stored power-EMA profiles (sigma_rel 0.05 and 0.15, saved every 10 steps) synthesise
    the tracked PowerEMA(0.09) far more closely than either stored profile comes to it."""
    specs = {"a": oe.PowerEMA(0.05), "b": oe.PowerEMA(0.15), "target": oe.PowerEMA(0.09)}
    model, opt = make(lr=0.05)
    paths = []
    with oe.Averager(model, specs) as avg:
        avg.attach(opt)
        for s in range(1, 201):
            train_step(model, opt, s, batch=16)
            if s % 10 == 0:
                for n in ("a", "b"):
                    paths.append(avg.save(tmp_path / f"{n}-{s}.safetensors", n))
        [p.result(timeout=60) for p in paths]
        tracked = avg.averaged_state_dict("target")
        stored = {n: avg.averaged_state_dict(n) for n in ("a", "b")}
    got, info = oe.posthoc_ema([p.path for p in paths], 0.09, return_info=True)
    assert info["step"] == 200 and info["residual"] < 0.01

    def dist(x):
        return sum(float((x[k].double() - tracked[k].double()).norm() ** 2) for k in tracked) ** .5
    nearest = min(dist(stored["a"]), dist(stored["b"]))
    assert dist(got) < 0.1 * nearest, (dist(got), nearest)
    for k in ("bn.running_mean", "bn.num_batches_tracked"):  # not averaged: the latest value
        assert torch.equal(got[k], tracked[k].to(got[k].dtype)), k


@pytest.mark.parametrize("every", [50, 100])
def test_posthoc_weights_sum_to_one_and_a_constant_tensor_stays_exact(every, tmp_path):
    """Every power-EMA profile and the target integrate to 1, so the synthesised average of a
    tensor that never changes is that tensor: weights summing to 1.0033 (every 50 of 300 steps)
    or 1.022 (every 100) scaled every synthesised tensor."""
    model, _ = make()
    opt = torch.optim.SGD([{"params": [model.fc1.weight], "lr": 0.0},  # trained, never moves
                           {"params": [p for n, p in model.named_parameters()
                                       if n != "fc1.weight"], "lr": 0.05}])
    paths = []
    with oe.Averager(model, {"a": oe.PowerEMA(0.05), "b": oe.PowerEMA(0.12)}) as avg:
        avg.attach(opt)
        for s in range(1, 301):
            train_step(model, opt, s)
            if s % every == 0:
                paths += [avg.save(tmp_path / f"{n}-{s}.safetensors", n) for n in ("a", "b")]
        [p.result(timeout=60) for p in paths]
    got, info = oe.posthoc_ema([p.path for p in paths], 0.1, return_info=True)
    assert math.fsum(info["weights"]) == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(got["fc1.weight"].double(), model.fc1.weight.detach().double(),
                               rtol=1e-6, atol=1e-7)
    # An intermediate stored step works; one between stored steps is refused.
    oe.posthoc_ema([p.path for p in paths], 0.1, step=every * 2)
    with pytest.raises(ValueError, match="step must be a step with a stored snapshot"):
        oe.posthoc_ema([p.path for p in paths], 0.1, step=every * 2 + 7)


def test_posthoc_refuses_what_it_cannot_use(tmp_path):
    model, opt = make()
    with oe.Averager(model, {"p": oe.PowerEMA(0.1), "e": oe.EMA(0.9)}) as avg:
        avg.attach(opt)
        for s in range(1, 6):
            train_step(model, opt, s)
        avg.save(tmp_path / "p.safetensors", "p").result(timeout=60)
        avg.save(tmp_path / "e.safetensors", "e").result(timeout=60)
    with pytest.raises(ValueError, match="needs power-EMA snapshots"):
        oe.posthoc_ema([tmp_path / "p.safetensors", tmp_path / "e.safetensors"], 0.08)
    with pytest.raises(ValueError, match="step must be a step with a stored snapshot.*one of 5; "
                                         "got 9"):
        oe.posthoc_ema([tmp_path / "p.safetensors"], 0.08, step=9)
    with pytest.raises(ValueError, match="sigma_rel must be in"):
        oe.posthoc_ema([tmp_path / "p.safetensors"], 0.5)
    other, other_opt = make(width=32)
    with oe.Averager(other, {"p": oe.PowerEMA(0.1)}) as avg:
        avg.attach(other_opt)
        train_step(other, other_opt, 1)
        avg.save(tmp_path / "q.safetensors", "p").result(timeout=60)
    with pytest.raises(ValueError, match="hold different tensors"):
        oe.posthoc_ema([tmp_path / "p.safetensors", tmp_path / "q.safetensors"], 0.08)


def test_posthoc_command_writes_a_snapshot_and_reports_the_residual(tmp_path, capsys):
    from offload_ema import cli

    model, opt = make()
    with oe.Averager(model, {"a": oe.PowerEMA(0.05), "b": oe.PowerEMA(0.15)}) as avg:
        avg.attach(opt)
        for s in range(1, 21):
            train_step(model, opt, s)
        for n in ("a", "b"):
            avg.save(tmp_path / f"{n}.safetensors", n).result(timeout=60)
    out = tmp_path / "synth.safetensors"
    assert cli.main(["posthoc", "--sigma-rel", "0.08", str(out),
                     str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]) == 0
    printed = capsys.readouterr().out
    assert "residual" in printed
    tensors, meta = oe.load_snapshot(out)
    direct = oe.posthoc_ema([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], 0.08)
    assert set(tensors) == set(direct) and all(torch.equal(tensors[k], direct[k]) for k in direct)
    assert meta["average"]["kind"] == "posthoc_power_ema" and meta["step"] == 20
    assert cli.main(["posthoc", "--sigma-rel", "0.08", str(out), str(tmp_path / "x")]) == 1
