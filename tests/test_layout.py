"""The layout (``offload_ema.layout``): which tensors are averaged under which names (frozen, tied,
compiled and wrapped models), sources bound at construction, and a model changed under the
Averager refused with the parameter's name."""

import pytest
import torch
from torch import nn

import offload_ema as oe
from offload_ema.testing import lazy_device
from helpers import RefEMA, Tied, call_with_timeout, make, run_steps, snapshot, train_step


@pytest.mark.parametrize("change", ["replaced", "frozen", "added", "new storage", "converted"])
def test_a_model_changed_after_construction_is_reported(change, tmp_path):
    model, opt = make()
    avg = oe.Averager(model, {"ema": oe.EMA(0.9)}).attach(opt)
    train_step(model, opt, 1)
    avg.fence()
    if change == "new storage":
        model.fc2.weight.data = model.fc2.weight.detach().clone()
        message = "'fc2.weight' was given new storage"
    elif change == "converted":  # (model.double() gives every parameter new storage too)
        model.double()
        message = "'fc1.weight' is (now )?torch.float64"
    elif change == "replaced":
        model.fc2.weight = nn.Parameter(model.fc2.weight.detach().clone())
        message = "'fc2.weight' was replaced by another tensor"
    elif change == "frozen":
        model.fc2.weight.requires_grad_(False)
        message = "'fc2.weight' was frozen"
    else:
        model.fc2.register_parameter("extra", nn.Parameter(torch.zeros(3)))
        message = "module 'fc2' gained or lost parameters"
    for read in (lambda: avg.averaged_state_dict("ema"),
                 lambda: avg.swapped(model, "ema").__enter__(),
                 lambda: avg.save(tmp_path / "ema.safetensors", "ema")):
        with pytest.raises(RuntimeError, match=message):
            read()
    # Training goes on: the worker stops at the next snapshot and the step says why.
    train_step(model, opt, 2)
    with pytest.raises(RuntimeError, match=message):
        avg.flush()
    assert not (tmp_path / "ema.safetensors").exists()
    with pytest.raises(RuntimeError, match="failed earlier"):
        train_step(model, opt, 3)
    avg.close()  # the error was reported: closing is quiet


@pytest.mark.parametrize("who_issues", ["fence", "issuer"])
def test_new_storage_between_the_step_and_its_copy_never_enters_the_snapshot(who_issues):
    """``p.data = ...`` right after a step, before that step's copy is issued (the lazy
    device's issuer holds it back): the snapshot must not take the new storage, and the next
    call says the parameter has new storage, instead of averaging it silently."""
    with lazy_device(seed=1, max_delay=0.0, claim_policy="fence"):
        model, opt = make()
        with oe.Averager(model, {"last": oe.LAWA(1, every=1)}) as avg:
            avg.attach(opt)
            train_step(model, opt, 1)
            avg.flush()  # step 1 applied before the change
            train_step(model, opt, 2)  # its copy waits for the next fence / read
            model.fc2.weight.data = torch.full_like(model.fc2.weight, 7.0)
            if who_issues == "fence":
                avg.fence()  # the training thread issues step 2's copy now
            with pytest.raises(RuntimeError, match="'fc2.weight' was given new storage"):
                call_with_timeout(avg.flush, 30, "flush", abandon=[avg])
            # Nothing with the new storage was applied.
            assert avg.stats()["snapshots_applied"] == 1


def test_fsdp1_is_refused_at_construction():
    from torch.distributed.fsdp import FullyShardedDataParallel
    model, _ = make()
    wrapper = FullyShardedDataParallel.__new__(FullyShardedDataParallel)  # (no process group)
    nn.Module.__init__(wrapper)
    wrapper.inner = model
    with pytest.raises(NotImplementedError, match="FSDP1.*fully_shard"):
        oe.Averager(wrapper, {"ema": oe.EMA(0.9)})


def test_attach_refuses_a_model_converted_after_the_averager_was_built():
    model, opt = make()
    with oe.Averager(model, {"ema": oe.EMA(0.9)}) as avg:
        model.double()  # same Parameter objects, new data (as model.cuda() does)
        with pytest.raises(RuntimeError, match=r"is torch.float64 on cpu, but was torch.float32 "
                                               r"on cpu.*build the Averager after moving"):
            avg.attach(opt)


def test_frozen_parameters_are_not_averaged_but_reported():
    model, opt = make()
    model.fc1.bias.requires_grad_(False)
    with torch.no_grad():
        model.fc1.bias.fill_(0.25)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with oe.Averager(model, {"ema": oe.EMA(0.5)}) as avg:
        avg.attach(opt)
        run_steps(model, opt, avg, 3)
        assert avg.stats()["snapshot_bytes"] < sum(p.numel() * 4 for p in model.parameters())
        with torch.no_grad():
            model.fc1.bias.fill_(0.5)  # frozen: reported with its value now
        sd = avg.averaged_state_dict("ema")
    assert torch.equal(sd["fc1.bias"], torch.full((16,), 0.5))


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


def test_names_of_compiled_and_wrapped_models_are_normalised():
    model, opt = make()
    compiled = torch.compile(model, backend="eager")
    wrapped = nn.DataParallel(model) if not torch.cuda.is_available() else model
    expected = list(model.state_dict())
    for m in (compiled, wrapped):
        with oe.Averager(m, {"ema": oe.EMA(0.5)}) as avg:
            avg.attach(opt)
            run_steps(model, opt, avg, 2)
            assert list(avg.averaged_state_dict("ema")) == expected


def test_parameters_on_several_devices_are_rejected():
    model, _ = make()
    model.fc2.to("meta")
    with pytest.raises(ValueError, match="several devices \\(cpu, meta\\)"):
        oe.Averager(model, {"ema": oe.EMA(0.9)})


def test_a_parameter_that_changes_shape_is_reported():
    model, opt = make()
    with oe.Averager(model, {"ema": oe.EMA(0.9)}) as avg:
        avg.attach(opt)
        run_steps(model, opt, avg, 1)
        avg.fence()  # the contract: parameters change in place only after the fence
        model.fc2.bias.data = torch.zeros(7)
        avg.step()  # checked on the worker (O(1) on this thread): reported by the next call
        with pytest.raises(RuntimeError, match="'fc2.bias' changed shape from \\[4\\] to \\[7\\]"):
            avg.flush()
        model.fc2.bias.data = torch.zeros(4)
        model.fc2.bias = nn.Parameter(torch.zeros(4))
        with pytest.raises(RuntimeError, match="'fc2.bias' was replaced"):
            avg.averaged_state_dict("ema")
