"""Copy planning and staging (``offload_ema.engine.staging``): a byte budget below one snapshot
(chunks), many small tensors, parameters read in place on a CPU model, the staging a fold needs."""

import pytest
import torch
from torch import nn

import offload_ema as oe
from offload_ema.layout import Layout
from offload_ema.testing import lazy_device
from helpers import (RefEMA, RefLAWA, assert_matches, make, run_steps, slab, slab_reference, snapshot,
                     train_step)


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

    model, opt = slab(size)
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
    for i, (a, b) in enumerate(zip(got, slab_reference(beta, steps, size))):
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


def test_fold_needs_staging_for_fold_plus_one_whole_snapshots():
    model, _ = make()
    snap = Layout(model).nbytes
    for staging in (4 * snap, snap // 2):  # one short; chunked
        with pytest.raises(ValueError, match=r"fold=4 needs staging_bytes for at least fold \+ 1"):
            oe.Averager(model, {"ema": oe.EMA(0.9)}, fold=4, staging_bytes=staging)
    with oe.Averager(model, {"ema": oe.EMA(0.9)}, fold=4, staging_bytes=5 * snap) as avg:
        assert avg.stats()["staging_buffers"] == 5
    # "auto" with chunked staging: one snapshot per pass (chunks cannot be held).
    with lazy_device():
        with oe.Averager(model, {"ema": oe.EMA(0.9)}, fold="auto",
                         staging_bytes=snap // 2) as avg:
            assert avg.stats()["fold"] == 1


def test_chunked_staging_gives_identical_averages_and_reports_fence_wait():
    outs = []
    for staging in (None, 1003):  # two odd-sized slots: no multiple of any dtype size
        model, opt = make(width=64)
        with oe.Averager(model, {"ema": oe.EMA(0.9), "lawa": oe.LAWA(3, every=2)},
                         staging_bytes=staging) as avg:
            avg.attach(opt)
            run_steps(model, opt, avg, 15)
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
        plan = avg._engine.staging.plans[(0, 0)]
        for s in range(5):
            model(torch.ones(2)).backward()
            opt.step()
            opt.zero_grad()
            ref.update(snapshot(model))
        got = avg.averaged_state_dict("ema")
        assert avg.stats()["chunks_per_snapshot"] == 1
    assert len(got) == 3000
    assert_matches(got, ref.avg, rtol=1e-6, atol=1e-7)
    if oe.ops.backend() == "cpp":  # every copy in the one native call, none per tensor
        assert len(plan.native) == 3000 and plan.dsts == [] and plan.srcs == []


needs_cpp = pytest.mark.skipif(oe.ops.backend() != "cpp", reason="the C++ extension is not built")


@needs_cpp
def test_a_storage_reallocated_in_place_is_followed_and_a_freed_one_is_named():
    """The native host copy holds the sources' addresses, planned once. A storage grown in place
    (same storage, new memory; the parameter and its average follow it, as torch's copies do) is
    planned again; a storage freed in place is an error that names the parameter, never a read
    of freed memory."""
    model, opt = make()
    ref = RefEMA(0.8)
    avg = oe.Averager(model, {"ema": oe.EMA(0.8)})  # manual steps: no copy races the resize
    for s in range(1, 7):
        train_step(model, opt, s)
        if s == 3:
            storage = model.fc1.bias.untyped_storage()
            storage.resize_(2 * storage.nbytes())  # (the values are kept)
        avg.step()
        ref.update(snapshot(model))
    assert_matches(avg.averaged_state_dict("ema"), ref.avg)
    train_step(model, opt, 7)
    model.fc2.bias.untyped_storage().resize_(0)
    with pytest.raises(RuntimeError, match="parameter 'fc2.bias' no longer has the memory"):
        avg.step()
        avg.flush()
    avg.close()
