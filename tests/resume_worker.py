"""One rank of the resume-anywhere tests (tests/test_resume_anywhere.py launches it per rank):
python resume_worker.py "PHASE:PARALLELISM[:SOURCE]" RANK WORLD INIT_FILE OUT_DIR

save: trains SAVE_AT steps under PARALLELISM (ddp, fsdp2, local) and writes the Averager with
torch.distributed.checkpoint to OUT_DIR/PARALLELISM-WORLD; rank 0 writes the model's weights and
the full averages. load: builds the same model under PARALLELISM at this WORLD, loads the
checkpoint SOURCE into a fresh Averager (it must hold the saved averages exactly), trains on to
STEPS and compares with a float64 reference of one uninterrupted run. bad: the refusals."""
import datetime
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import offload_ema as oe  # noqa: E402
from helpers import RefEMA, RefLAWA, assert_matches  # noqa: E402

SAVE_AT, STEPS = 6, 10


def specs(beta=0.8):
    return {"ema": oe.EMA(beta), "lawa": oe.LAWA(3, every=1), "slow": oe.EMA(0.9, every=2)}


def build(parallelism, weights=None):
    """The same model and weights whatever the parallelism (and the training module); with
    ``weights`` (full tensors), those, set before the model is wrapped or sharded."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 6), nn.ReLU(),
                          nn.Linear(6, 3))  # (uneven FSDP2 shards at 4 ranks: 6 and 3 rows)
    if weights is not None:
        model.load_state_dict(weights)
    if parallelism == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        return model, DDP(model)
    if parallelism == "fsdp2tp":  # 2-D: FSDP2 over "dp", tensor parallel over "tp"
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                       parallelize_module)
        mesh = init_device_mesh("cpu", (dist.get_world_size() // 2, 2),
                                mesh_dim_names=("dp", "tp"))
        parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
        fully_shard(model, mesh=mesh["dp"])
        return model, model
    if parallelism == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, model
    return model, model


def step(module, opt, s):
    """Every rank the same batch: the trajectory does not depend on the world size."""
    g = torch.Generator().manual_seed(1000 + s)
    module(torch.randn(4, 8, generator=g)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def full_weights(model):
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


def reference():
    """One uninterrupted run in one process: its averages in float64 after every step."""
    model, _ = build("local")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    refs = {"ema": RefEMA(0.8), "lawa": RefLAWA(3), "slow": RefEMA(0.9)}
    out = {}
    for s in range(1, STEPS + 1):
        step(model, opt, s)
        snap = {n: p.detach().double().clone() for n, p in model.named_parameters()}
        refs["ema"].update(snap)
        refs["lawa"].update(snap)
        if s % 2 == 0:
            refs["slow"].update(snap)
        out[s] = {n: {k: v.clone() for k, v in r.avg.items()} for n, r in refs.items()
                  if r.avg is not None}
    return out


def save(parallelism, rank, world, out):
    model, module = build(parallelism)
    opt = torch.optim.SGD(module.parameters(), lr=0.05)
    avg = oe.Averager(module, specs()).attach(opt)
    for s in range(1, SAVE_AT + 1):
        step(module, opt, s)
    # After a forward FSDP2 keeps the root's gathered parameters registered (under tensor
    # parallel, DTensors of the TP mesh): the worker's model check, which runs at any time,
    # must not take them for replaced parameters.
    module(torch.randn(2, 8))
    avg._layout.check_model()
    path = os.path.join(out, f"{parallelism}-{world}")
    # A training checkpoint as a trainer writes it: the model, the optimizer (its settings are
    # non-tensor values, which DCP pickles) and the Averager.
    dcp.save({"model": module.state_dict(), "optim": opt.state_dict(), "averager": avg},
             checkpoint_id=path)
    averages = {n: avg.averaged_state_dict(n) for n in specs()}
    weights = full_weights(model)
    if rank == 0:
        torch.save({"weights": weights, "averages": averages}, path + ".pt")
    avg.close()


def load(parallelism, source, rank, world, out):
    saved = torch.load(os.path.join(out, source + ".pt"))
    model, module = build(parallelism, saved["weights"])  # the weights of the saved step
    opt = torch.optim.SGD(module.parameters(), lr=0.05)
    avg = oe.Averager(module, specs()).attach(opt)
    dcp.load({"averager": avg}, checkpoint_id=os.path.join(out, source))
    # Exactly the saved averages, and the step and counts they go with.
    for n in specs():
        got = avg.averaged_state_dict(n)
        for k, v in saved["averages"][n].items():
            assert torch.equal(got[k], v), f"{n}/{k} differs after loading {source} here"
    st = avg.stats()
    assert st["step"] == SAVE_AT and st["snapshots_taken"] == SAVE_AT, st
    ref = reference()
    for s in range(SAVE_AT + 1, STEPS + 1):  # after every step: the LAWA ring's order matters
        step(module, opt, s)                 # until the window has been refilled
        for n in specs():
            assert_matches(avg.averaged_state_dict(n), ref[s][n], rtol=1e-5, atol=1e-7)
    avg.close()


def bad(parallelism, source, rank, world, out):
    """Refusals: another model, other averages, no averager entry; the Averager unchanged."""
    path = os.path.join(out, source)

    def fresh(width=16, beta=0.8):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 6), nn.ReLU(),
                              nn.Linear(6, 3))
        from torch.nn.parallel import DistributedDataParallel as DDP
        module = DDP(model)
        opt = torch.optim.SGD(module.parameters(), lr=0.05)
        avg = oe.Averager(module, specs(beta)).attach(opt)
        step(module, opt, 1)
        step(module, opt, 2)
        return avg, {n: avg.averaged_state_dict(n) for n in specs()}

    def unchanged(avg, before):
        for n in specs():
            after = avg.averaged_state_dict(n)
            assert all(torch.equal(after[k], v) for k, v in before[n].items()), n
        assert avg.stats()["step"] == 2

    for what, width, beta, match in (("another model", 18, 0.8, "size|shape|different model"),
                                     ("other averages", 16, 0.7, "was saved as")):
        avg, before = fresh(width, beta)
        try:
            dcp.load({"averager": avg}, checkpoint_id=path)
        except (Exception, CheckpointException) as exc:  # (DCP's is a BaseException)
            import re
            assert re.search(match, str(exc), re.I), f"{what}: {exc}"
        else:
            raise AssertionError(f"{what}: loaded")
        unchanged(avg, before)
        avg.close()
    avg, before = fresh()
    try:
        dcp.load({"averager_missing": avg}, checkpoint_id=path)
    except (Exception, CheckpointException) as exc:
        assert "averager_missing" in str(exc), exc
    else:
        raise AssertionError("a checkpoint without the entry loaded")
    unchanged(avg, before)
    avg.close()


def main():
    what, rank, world, init_file, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \
        sys.argv[4], sys.argv[5]
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    phase, parallelism, *source = what.split(":")
    if phase == "save":
        save(parallelism, rank, world, out)
    elif phase == "load":
        load(parallelism, source[0], rank, world, out)
    else:
        bad(parallelism, source[0], rank, world, out)
    dist.barrier()
    dist.destroy_process_group()
    print("OK", rank, flush=True)


if __name__ == "__main__":
    main()
