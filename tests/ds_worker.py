"""One rank of the DeepSpeed tests (tests/test_deepspeed.py launches it per rank, CPU accelerator,
gloo): python ds_worker.py SCENARIO RANK WORLD INIT_FILE OUT_DIR"""
import datetime
import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import offload_ema as oe  # noqa: E402
from helpers import RefEMA, RefLAWA, assert_matches  # noqa: E402

# Parameters above the persistence threshold are partitioned (placeholders outside forward);
# those at or below it are persisted (kept gathered) but still partitioned for the optimizer.
# 13 x 9 = 117 elements over 2 ranks: the last partition is padded.
THRESHOLD = 100


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 13), nn.ReLU(), nn.Linear(13, 9), nn.ReLU(), nn.Linear(9, 3))


def config(stage, accumulation=1):
    return {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": accumulation,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
            "zero_optimization": {"stage": stage,
                                  "stage3_param_persistence_threshold": THRESHOLD},
            "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}


def initialize(stage, accumulation=1, model=None):
    import deepspeed
    model = model or make_model()
    engine, _, _, _ = deepspeed.initialize(model=model, config=config(stage, accumulation),
                                           model_parameters=model.parameters())
    return engine


def full_params(engine, stage):
    """float64 copies of the full parameters, gathered by DeepSpeed itself (the reference)."""
    import deepspeed
    params = list(engine.module.named_parameters())
    ctx = deepspeed.zero.GatheredParameters([p for _, p in params]) if stage == 3 else _null()
    with ctx:
        return {n: p.detach().double().clone() for n, p in params}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def batch(rank, s):
    g = torch.Generator().manual_seed(100 * rank + s)  # each rank its own data
    return torch.randn(4, 8, generator=g)


def train(engine, rank, start, steps, accumulation, on_step, poison=None):
    """``poison``: the step whose first micro-batch has a NaN: DeepSpeed skips that update."""
    for s in range(start, start + steps):
        for micro in range(accumulation):
            x = batch(rank, 10 * s + micro)
            if s == poison and micro == 0:
                x[0, 0] = float("nan")
            loss = engine(x).pow(2).mean()
            engine.backward(loss)
            engine.step()  # DeepSpeed's optimizer steps at the accumulation boundary only
        on_step(s)


def zero(rank, world, out, stage):
    accumulation = 2
    engine = initialize(stage, accumulation)
    specs = {"ema": oe.EMA(0.8), "lawa": oe.LAWA(3, every=2)}
    avg = oe.Averager(engine, specs).attach(engine)
    if stage == 3:
        placeholders = [n for n, p in engine.module.named_parameters() if p.numel() == 0]
        assert placeholders, "the model should hold ZeRO-3 placeholders outside forward"
    refs = {"ema": RefEMA(0.8), "lawa": RefLAWA(3)}
    skipped = [engine.skipped_steps]
    taken = [0]

    def record(s):
        if engine.skipped_steps != skipped[0]:  # DeepSpeed skipped this update (non-finite)
            skipped[0] = engine.skipped_steps
            return
        taken[0] += 1
        full = full_params(engine, stage)
        refs["ema"].update(full)
        if taken[0] % 2 == 0:
            refs["lawa"].update(full)
    train(engine, rank, 1, 9, accumulation, record, poison=5)
    avg.flush()
    st = avg.stats()
    assert engine.skipped_steps == 1, engine.skipped_steps
    # One snapshot per optimizer step (not per micro-step), none of the skipped one.
    assert st["snapshots_applied"] == 8, st
    n_full = sum(p.numel() for p in make_model().parameters()) * 4
    # Each rank holds about half of the model (partitions, or its owned tensors).
    assert st["snapshot_bytes"] < 0.75 * n_full + 64 * 8, (st["snapshot_bytes"], n_full)
    for name, ref in refs.items():
        sd = avg.averaged_state_dict(name)
        assert {k: tuple(v.shape) for k, v in sd.items()} == {
            k: tuple(v.shape) for k, v in ref.avg.items()}
        assert_matches(sd, ref.avg, rtol=1e-5, atol=1e-7)
    only0 = avg.averaged_state_dict("ema", rank=0)
    assert (only0 is None or only0 == {}) == (rank != 0)
    if rank == 0:  # gathered to rank 0 alone
        assert_matches(only0, refs["ema"].avg, rtol=1e-5, atol=1e-7)

    # An evaluation forward inside swapped() sees the average; the training weights come back.
    before = full_params(engine, stage)
    x = torch.ones(2, 8)
    ref_model = make_model().double()
    ref_model.load_state_dict(refs["ema"].avg)
    with avg.swapped(engine, "ema"):
        with torch.no_grad():
            y = engine(x)
    torch.testing.assert_close(y.double(), ref_model(x.double()), rtol=1e-5, atol=1e-6)
    after = full_params(engine, stage)
    for n in before:
        assert torch.equal(before[n], after[n]), n
    with torch.no_grad():  # and the next forward uses them again
        torch.testing.assert_close(engine(x).double(),
                                   _model_with(before)(x.double()), rtol=1e-5, atol=1e-6)

    # Per-rank files with an index: loaded whole, equal to the reference.
    path = os.path.join(out, "ema.safetensors")
    avg.save(path, "ema").result(timeout=120)
    dist.barrier()
    loaded, meta = oe.load_snapshot(path + ".index.json" if world > 1 else path)
    assert_matches(loaded, refs["ema"].avg, rtol=1e-5, atol=1e-7)

    # Resume per rank: a new Averager from this one's state goes on exactly (ZeRO-3: folding
    # three partition snapshots per pass).
    state = avg.state_dict()
    avg.close()
    avg2 = oe.Averager(engine, specs, fold=3 if stage == 3 else 1)
    avg2.load_state_dict(state)
    avg2.attach(engine)
    train(engine, rank, 10, 4, accumulation, record)
    for name, ref in refs.items():
        assert_matches(avg2.averaged_state_dict(name), ref.avg, rtol=1e-5, atol=1e-7)
    avg2.close()
    json.dump({"rank": rank, "bytes": st["snapshot_bytes"]},
              open(os.path.join(out, f"rank{rank}.json"), "w"))


def reload(rank, world, out):
    """engine.load_checkpoint right after a step, while that step's snapshot may still be
    copied (the simulated copy engine defers copies): the Averager attached to the engine fences
    first, so the snapshot holds the step's weights, not the checkpoint's."""
    from offload_ema.testing import lazy_device

    ckpt = os.path.join(out, "ds_ckpt")
    engine = initialize(3)
    ref = RefEMA(0.5)
    with lazy_device(seed=rank, max_delay=0.5):
        with oe.Averager(engine, {"ema": oe.EMA(0.5)}) as avg:
            avg.attach(engine)

            def record(s):
                ref.update(full_params(engine, 3))
            train(engine, rank, 1, 1, 1, record)
            avg.fence()  # (save_checkpoint only reads the parameters)
            engine.save_checkpoint(ckpt, tag="one")
            train(engine, rank, 2, 2, 1, record)
            engine.load_checkpoint(ckpt, tag="one")  # step 1's weights, written in place
            assert_matches(avg.averaged_state_dict("ema"), ref.avg, rtol=1e-5, atol=1e-7)
            loaded = full_params(engine, 3)
            assert any(not torch.equal(loaded[k], ref.avg[k]) for k in loaded)


def _model_with(state):
    m = make_model().double()
    m.load_state_dict(state)
    return m


def refusals(rank, world, out):
    """What cannot be averaged fails at construction with a clear error."""
    model = make_model()
    model[0].weight.requires_grad_(False)  # frozen and partitioned: no current value to report
    _refused(initialize(3, model=model), "frozen ZeRO-3 parameters",
             "a frozen ZeRO-3 parameter was accepted")
    engine = initialize(3)
    p = engine.module[2].weight
    p.ds_tensor.final_location = "OffloadDeviceEnum.nvme"  # as ZeRO-Infinity marks it
    _refused(engine, "NVMe", "an NVMe-offloaded partition was accepted")
    p.ds_tensor.final_location = None


def _refused(engine, says, accepted):
    """Building an Averager on ``engine`` raises NotImplementedError saying ``says``."""
    try:
        oe.Averager(engine, {"ema": oe.EMA(0.9)})
    except NotImplementedError as exc:
        assert says in str(exc), exc
    else:
        raise AssertionError(accepted)


def main():
    scenario, rank, world, init_file, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \
        sys.argv[4], sys.argv[5]
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_SIZE=str(world))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo")
    if scenario == "zero3":
        zero(rank, world, out, 3)
    elif scenario == "zero2":
        zero(rank, world, out, 2)
    elif scenario == "zero1":
        zero(rank, world, out, 1)
    elif scenario == "refusals":
        refusals(rank, world, out)
    elif scenario == "reload":
        reload(rank, world, out)
    dist.barrier()
    dist.destroy_process_group()
    print("OK", rank, flush=True)


if __name__ == "__main__":
    main()
