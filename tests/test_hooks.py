"""The optimizer hooks (``offload_ema.hooks``): one snapshot per training step whatever the
optimizers (several, closures, compiled steps), steps GradScaler skips left out, attach's
checks."""

import pytest
import torch
from torch import nn

import offload_ema as oe
from helpers import RefEMA, RefLAWA, assert_matches, make, snapshot, train_step


def _scaled_training(fused, bad_steps, steps=10):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    refs = {"ema": RefEMA(0.7), "lawa": RefLAWA(3)}
    avg = oe.Averager(model, {"ema": oe.EMA(0.7), "lawa": oe.LAWA(3, every=1)}).attach(opt)
    for s in range(1, steps + 1):
        g = torch.Generator().manual_seed(s)
        loss = model(torch.randn(8, 4, generator=g)).pow(2).mean()
        if s in bad_steps:
            loss = loss * float("inf")  # inf/NaN gradients: the scaler skips this step
        before = [p.detach().clone() for p in model.parameters()]
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        stepped = any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
        assert stepped == (s not in bad_steps)
        if stepped:
            for r in refs.values():
                r.update(snapshot(model))
    return avg, refs


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_steps_skipped_by_grad_scaler_never_enter_an_average(fused):
    bad = {1, 4, 5, 9}  # also the very first step: the EMA starts from the next good one
    avg, refs = _scaled_training(fused, bad)
    with avg:
        for name, ref in refs.items():
            assert_matches(avg.averaged_state_dict(name), ref.avg, rtol=1e-6, atol=1e-7)
        st = avg.stats()  # after the reads: every snapshot applied
    assert st["snapshots_applied"] == 10 - len(bad)
    if fused:  # the optimizer ran (its post-hook too): counted, its snapshot dropped
        assert st["step"] == 10 and st["snapshots_dropped_nonfinite"] == len(bad)
    else:      # GradScaler never called step(): not counted at all
        assert st["step"] == 10 - len(bad) and st["snapshots_dropped_nonfinite"] == 0


def test_several_optimizers_count_as_one_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    matrices = [p for p in model.parameters() if p.dim() == 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    opt_a = torch.optim.SGD(matrices, lr=0.05, momentum=0.9)
    opt_b = torch.optim.AdamW(vectors, lr=0.01)
    ref = RefEMA(0.6)
    with oe.Averager(model, {"ema": oe.EMA(0.6)}) as avg:
        avg.attach(opt_a, opt_b)
        for s in range(1, 9):
            g = torch.Generator().manual_seed(s)
            model(torch.randn(4, 6, generator=g)).pow(2).mean().backward()
            opt_a.step()
            opt_b.step()
            opt_a.zero_grad()
            opt_b.zero_grad()
            ref.update(snapshot(model))
        avg.flush()
        assert avg.stats()["step"] == 8 and avg.stats()["snapshots_applied"] == 8
        assert_matches(avg.averaged_state_dict("ema"), ref.avg, rtol=1e-6, atol=1e-7)


class TwoParts(nn.Module):
    """Two halves trained by two optimizers; ``blow_up`` makes only the second half's
    gradients non-finite (GradScaler then skips that optimizer alone)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 2)

    def forward(self, x, blow_up=False):
        h = torch.tanh(self.a(x))
        out = self.b(h.detach())  # b's loss does not reach a's gradients
        return h.pow(2).mean() + out.pow(2).mean() * (float("inf") if blow_up else 1.0)


@pytest.mark.parametrize("order", ["a-then-b", "b-then-a"])
@pytest.mark.parametrize("skipped", ["a", "b"])
def test_several_optimizers_stay_aligned_when_grad_scaler_skips_one_of_them(order, skipped):
    """GradScaler skips the step of the optimizer whose own gradients overflowed (a non-fused
    one is not called at all): the snapshot of that step still follows the other optimizer's
    update, and every later snapshot follows both (not one optimizer's step behind)."""
    torch.manual_seed(0)
    model = TwoParts()
    opts = {"a": torch.optim.SGD(model.a.parameters(), lr=0.1, momentum=0.9),
            "b": torch.optim.SGD(model.b.parameters(), lr=0.1, momentum=0.9)}
    first, second = order.split("-then-")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    bad = {2, 5}
    refs = {"ema": RefEMA(0.6), "lawa": RefLAWA(2)}
    with oe.Averager(model, {"ema": oe.EMA(0.6), "lawa": oe.LAWA(2, every=1)}) as avg:
        avg.attach(opts["a"], opts["b"])
        for s in range(1, 10):
            g = torch.Generator().manual_seed(s)
            x = torch.randn(4, 6, generator=g)
            if skipped == "a":  # a's gradients overflow: scale a's loss instead
                loss = model(x) if s not in bad else (
                    torch.tanh(model.a(x)).pow(2).mean() * float("inf")
                    + model.b(torch.tanh(model.a(x)).detach()).pow(2).mean())
            else:
                loss = model(x, blow_up=s in bad)
            scaler.scale(loss).backward()
            before = {k: [p.detach().clone() for p in o.param_groups[0]["params"]]
                      for k, o in opts.items()}
            scaler.step(opts[first])
            scaler.step(opts[second])
            scaler.update()
            for o in opts.values():
                o.zero_grad()
            moved = {k: any(not torch.equal(b, p) for b, p in
                            zip(before[k], opts[k].param_groups[0]["params"])) for k in opts}
            assert moved[skipped] == (s not in bad) and moved[
                "b" if skipped == "a" else "a"], (s, moved)
            for r in refs.values():
                r.update(snapshot(model))
        # The last step's snapshot is whole: flush (or any read here) takes a pending one.
        avg.flush()
        st = avg.stats()
        assert st["step"] == 9 and st["snapshots_applied"] == 9
        for name, ref in refs.items():
            assert_matches(avg.averaged_state_dict(name), ref.avg, rtol=1e-6, atol=1e-7)


def test_a_step_whose_second_optimizer_was_skipped_last_is_taken_by_a_read():
    """The training loop ends on a step where GradScaler skipped one optimizer: the read takes
    that step's snapshot (it waits for no later step)."""
    torch.manual_seed(0)
    model = TwoParts()
    opt_a = torch.optim.SGD(model.a.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(model.b.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    ref = RefEMA(0.5)
    with oe.Averager(model, {"ema": oe.EMA(0.5)}) as avg:
        avg.attach(opt_a, opt_b)
        for s in range(1, 4):
            scaler.scale(model(torch.randn(4, 6), blow_up=s == 3)).backward()
            scaler.step(opt_a)
            scaler.step(opt_b)
            scaler.update()
            opt_a.zero_grad()
            opt_b.zero_grad()
            ref.update(snapshot(model))
        assert_matches(avg.averaged_state_dict("ema"), ref.avg, rtol=1e-6, atol=1e-7)
        assert avg.stats()["step"] == 3


def test_attach_refuses_optimizers_that_do_not_update_the_averaged_tensors():
    model, _ = make()
    with oe.Averager(model, {"ema": oe.EMA(0.9)}) as avg:
        # Only part of the model: the other optimizer's steps would be neither fenced nor seen.
        part = torch.optim.SGD(model.fc1.parameters(), lr=0.1)
        with pytest.raises(ValueError, match=r"'fc2.weight'.*updated by none of the optimizers"):
            avg.attach(part)
        # Another model's optimizer.
        other, other_opt = make()
        with pytest.raises(ValueError, match="not a parameter of the model this Averager"):
            avg.attach(torch.optim.SGD([*model.parameters(), other.fc1.weight], lr=0.1))
        # Parameters re-created after the Averager was built (as fully_shard or to_empty do).
        model.fc2.weight = nn.Parameter(model.fc2.weight.detach().clone())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with pytest.raises(RuntimeError, match="'fc2.weight' was replaced by another tensor"):
            avg.attach(opt)
        with pytest.raises(TypeError, match="at least one optimizer"):
            avg.attach()


def test_a_compiled_optimizer_step_keeps_the_hooks_out_of_the_graph():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    ref = RefEMA(0.5)

    @torch.compile(backend="eager")
    def step():
        opt.step()

    with oe.Averager(model, {"ema": oe.EMA(0.5)}) as avg:
        avg.attach(opt)
        for s in range(1, 7):
            model(torch.randn(2, 4)).pow(2).mean().backward()
            step()
            opt.zero_grad()
            ref.update(snapshot(model))
        avg.flush()
        assert avg.stats()["snapshots_applied"] == 6
        assert_matches(avg.averaged_state_dict("ema"), ref.avg, rtol=1e-6, atol=1e-7)
    # Dynamo skipped the hooks as a whole; it never tried to trace the engine (its lock,
    # timers, queue) into a graph.
    traced_into_us = [k for k in counters["graph_break"] if "disable" not in k]
    assert not traced_into_us, traced_into_us


def test_closure_optimizers_attached_together_count_each_step_once():
    """A closure optimizer runs the model's forward inside its step: that forward must not end
    the training step (the first optimizer's update alone, before the second's)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    a = torch.optim.SGD(model[0].parameters(), lr=0.1)
    b = torch.optim.SGD(model[1].parameters(), lr=0.1)
    x = torch.randn(16, 4)
    ref = RefEMA(0.9)
    with oe.Averager(model, {"ema": oe.EMA(0.9)}) as avg:
        avg.attach(a, b)
        for _ in range(5):
            def closure():
                a.zero_grad()
                b.zero_grad()
                loss = model(x).pow(2).mean()
                loss.backward()
                return loss
            closure()
            a.step(closure)
            b.step(closure)
            ref.update(snapshot(model))
        avg.flush()
        st = avg.stats()
        assert st["step"] == 5 and st["snapshots_taken"] == 5, st
        assert_matches(avg.averaged_state_dict("ema"), ref.avg, rtol=1e-6, atol=1e-7)


def test_manual_step_equals_attach():
    results = []
    for mode in ("attach", "manual", "manual-deferred"):
        model, opt = make()
        with oe.Averager(model, {"ema": oe.EMA(0.8), "lawa": oe.LAWA(2, every=2)}) as avg:
            if mode == "attach":
                avg.attach(opt)
            for s in range(1, 21):
                if mode == "manual-deferred":
                    avg.fence()  # before the optimizer changes the parameters in place
                train_step(model, opt, s)
                if mode == "manual":
                    avg.step()
                elif mode == "manual-deferred":
                    avg.step(fence=False)
            results.append((avg.averaged_state_dict("ema"), avg.averaged_state_dict("lawa")))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            for k in a:
                assert torch.equal(a[k], b[k])
