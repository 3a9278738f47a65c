"""The asynchronous engine on a GPU: races, staging bounds, GPU memory. Skipped without CUDA."""
import functools

import pytest
import torch
from torch import nn

import offload_ema as oe
from offload_ema import ops

pytestmark = pytest.mark.cuda


class Slab(nn.Module):
    """Very low arithmetic density: big parameters, a trivial 'training step' (SGD on fixed
    gradients), so that a snapshot copy still running when the next optimizer step starts would
    read half-updated weights and show up as a wrong average."""

    def __init__(self, n=8, size=1 << 22, dtype=torch.bfloat16):
        super().__init__()
        self.ps = nn.ParameterList(
            [nn.Parameter(torch.randn(size, device="cuda").to(dtype)) for _ in range(n)])
        g = torch.Generator(device="cuda").manual_seed(0)
        self.grads = [[torch.randn(size, device="cuda", generator=g).to(dtype) for _ in self.ps]
                      for _ in range(3)]

    def fake_backward(self, step):
        for p, g in zip(self.ps, self.grads[step % 3]):
            p.grad = g


def _make(dtype=torch.bfloat16, **kw):
    torch.manual_seed(0)
    model = Slab(dtype=dtype, **kw)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    return model, opt


def _reference_ema(beta, steps, dtype, **kw):
    """Synchronous reference: the same training, each snapshot copied after a full device sync,
    averaged on the CPU with the same per-element kernel. Computed once per set-up (the race
    tests' parametrizations share it: 200 steps of 8 x 4M elements cost tens of seconds)."""
    return _reference_cached(beta, steps, dtype, tuple(sorted(kw.items())))


@functools.lru_cache(maxsize=None)
def _reference_cached(beta, steps, dtype, kw):
    model, opt = _make(dtype, **dict(kw))
    acc = None
    for s in range(1, steps + 1):
        model.fake_backward(s)
        opt.step()
        torch.cuda.synchronize()
        snap = [p.detach().cpu() for p in model.ps]
        if acc is None:
            acc = [x.float() for x in snap]
        else:
            for a, x in zip(acc, snap):
                ops.ema_update_(a, x, 1 - beta)
    return acc


@pytest.mark.parametrize("staging", ["default", "chunked", "small_packed", "small_unpacked",
                                     "fold4", "fold_auto"])
def test_race_low_density_model_matches_synchronous_reference(staging, monkeypatch):
    """small_*: 2,000 tensors of 8 KiB, packed on the GPU by one kernel and moved in one DMA
    (the default), or copied one by one (packing off). fold*: snapshots held in pinned staging
    and applied several per pass (fold=4, and "auto"): the same bits."""
    steps, beta = 200, 0.95
    kw = {"n": 2000, "size": 4096} if staging.startswith("small") else {}
    if staging == "small_unpacked":
        monkeypatch.setenv("OFFLOAD_EMA_PACK_BYTES", "0")
    ref = _reference_ema(beta, steps, torch.bfloat16, **kw)
    model, opt = _make(**kw)
    nbytes = sum(p.numel() * p.element_size() for p in model.ps)
    fold = {"fold4": 4, "fold_auto": "auto"}.get(staging, 1)
    plain = staging == "default" or staging.startswith("fold")
    with oe.Averager(model, {"ema": oe.EMA(beta)}, fold=fold,
                     staging_bytes=None if plain else nbytes // 5) as avg:
        avg.attach(opt)
        for s in range(1, steps + 1):
            model.fake_backward(s)
            opt.step()
        sd = avg.averaged_state_dict("ema")
        st = avg.stats()
    assert st["snapshots_applied"] == steps and st["snapshots_skipped"] == 0
    if staging == "chunked":
        assert st["chunks_per_snapshot"] > 1
    assert (st["device_pack_bytes"] > 0) == (staging == "small_packed")
    if staging == "fold4":
        assert st["fold"] == 4 and st["folds"] <= steps // 4 + 1
    for i, a in enumerate(ref):
        assert torch.equal(sd[f"ps.{i}"], a), f"ps.{i} differs from the synchronous reference"


def test_pinned_staging_is_bounded_and_never_allocated_per_step(monkeypatch):
    model, opt = _make()
    nbytes = sum(p.numel() * p.element_size() for p in model.ps)
    budget = nbytes // 3
    with oe.Averager(model, {"ema": oe.EMA(0.9), "lawa": oe.LAWA(2, every=2)},
                     staging_bytes=budget) as avg:
        avg.attach(opt)
        ptrs = [t.data_ptr() for t in avg._engine.staging.buffers]
        pinned_calls = []
        real_empty = torch.empty

        def counting_empty(*a, **k):
            if k.get("pin_memory"):
                pinned_calls.append(a)
            return real_empty(*a, **k)
        monkeypatch.setattr(torch, "empty", counting_empty)
        monkeypatch.setattr(torch.Tensor, "pin_memory",
                            lambda self, *a: pinned_calls.append("pin_memory") or self)
        for s in range(1, 21):
            model.fake_backward(s)
            opt.step()
        avg.flush()
        st = avg.stats()
        assert [t.data_ptr() for t in avg._engine.staging.buffers] == ptrs
    assert not pinned_calls, f"pinned allocations during training: {pinned_calls[:3]}"
    # Exactly what was asked, not rounded up to a power of two: the staging within the budget
    # plus the found_inf flags' cache line.
    assert st["staging_bytes"] <= budget and st["pinned_bytes"] <= st["staging_bytes"] + 2 * 64


def test_no_extra_gpu_memory_after_warm_up():
    model, opt = _make(n=4)
    with oe.Averager(model, {"ema": oe.EMA(0.9), "ema2": oe.EMA(0.99)}) as avg:
        avg.attach(opt)
        for s in range(1, 4):
            model.fake_backward(s)
            opt.step()
        avg.flush()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        for s in range(4, 30):
            model.fake_backward(s)
            opt.step()
        avg.flush()
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == before


def test_swapped_and_state_dict_on_cuda():
    model, opt = _make(n=2, size=1 << 16, dtype=torch.float32)
    with oe.Averager(model, {"lawa": oe.LAWA(3, every=1)}) as avg:
        avg.attach(opt)
        snaps = []
        for s in range(1, 6):
            model.fake_backward(s)
            opt.step()
            torch.cuda.synchronize()
            snaps.append([p.detach().cpu().double() for p in model.ps])
        sd = avg.averaged_state_dict("lawa")
        for i in range(2):
            expect = sum(x[i] for x in snaps[-3:]) / 3
            torch.testing.assert_close(sd[f"ps.{i}"].double(), expect, rtol=1.2e-7, atol=0)
            assert sd[f"ps.{i}"].device.type == "cpu" and sd[f"ps.{i}"].dtype == torch.float32
        orig = [p.detach().clone() for p in model.ps]
        with avg.swapped(model, "lawa"):
            for i, p in enumerate(model.ps):
                assert p.device.type == "cuda"
                assert torch.equal(p.detach().cpu(), sd[f"ps.{i}"])
        for p, o in zip(model.ps, orig):
            assert torch.equal(p, o)


def test_averaged_buffers_on_cuda_match_reference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32)).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = None
    with oe.Averager(model, {"ema": oe.EMA(0.5)}, buffers="average") as avg:
        avg.attach(opt)
        for s in range(10):
            model(torch.randn(16, 8, device="cuda")).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            rm = model[1].running_mean.detach().cpu().double()
            acc = rm if acc is None else acc + 0.5 * (rm - acc)
        sd = avg.averaged_state_dict("ema")
    torch.testing.assert_close(sd["1.running_mean"].double(), acc, rtol=1e-6, atol=1e-7)


def test_kernels_reject_cuda_tensors_with_a_clear_error():
    with pytest.raises(ValueError, match="src must be a CPU tensor, got one on cuda"):
        ops.ema_update_(torch.zeros(4), torch.ones(4, device="cuda"), 0.5)
    with pytest.raises(ValueError, match="avg must be a CPU tensor, got one on cuda"):
        ops.ema_update_(torch.zeros(4, device="cuda"), torch.ones(4), 0.5)


def test_new_storage_right_after_a_step_is_refused_and_never_read_as_freed_memory():
    """A parameter given new storage right after the step (``p.data = ...``) while its copy is
    still queued on the side stream: the copy reads the storage bound when the Averager was
    built (alive, not handed back to the caching allocator and reused by the main stream), and
    the next call refuses to go on averaging storage that training no longer writes."""
    model, opt = _make(n=8, size=1 << 22)
    with oe.Averager(model, {"ema": oe.EMA(0.9)}) as avg:
        avg.attach(opt)
        for s in (1, 2):
            model.fake_backward(s)
            opt.step()  # the copy is queued on the side stream behind this step ...
        for p in model.ps:  # ... while the storage it reads is released and reused at once
            p.data = torch.empty_like(p)
        junk = [torch.full_like(p, 1e4) for p in model.ps]
        with pytest.raises(RuntimeError, match="'ps.0' was given new storage"):
            avg.averaged_state_dict("ema")
        del junk
        with pytest.raises(RuntimeError, match="given new storage"):
            avg.flush()


def test_a_failed_host_registration_leaves_no_error_for_the_next_kernel(monkeypatch):
    """Pinning falls back to torch's allocator when registering fails; the failure must not
    surface later as the error of an unrelated kernel launch (the runtime's last error)."""
    from offload_ema import device as device_mod
    real = device_mod._driver_register

    def register_twice(ptr, nbytes, index):  # the second registration of a range fails
        assert real(ptr, nbytes, index) is None
        return real(ptr, nbytes, index)
    monkeypatch.setattr(device_mod, "_driver_register", register_twice)
    model, opt = _make(n=2, size=1 << 10, dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match="torch's pinned allocator is used instead"):
        avg = oe.Averager(model, {"ema": oe.EMA(0.9)})
    with avg:
        assert avg.stats()["pinned_bytes"] > 0
        x = torch.ones(4, device="cuda") * 2  # a kernel launch: reports any pending error
        torch.cuda.synchronize()
        assert x.sum().item() == 8


def test_fused_optimizer_under_grad_scaler_drops_nonfinite_steps_on_cuda():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 8)
    acc, bad = None, {2, 5}
    with oe.Averager(model, {"ema": oe.EMA(0.7)}) as avg:
        avg.attach(opt)
        for s in range(1, 9):
            loss = model(torch.randn(8, 16, device="cuda")).pow(2).mean()
            if s in bad:
                loss = loss * float("inf")
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            if s not in bad:
                snap = {n: p.detach().double().cpu() for n, p in model.named_parameters()}
                acc = snap if acc is None else {n: acc[n] + 0.3 * (snap[n] - acc[n]) for n in snap}
        sd = avg.averaged_state_dict("ema")
        assert avg.stats()["snapshots_dropped_nonfinite"] == len(bad)
    for n, v in acc.items():
        torch.testing.assert_close(sd[n].double(), v, rtol=1e-5, atol=1e-6)


def test_optimizer_step_in_cuda_graph_capture_is_refused():
    model, opt = _make(n=2, size=1 << 10, dtype=torch.float32)
    with oe.Averager(model, {"ema": oe.EMA(0.9)}) as avg:
        avg.attach(opt)
        model.fake_backward(1)
        opt.step()
        graph = torch.cuda.CUDAGraph()
        with pytest.raises(RuntimeError, match="CUDA graph capture"):
            with torch.cuda.graph(graph):
                opt.step()


def test_attach_refuses_a_model_moved_to_the_gpu_after_the_averager_was_built():
    model = nn.Linear(8, 8)
    avg = oe.Averager(model, {"ema": oe.EMA(0.9)})
    model.cuda()
    with pytest.raises(RuntimeError, match="on cuda:0, but was torch.float32 on cpu"):
        avg.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    avg.close()


def test_chunked_staging_with_a_non_contiguous_parameter_matches_reference():
    """A channels_last weight split across chunks is flattened by a kernel on the side stream
    (the copy's stream), never on another stream the copy is not ordered with."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3), nn.Conv2d(32, 8, 3)).cuda()
    model = model.to(memory_format=torch.channels_last)
    assert not model[0].weight.is_contiguous()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    nbytes = sum(p.numel() * 4 for p in model.parameters())
    acc = None
    with oe.Averager(model, {"ema": oe.EMA(0.5)}, staging_bytes=nbytes // 3) as avg:
        avg.attach(opt)
        for _ in range(20):
            model(torch.randn(2, 16, 12, 12, device="cuda")).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            snap = {n: p.detach().double().cpu() for n, p in model.named_parameters()}
            acc = snap if acc is None else {n: acc[n] + 0.5 * (snap[n] - acc[n]) for n in snap}
        assert avg.stats()["chunks_per_snapshot"] > 1
        sd = avg.averaged_state_dict("ema")
    for n, v in acc.items():
        torch.testing.assert_close(sd[n].double(), v, rtol=1e-6, atol=1e-6)
