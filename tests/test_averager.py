"""The facade (``offload_ema.Averager``): its arguments, reads (``swapped``), use after close and
a clean interpreter exit. The parts have their own files: test_engine (the coordinator),
test_worker, test_staging, test_store, test_handoffs (the race tests on the simulated copy
engine), test_hooks, test_layout."""
import os
import subprocess
import sys

import pytest
import torch

import offload_ema as oe
from helpers import make, run_steps, train_step


def test_every_method_of_a_closed_averager_raises(tmp_path):
    model, opt = make()
    avg = oe.Averager(model, {"ema": oe.EMA(0.9)}).attach(opt)
    train_step(model, opt, 1)
    avg.close()
    calls = [lambda: avg.save_every(2, str(tmp_path / "{name}-{step}.safetensors")),
             lambda: avg.save(tmp_path / "e.safetensors", "ema"), avg.step, avg.flush,
             lambda: avg.averaged_state_dict("ema"), lambda: avg.attach(opt),
             lambda: avg.swapped(model, "ema").__enter__()]
    for call in calls:
        with pytest.raises(RuntimeError, match="closed"):
            call()


def test_swapped_on_compiled_model_is_seen_by_the_compiled_forward():
    model, opt = make()
    model.eval()
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(3, 8)
    with oe.Averager(compiled, {"ema": oe.EMA(0.5)}) as avg:
        avg.attach(opt)
        model.train()
        run_steps(model, opt, avg, 4)
        model.eval()
        sd = avg.averaged_state_dict("ema")
        ref_model, _ = make()
        ref_model.load_state_dict(sd)
        ref_model.eval()
        before = compiled(x)
        ptrs = [p.data_ptr() for p in model.parameters()]
        with avg.swapped(compiled, "ema"):
            assert [p.data_ptr() for p in model.parameters()] == ptrs  # same storage
            inside = compiled(x)
        after = compiled(x)
    torch.testing.assert_close(inside, ref_model(x))
    assert torch.equal(before, after)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_swapped_puts_the_average_in_and_restores_exactly(dtype):
    model, opt = make(dtype=dtype)
    with oe.Averager(model, {"lawa": oe.LAWA(3, every=1)}) as avg:
        avg.attach(opt)
        run_steps(model, opt, avg, 5)
        original = {k: v.clone() for k, v in model.state_dict().items()}
        expected = avg.averaged_state_dict("lawa")
        with avg.swapped(model, "lawa"):
            for k, v in model.state_dict().items():
                assert torch.equal(v, expected[k].to(v.dtype)), k
        for k, v in model.state_dict().items():
            assert torch.equal(v, original[k]), k
        with pytest.raises(ZeroDivisionError):
            with avg.swapped(model, "lawa"):
                1 / 0
        for k, v in model.state_dict().items():
            assert torch.equal(v, original[k]), k


@pytest.mark.parametrize("make_spec,message", [
    (lambda: oe.EMA(1.0), "beta must be in \\[0, 1\\)"),
    (lambda: oe.EMA(-0.1), "beta must be in \\[0, 1\\)"),
    (lambda: oe.EMA(float("nan")), "beta must be in \\[0, 1\\)"),
    (lambda: oe.EMA(0.9, every=0), "every must be an int >= 1"),
    (lambda: oe.EMA(0.9, start=-1), "start must be an int >= 0"),
    (lambda: oe.LAWA(0, every=1), "window must be an int >= 1"),
    (lambda: oe.LAWA(2, every=0), "every must be an int >= 1"),
    (lambda: oe.LAWA(2.5, every=1), "window must be an int >= 1"),
])
def test_average_specs_reject_bad_values(make_spec, message):
    with pytest.raises(ValueError, match=message):
        make_spec()


def test_averager_rejects_bad_arguments():
    model, _ = make()
    with pytest.raises(ValueError, match="averages must be a non-empty mapping"):
        oe.Averager(model, {})
    with pytest.raises(TypeError, match="averages\\['x'\\] must be an EMA, PowerEMA, SWA or LAWA"):
        oe.Averager(model, {"x": 0.9})
    with pytest.raises(ValueError, match="on_busy must be one of"):
        oe.Averager(model, {"e": oe.EMA(0.9)}, on_busy="drop")
    with pytest.raises(ValueError, match="buffers must be 'copy' or 'average'"):
        oe.Averager(model, {"e": oe.EMA(0.9)}, buffers="keep")
    with pytest.raises(ValueError, match="staging_bytes must be an int"):
        oe.Averager(model, {"e": oe.EMA(0.9)}, staging_bytes=16)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        oe.Averager({"w": torch.ones(2)}, {"e": oe.EMA(0.9)})
    with pytest.raises(TypeError, match="optimizers\\[0\\] must be a torch.optim.Optimizer"):
        with oe.Averager(model, {"e": oe.EMA(0.9)}) as avg:
            avg.attach(object())


def test_unknown_name_and_no_snapshot_yet():
    model, opt = make()
    with oe.Averager(model, {"ema": oe.EMA(0.9, start=5)}) as avg:
        avg.attach(opt)
        with pytest.raises(ValueError, match="no average named 'lawa'; this Averager has: ema"):
            avg.averaged_state_dict("lawa")
        run_steps(model, opt, avg, 2)
        with pytest.raises(RuntimeError, match="has no snapshot yet \\(first due after step 6"):
            avg.averaged_state_dict("ema")
        with pytest.raises(ValueError, match="no average named"):
            with avg.swapped(model, "nope"):
                pass


def test_interpreter_exits_cleanly_with_an_averager_open():
    code = (
        "import torch, offload_ema as oe\n"
        "m = torch.nn.Linear(256, 256)\n"
        "opt = torch.optim.SGD(m.parameters(), lr=0.1)\n"
        "avg = oe.Averager(m, {'ema': oe.EMA(0.9), 'lawa': oe.LAWA(3, every=1)}).attach(opt)\n"
        "for _ in range(5):\n"
        "    m(torch.randn(4, 256)).sum().backward(); opt.step()\n"
        "print('done')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "done"
    assert "Traceback" not in r.stderr and "Error" not in r.stderr
