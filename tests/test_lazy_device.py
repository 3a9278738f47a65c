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


def _slab(size=4096):
    model = Slab(size=size)
    return model, torch.optim.SGD(model.parameters(), lr=1e-2)


def _reference(beta, steps, size=4096):
    """The same training with each snapshot averaged synchronously by the same kernel."""
    model, opt = _slab(size)
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


def _run_slab(seed, steps, beta, staging=None, manual_no_fence=False, manual=False):
    model, opt = _slab()
    with lazy_device(seed=seed):
        with oe.Averager(model, {"ema": oe.EMA(beta)}, staging_bytes=staging) as avg:
            if not (manual_no_fence or manual):
                avg.attach(opt)
            for s in range(1, steps + 1):
                model.fake_backward(s)
                opt.step()
                if manual_no_fence:
                    avg.step(fence=False)  # breaks the contract: no fence() before the next step
                elif manual:
                    avg.step()  # fences at once: the training thread may issue the copies itself
            sd = avg.averaged_state_dict("ema")
            st = avg.stats()
    return [sd[f"ps.{i}"] for i in range(len(model.ps))], st


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("staging", ["default", "chunked", "unpacked", "manual_step"])
def test_race_low_density_model_matches_synchronous_reference(seed, staging, monkeypatch):
    """Default: the slab's small tensors are packed on the "device" and leave in one copy;
    unpacked: one copy per tensor; chunked: the worker issues a quarter snapshot at a time;
    manual_step: avg.step() fences at once (the copies issued by whichever thread comes first)."""
    if staging == "unpacked":
        monkeypatch.setenv("OFFLOAD_EMA_PACK_BYTES", "0")
    steps, beta = 200, 0.9
    nbytes = 4 * 4096 * 2
    # Chunked: two buffers of a quarter snapshot, 4 chunks per snapshot.
    got, st = _run_slab(seed, steps, beta, nbytes // 2 if staging == "chunked" else None,
                        manual=staging == "manual_step")
    assert st["snapshots_applied"] == steps
    if staging != "chunked":  # (a chunk here holds one tensor: nothing to pack)
        assert (st["device_pack_bytes"] > 0) == (staging != "unpacked")
    if staging == "chunked":
        assert st["chunks_per_snapshot"] > 1
    for i, (a, b) in enumerate(zip(got, _reference(beta, steps))):
        assert torch.equal(a, b), f"ps.{i} differs from the synchronous reference (seed {seed})"


def test_breaking_the_fence_contract_is_caught():
    steps, beta = 40, 0.9
    ref = _reference(beta, steps)
    caught = []
    for seed in SEEDS:
        try:
            got, _ = _run_slab(seed, steps, beta, manual_no_fence=True)
        except RuntimeError as exc:
            # The next step recorded its event before this snapshot's copies were issued: the
            # simulated device refuses a copy not ordered after the latest main-stream work.
            assert "simulated device" in str(exc)
            caught.append(True)
            continue
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
        opt.step()  # the copies are issued off the training thread: the error comes next call
        with pytest.raises(RuntimeError, match="without waiting on the main stream"):
            avg.flush()
        avg.close()


@pytest.mark.parametrize("inplace_min", ["default", "all", "none"])
def test_host_training_reads_large_parameters_in_place(inplace_min, monkeypatch):
    """CPU training: the worker reads parameters of at least INPLACE_MIN_BYTES where they are
    (no staging copy) while training goes on; the fence holds the next optimizer step until it
    has. Averages equal the synchronous reference bit for bit, whatever is read in place."""
    from offload_ema.engine import staging as staging_mod
    if inplace_min == "all":
        monkeypatch.setattr(staging_mod, "INPLACE_MIN_BYTES", 0)
    elif inplace_min == "none":
        monkeypatch.setattr(staging_mod, "INPLACE_MIN_BYTES", 1 << 40)
    steps, beta, size = 150, 0.9, 65536  # bfloat16: 128 KiB per tensor

    model, opt = _slab(size)
    with oe.Averager(model, {"ema": oe.EMA(beta)}) as avg:
        avg.attach(opt)
        for s in range(1, steps + 1):
            model.fake_backward(s)
            opt.step()
        sd, st = avg.averaged_state_dict("ema"), avg.stats()
    got = [sd[f"ps.{i}"] for i in range(4)]
    assert st["snapshots_applied"] == steps
    expected = {"default": 4 * size * 2, "all": 4 * size * 2, "none": 0}[inplace_min]
    assert st["read_in_place_bytes"] == expected
    for i, (a, b) in enumerate(zip(got, _reference(beta, steps, size))):
        assert torch.equal(a, b), f"ps.{i} differs from the synchronous reference"


def test_host_mixed_small_and_large_parameters_with_lawa_and_buffers(monkeypatch):
    """Large parameters read in place beside small ones staged, module buffers copied at once,
    an EMA and a LAWA, against float64 references."""
    model = nn.Sequential(nn.Linear(128, 256), nn.BatchNorm1d(256), nn.Linear(256, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    refs = {"ema": RefEMA(0.8), "lawa": RefLAWA(3)}
    g = torch.Generator().manual_seed(1)
    with oe.Averager(model, {"ema": oe.EMA(0.8), "lawa": oe.LAWA(3, every=1)},
                     buffers="average") as avg:
        avg.attach(opt)
        for _ in range(20):
            loss = model(torch.randn(16, 128, generator=g)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            snap = {k: v.detach().double().clone() for k, v in model.state_dict().items()
                    if v.is_floating_point()}
            for ref in refs.values():
                ref.update(snap)
        st = avg.stats()
        assert 0 < st["read_in_place_bytes"] < st["snapshot_bytes"]
        for name, ref in refs.items():
            assert_matches(avg.averaged_state_dict(name), ref.avg, rtol=1e-6, atol=1e-7)
