"""The engine's ordering on the simulated copy engine (offload_ema.testing.lazy_device): CPU
models take the asynchronous path with deferred copies, so a missing fence or an early read of
staging would give wrong averages here, without a GPU."""
import pytest
import torch
from torch import nn

import offload_ema as oe
from offload_ema import ops
from offload_ema.testing import lazy_device
from helpers import RefEMA, RefLAWA, assert_matches, make, snapshot, train_step

SEEDS = [0, 1, 2, 3, 4]


class Slab(nn.Module):
    """Low arithmetic density: a trivial SGD step on fixed gradients, so that a copy that reads
    the parameters after the next step has started shows up as a wrong average."""

    def __init__(self, n=4, size=4096, dtype=torch.bfloat16):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.ps = nn.ParameterList(
            [nn.Parameter(torch.randn(size, generator=g).to(dtype)) for _ in range(n)])
        self.grads = [[torch.randn(size, generator=g).to(dtype) for _ in self.ps] for _ in range(3)]

    def fake_backward(self, step):
        for p, grad in zip(self.ps, self.grads[step % 3]):
            p.grad = grad


def _slab():
    model = Slab()
    return model, torch.optim.SGD(model.parameters(), lr=1e-2)


def _reference(beta, steps):
    """The same training with each snapshot averaged synchronously by the same kernel."""
    model, opt = _slab()
    acc = None
    for s in range(1, steps + 1):
        model.fake_backward(s)
        opt.step()
        snap = [p.detach().clone() for p in model.ps]
        if acc is None:
            acc = [x.float() for x in snap]
        else:
            for a, x in zip(acc, snap):
                ops.ema_update_(a, x, 1 - beta)
    return acc


def _run_slab(seed, steps, beta, staging=None, manual_no_fence=False):
    model, opt = _slab()
    with lazy_device(seed=seed):
        with oe.Averager(model, {"ema": oe.EMA(beta)}, staging_bytes=staging) as avg:
            if not manual_no_fence:
                avg.attach(opt)
            for s in range(1, steps + 1):
                model.fake_backward(s)
                opt.step()
                if manual_no_fence:
                    avg.step(fence=False)  # breaks the contract: no fence() before the next step
            sd = avg.averaged_state_dict("ema")
            st = avg.stats()
    return [sd[f"ps.{i}"] for i in range(len(model.ps))], st


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("staging", ["default", "chunked"])
def test_race_low_density_model_matches_synchronous_reference(seed, staging):
    steps, beta = 200, 0.9
    nbytes = 4 * 4096 * 2
    # Chunked: two buffers of a quarter snapshot, 4 chunks per snapshot.
    got, st = _run_slab(seed, steps, beta, None if staging == "default" else nbytes // 2)
    assert st["snapshots_applied"] == steps
    if staging == "chunked":
        assert st["chunks_per_snapshot"] > 1
    for i, (a, b) in enumerate(zip(got, _reference(beta, steps))):
        assert torch.equal(a, b), f"ps.{i} differs from the synchronous reference (seed {seed})"


def test_breaking_the_fence_contract_is_caught():
    steps, beta = 40, 0.9
    ref = _reference(beta, steps)
    caught = []
    for seed in SEEDS:
        got, _ = _run_slab(seed, steps, beta, manual_no_fence=True)
        caught.append(any(not torch.equal(a, b) for a, b in zip(got, ref)))
    assert any(caught), "no seed caught copies that read parameters after the next step"


@pytest.mark.parametrize("seed", SEEDS)
def test_several_averages_buffers_and_lawa_match_references(seed):
    model, opt = make()
    refs = {"ema": RefEMA(0.8), "lawa": RefLAWA(3)}
    with lazy_device(seed=seed):
        with oe.Averager(model, {"ema": oe.EMA(0.8), "lawa": oe.LAWA(3, every=2)},
                         buffers="average") as avg:
            avg.attach(opt)
            for s in range(1, 13):
                train_step(model, opt, s)
                snap = snapshot(model)
                snap.update({k: v.double().clone() for k, v in model.named_buffers()
                             if v.is_floating_point()})
                refs["ema"].update(snap)
                if s % 2 == 0:
                    refs["lawa"].update(snap)
            for name, ref in refs.items():
                assert_matches(avg.averaged_state_dict(name), ref.avg, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("policy", ["skip", "coalesce"])
def test_busy_policies_stay_consistent(seed, policy):
    """Under skip / coalesce the applied snapshots must be exactly the ones counted as taken, and
    the EMA must equal a float64 reference of those snapshots with their elapsed periods."""
    model, opt = _slab()
    beta = 0.8
    ref = RefEMA(beta)
    periods = 0
    with lazy_device(seed=seed, max_delay=0.01):
        with oe.Averager(model, {"ema": oe.EMA(beta)}, on_busy=policy,
                         staging_bytes=4 * 4096 * 2) as avg:  # one snapshot in flight at most
            avg.attach(opt)
            for s in range(1, 41):
                model.fake_backward(s)
                before = avg.stats()["snapshots_taken"]
                opt.step()
                periods += 1
                if avg.stats()["snapshots_taken"] > before:
                    snap = {f"ps.{i}": p.detach().double().clone() for i, p in enumerate(model.ps)}
                    ref.update(snap, periods=periods if policy == "coalesce" else 1)
                    periods = 0
            got = avg.averaged_state_dict("ema")
            st = avg.stats()
    assert st["snapshots_applied"] == st["snapshots_taken"]
    assert st["snapshots_taken"] + st["snapshots_skipped" if policy == "skip"
                                      else "snapshots_coalesced"] == 40
    assert_matches(got, ref.avg, rtol=1e-6, atol=1e-6)


def test_a_copy_not_ordered_after_the_optimizer_step_is_caught(monkeypatch):
    """On a GPU a side-stream copy that does not wait for the main stream can read parameters
    before the optimizer step wrote them; the simulated device refuses such a copy."""
    from offload_ema.testing import LazyOps

    real = LazyOps.stream_wait

    def forgetful(self, stream, event):  # the side stream's wait for the step is lost
        if stream == self.main_stream():
            real(self, stream, event)
    monkeypatch.setattr(LazyOps, "stream_wait", forgetful)
    model, opt = _slab()
    with lazy_device(seed=0):
        avg = oe.Averager(model, {"ema": oe.EMA(0.9)}).attach(opt)
        model.fake_backward(1)
        with pytest.raises(RuntimeError, match="without waiting on the main stream"):
            opt.step()
        avg.close()
