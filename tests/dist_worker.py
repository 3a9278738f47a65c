"""One rank of the torch.distributed tests (tests/test_distributed.py launches it per rank):
python dist_worker.py SCENARIO RANK WORLD INIT_FILE OUT_DIR"""
import datetime
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import offload_ema as oe  # noqa: E402
from helpers import RefDecay, RefEMA, RefLAWA, TinyNet, assert_matches, snapshot  # noqa: E402


def fsdp2(rank, world, out):
    """FSDP2 (fully_shard): each rank averages its local shards (three folded per pass);
    gathered and swapped averages must equal a float64 reference of the full parameters."""
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 13), nn.ReLU(), nn.Linear(13, 5), nn.ReLU(), nn.Linear(5, 3))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    specs = {"ema": oe.EMA(0.8), "lawa": oe.LAWA(2, every=2), "swa": oe.SWA()}
    # Folding three local-shard snapshots per pass (fsdp2_root below applies them one by one).
    avg = oe.Averager(model, specs, fold=3).attach(opt)
    refs = {"ema": RefEMA(0.8), "lawa": RefLAWA(2), "swa": RefDecay(lambda k: (k - 1) / k)}
    for s in range(1, 9):
        g = torch.Generator().manual_seed(100 * rank + s)
        model(torch.randn(4, 8, generator=g)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        full = {n: p.full_tensor().double() for n, p in model.named_parameters()}
        for n, spec in specs.items():
            if spec.is_due(s):
                refs[n].update(full)
    st = avg.stats()
    local_bytes = sum(p.to_local().numel() * 4 for p in model.parameters())
    assert st["snapshot_bytes"] < 2 * local_bytes + 64 * 8  # local shards only (plus alignment)
    for n in specs:
        sd = avg.averaged_state_dict(n)
        assert_matches(sd, refs[n].avg, rtol=1e-5, atol=1e-7)
    assert (avg.averaged_state_dict("ema", rank=1) == {}) == (rank != 1)
    before = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
    with avg.swapped(model, "ema"):
        inside = {n: p.full_tensor() for n, p in model.named_parameters()}
        y = model(torch.ones(2, 8))  # the forward gathers the averaged shards
    for n, v in inside.items():
        torch.testing.assert_close(v.double(), refs["ema"].avg[n], rtol=1e-5, atol=1e-7)
    for n, p in model.named_parameters():
        assert torch.equal(p.full_tensor(), before[n]), n
    ref_model = nn.Sequential(nn.Linear(8, 13), nn.ReLU(), nn.Linear(13, 5), nn.ReLU(), nn.Linear(5, 3))
    ref_model.load_state_dict({k: v.float() for k, v in refs["ema"].avg.items()})
    torch.testing.assert_close(y, ref_model(torch.ones(2, 8)), rtol=1e-4, atol=1e-5)
    avg.save(os.path.join(out, "fsdp_ema.safetensors"), "ema").result(timeout=60)
    for _ in range(2):  # the second replaces the first checkpoint directory
        avg.save(os.path.join(out, "fsdp_ema.dcp"), "ema", format="dcp").result(timeout=60)
    avg.close()
    if rank == 0:
        torch.save({k: v.float() for k, v in refs["ema"].avg.items()},
                   os.path.join(out, "fsdp_ref.pt"))


def fsdp2_root(rank, world, out):
    """FSDP2 with parameters owned by the root module (fully_shard on the inner layers and the
    root, as the usual recipe leaves the head to the root): the root is not resharded after a
    forward, so swapped() must reshard before writing and after restoring, or training goes on
    with the average. DCP exports must run on a gloo group of their own."""
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import offload_ema.writer as writer_mod

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model[2], mesh=mesh)
    fully_shard(model, mesh=mesh)  # the root owns model[4]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    avg = oe.Averager(model, {"ema": oe.EMA(0.5)}).attach(opt)
    x = torch.ones(2, 8)

    def train(s):
        g = torch.Generator().manual_seed(s)  # the same data on every rank
        model(torch.randn(4, 8, generator=g)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()

    for s in range(1, 5):
        train(s)
    with torch.no_grad():
        raw = model(x)
    with avg.swapped(model, "ema"), torch.no_grad():
        averaged = model(x)
    assert not torch.allclose(raw, averaged), "the average should differ from the raw weights"
    with torch.no_grad():
        after = model(x)  # the raw weights again, also those of the root
    assert torch.equal(after, raw), f"after swapped: {after} != raw {raw}"
    # DCP exports use the Averager's own gloo group, never the default (training's) group.
    seen = []
    real = writer_mod.write_dcp

    def recording(path, state, meta, group, *a, **k):
        seen.append(group)
        return real(path, state, meta, group, *a, **k)
    writer_mod.write_dcp = recording
    avg.save(os.path.join(out, "root.dcp"), "ema", format="dcp").result(timeout=60)
    assert seen and seen[0] is not None
    assert seen[0] != dist.distributed_c10d._get_default_group()
    assert dist.get_backend(seen[0]) == "gloo"
    avg.close()


def tiny(rank, world, out):
    """DDP over a model with fewer tensors than ranks: a rank that owns nothing still takes part
    in every collective and its Averager works, also folding (nothing staged to fold there)."""
    from torch import nn

    for fold in (1, 2):
        torch.manual_seed(0)
        model = nn.Linear(4, 3, bias=False)
        ddp = DDP(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        avg = oe.Averager(ddp, {"ema": oe.EMA(0.5), "lawa": oe.LAWA(2, every=1)},
                          fold=fold).attach(opt)
        refs = {"ema": RefEMA(0.5), "lawa": RefLAWA(2)}
        for s in range(1, 6):  # folding: the fifth snapshot is held until the read
            g = torch.Generator().manual_seed(10 * rank + s)
            ddp(torch.randn(2, 4, generator=g)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            for r in refs.values():
                r.update(snapshot(model))
        assert (len(avg._layout.entries) == 0) == (rank == 1)
        for n in refs:
            assert_matches(avg.averaged_state_dict(n), refs[n].avg, rtol=1e-5, atol=1e-7)
        with avg.swapped(ddp, "lawa"):
            torch.testing.assert_close(model.weight.detach().double(), refs["lawa"].avg["weight"])
        avg.save(os.path.join(out, "tiny.safetensors"), "ema").result(timeout=60)
        avg.close()


def ddp_lazy(rank, world, out):
    """Owner-sharded DDP averaging on the simulated copy engine, over several seeds: deferred
    copies on every rank, gathers and swaps against a float64 reference; odd seeds fold three
    snapshots per pass."""
    from offload_ema.testing import lazy_device

    for seed in range(5):
        torch.manual_seed(0)
        model = TinyNet(width=24)
        ddp = DDP(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        refs = {"ema": RefEMA(0.8), "lawa": RefLAWA(2)}
        with lazy_device(seed=seed):
            with oe.Averager(ddp, {"ema": oe.EMA(0.8), "lawa": oe.LAWA(2, every=1)},
                             fold=3 if seed % 2 else 1) as avg:
                avg.attach(opt)
                for s in range(1, 9):
                    g = torch.Generator().manual_seed(100 * rank + s)
                    ddp(torch.randn(4, 8, generator=g)).pow(2).mean().backward()
                    opt.step()
                    opt.zero_grad()
                    for r in refs.values():
                        r.update(snapshot(model))
                for n, r in refs.items():
                    assert_matches(avg.averaged_state_dict(n), r.avg, rtol=1e-5, atol=1e-7)
                with avg.swapped(ddp, "lawa"):
                    for k, p in model.named_parameters():
                        torch.testing.assert_close(p.detach().double(), refs["lawa"].avg[k],
                                                   rtol=1.2e-7, atol=1e-30)


def diffusers_main_only(rank, world, out):
    """The diffusers EMAModel drop-in under DDP: every rank keeps the whole EMA (no collective),
    so the main process alone may copy_to / save, as diffusers' scripts do."""
    from torch import nn
    from offload_ema.integrations.diffusers import EMAModel
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    ema = EMAModel(model.parameters(), decay=0.9)
    ref = RefDecay(lambda k: 0.0 if k == 1 else min(0.9, (1 + (k - 1)) / (10 + (k - 1))))
    for _ in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * (rank + 1))
        ema.step(model.parameters())
        ref.update({f"params.{i}": p.detach().double().clone()
                    for i, p in enumerate(model.parameters())})
    assert ema.averager.stats()["world"] == 1
    if rank == 0:
        target = [torch.zeros_like(p) for p in model.parameters()]
        ema.copy_to(target)
        for i, t in enumerate(target):
            torch.testing.assert_close(t.double(), ref.avg[f"params.{i}"], rtol=1e-6, atol=1e-7)
    ema.close()


def _allocated_bytes(fn):
    """(fn(), bytes the CPU allocator handed out while it ran: what it materialised)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        value = fn()
    return value, sum(e.self_cpu_memory_usage for e in prof.events()
                      if e.self_cpu_memory_usage > 0)


def fsdp2_gather(rank, world, out):
    """averaged_state_dict(rank=0) (and save_pretrained, which uses it) of FSDP2 averages: only
    rank 0 may hold full tensors; the others send their shards and allocate about a shard."""
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 257), nn.Tanh(), nn.Linear(257, 255), nn.Tanh(),
                          nn.Linear(255, 7))  # uneven rows: padded shards
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    avg = oe.Averager(model, {"ema": oe.EMA(0.7)}).attach(opt)
    ref = RefEMA(0.7)
    for s in range(1, 4):
        g = torch.Generator().manual_seed(s)
        model(torch.randn(4, 256, generator=g)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        ref.update({n: p.full_tensor().double() for n, p in model.named_parameters()})
    full = sum(p.numel() * 4 for p in model.parameters())
    avg.flush()
    sd, nbytes = _allocated_bytes(lambda: avg.averaged_state_dict("ema", rank=0))
    if rank == 0:
        assert_matches(sd, ref.avg, rtol=1e-5, atol=1e-7)
        assert nbytes >= full, (nbytes, full)
    else:
        assert sd == {}
        # This rank's shard (its local average's copy and the padded send buffer), never the
        # full model (which it held before: every tensor gathered everywhere).
        assert nbytes < 0.75 * full * 2 / world + 65536, (nbytes, full)
    print(f"rank {rank}: {nbytes} bytes allocated for a {full}-byte average", file=sys.stderr)
    avg.close()


def fsdp2_subgroups(rank, world, out):
    """Two data-parallel groups inside one job (ranks {0, 1} and {2, 3}), an FSDP2 Averager on
    each: the Averager's own gloo group for DCP exports is created by its group's ranks only
    (a job-wide new_group waited for ranks that never call it)."""
    from torch import nn
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    half = world // 2
    groups = [dist.new_group(list(range(half))), dist.new_group(list(range(half, world)))]
    mine = groups[rank // half]
    mesh = DeviceMesh.from_group(mine, "cpu")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 3))
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    avg = oe.Averager(model, {"ema": oe.EMA(0.5)}, process_group=mine).attach(opt)
    ref = RefEMA(0.5)
    for s in range(1, 4):
        g = torch.Generator().manual_seed(10 * (rank // half) + s)  # each group its own data
        model(torch.randn(4, 8, generator=g)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        ref.update({n: p.full_tensor().double() for n, p in model.named_parameters()})
    assert_matches(avg.averaged_state_dict("ema"), ref.avg, rtol=1e-5, atol=1e-7)
    avg.save(os.path.join(out, f"group{rank // half}.dcp"), "ema", format="dcp").result(timeout=60)
    avg.close()


def main():
    scenario, rank, world, init_file, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \
        sys.argv[4], sys.argv[5]
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=20))
    scenarios = {"fsdp2": fsdp2, "fsdp2_root": fsdp2_root, "tiny": tiny, "ddp_lazy": ddp_lazy,
                 "diffusers_main_only": diffusers_main_only, "fsdp2_gather": fsdp2_gather,
                 "fsdp2_subgroups": fsdp2_subgroups}
    if scenario in scenarios:
        scenarios[scenario](rank, world, out)
        dist.barrier()
        dist.destroy_process_group()
        print("OK", rank, flush=True)
        return
    torch.manual_seed(0)
    model = TinyNet(width=24)
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    specs = {"ema": oe.EMA(0.9), "lawa": oe.LAWA(3, every=2), "power": oe.PowerEMA(gamma=3.0),
             "warm": oe.EMA(0.99, warmup_gamma=1.0)}
    avg = oe.Averager(ddp, specs).attach(opt)
    if scenario == "fail" and rank == 1:
        raise RuntimeError("rank 1 fails before the first collective")
    refs = {"ema": RefEMA(0.9), "lawa": RefLAWA(3),
            "power": RefDecay(lambda k: 0.0 if k == 1 else (1 - 1 / k) ** 4),
            "warm": RefDecay(lambda k: 0.0 if k == 1 else min(0.99, 1 - k ** (-2 / 3)))}
    for s in range(1, 13):
        g = torch.Generator().manual_seed(100 * rank + s)  # each rank its own data
        ddp(torch.randn(4, 8, generator=g)).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        snap = snapshot(model)
        for n, spec in specs.items():
            if spec.is_due(s):
                refs[n].update(snap)
        if s in (6, 12):  # sharded power-EMA profiles for post-hoc synthesis
            avg.save(os.path.join(out, f"power-{s}.safetensors"), "power")
    st = avg.stats()
    assert st["world"] == world and st["rank"] == rank

    # Shares: disjoint, covering every parameter, about balanced in bytes.
    mine = [e.name for e in avg._layout.entries]
    shares = [None] * world
    dist.all_gather_object(shares, mine)
    flat = [n for sh in shares for n in sh]
    assert sorted(flat) == sorted(n for n, p in model.named_parameters()), shares
    assert len(set(flat)) == len(flat)
    assert st["snapshot_bytes"] < sum(p.numel() * 4 for p in model.parameters())

    for n in specs:
        full = avg.averaged_state_dict(n)
        assert_matches(full, refs[n].avg, rtol=1e-5, atol=1e-7)
        assert list(full) == list(model.state_dict())
    only0 = avg.averaged_state_dict("ema", rank=0)
    assert (only0 == {}) == (rank != 0)
    if rank == 0:
        assert_matches(only0, refs["ema"].avg, rtol=1e-5, atol=1e-7)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    with avg.swapped(ddp, "lawa"):
        for k, p in model.named_parameters():
            torch.testing.assert_close(p.detach().double(), refs["lawa"].avg[k], rtol=1.2e-7,
                                       atol=1e-30)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k

    path = os.path.join(out, "ema.safetensors")
    avg.save(path, "ema").result(timeout=60)
    avg.flush()
    state = avg._rank_state_dict()  # (this rank's flat buffers: same rank and world only)
    state["world"] = world + 1
    try:
        avg.load_state_dict(state)
        raise AssertionError("a state from another world size was accepted")
    except ValueError as exc:
        assert "Resume at the same world size" in str(exc)
    dist.barrier()
    if rank == 0:
        torch.save({k: v.float() for k, v in refs["ema"].avg.items()}, os.path.join(out, "ref.pt"))
        with open(os.path.join(out, "shares.json"), "w") as f:
            json.dump(shares, f)
    avg.close()
    dist.barrier()
    dist.destroy_process_group()
    print("OK", rank, flush=True)


if __name__ == "__main__":
    main()
