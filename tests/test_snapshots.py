"""Snapshots on disk: round trip, metadata, retention, bad files, injected write errors, and
SIGKILL during saves."""
import glob
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import safetensors.torch
import torch
from torch import nn

import offload_ema as oe
from offload_ema import cli, snapshots
from helpers import (RefEMA, Tied, TinyNet, assert_matches, call_with_timeout, make, snapshot,
                     train_step)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def trained(steps=5, specs=None, **kw):
    model, opt = make(**kw)
    avg = oe.Averager(model, specs or {"ema": oe.EMA(0.9), "lawa": oe.LAWA(3, every=2)})
    avg.attach(opt)
    for s in range(1, steps + 1):
        train_step(model, opt, s)
    return model, opt, avg


@pytest.mark.parametrize("name", ["ema", "lawa"])
def test_round_trip_matches_averaged_state_dict(tmp_path, name):
    model, opt, avg = trained()
    with avg:
        path = avg.save(tmp_path / f"{name}.safetensors", name).result(timeout=60)
        expected = avg.averaged_state_dict(name)
    tensors, meta = oe.load_snapshot(path)
    assert list(tensors) == sorted(expected)
    for k, v in expected.items():
        assert torch.equal(tensors[k], v), k
    # Loadable with plain safetensors too.
    plain = safetensors.torch.load_file(path)
    assert set(plain) == set(expected)


def test_metadata(tmp_path):
    model, opt, avg = trained(steps=6)
    with avg:
        before = time.time()
        avg.save(tmp_path / "e.safetensors", "ema").result(timeout=60)
        avg.save(tmp_path / "l.safetensors", "lawa", dtype=torch.bfloat16).result(timeout=60)
    _, m = oe.load_snapshot(tmp_path / "e.safetensors")
    assert m["format"] == "offload_ema.snapshot" and m["version"] == oe.__version__
    assert m["name"] == "ema" and m["average"] == {"kind": "ema", "beta": 0.9, "every": 1, "start": 0}
    assert m["step"] == 6 and m["applied"] == 6 and m["dtype"] == "float32"
    import datetime
    created = datetime.datetime.fromisoformat(m["created"]).timestamp()
    assert before - 2 <= created <= time.time() + 1
    t, m = oe.load_snapshot(tmp_path / "l.safetensors")
    assert m["average"] == {"kind": "lawa", "window": 3, "every": 2, "start": 0}
    assert m["applied"] == 3 and m["dtype"] == "bfloat16"
    assert t["fc1.weight"].dtype == torch.bfloat16
    assert t["bn.num_batches_tracked"].dtype == torch.int64


def test_save_is_consistent_with_the_step_it_was_called_at(tmp_path):
    model, opt = make()
    ref = RefEMA(0.9)
    with oe.Averager(model, {"ema": oe.EMA(0.9)}) as avg:
        avg.attach(opt)
        for s in range(1, 5):
            train_step(model, opt, s)
            ref.update(snapshot(model))
        fut = avg.save(tmp_path / "e.safetensors", "ema")
        for s in range(5, 12):  # training goes on while the file is written
            train_step(model, opt, s)
        fut.result(timeout=60)
    tensors, meta = oe.load_snapshot(fut.path)
    assert meta["step"] == 4
    for k, v in ref.avg.items():
        torch.testing.assert_close(tensors[k].double(), v, rtol=1e-6, atol=1e-7)


def test_tied_parameters_are_written_under_both_names(tmp_path):
    torch.manual_seed(0)
    model = Tied()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with oe.Averager(model, {"ema": oe.EMA(0.5)}) as avg:
        avg.attach(opt)
        model(torch.tensor([1, 2])).sum().backward()
        opt.step()
        path = avg.save(tmp_path / "t.safetensors", "ema").result(timeout=60)
    t, _ = oe.load_snapshot(path)
    assert torch.equal(t["emb.weight"], t["head.weight"])


def test_periodic_saves_with_retention(tmp_path):
    model, opt = make()
    with oe.Averager(model, {"ema": oe.EMA(0.9), "lawa": oe.LAWA(2, every=3)}) as avg:
        avg.attach(opt)
        avg.save_every(2, str(tmp_path / "{name}-{step:05d}.safetensors"), keep_last=2)
        for s in range(1, 12):
            train_step(model, opt, s)
        avg.flush()
    files = sorted(os.listdir(tmp_path))
    # ema is saved at 2, 4, 6, 8, 10; lawa from its first snapshot (step 3) on: 4, 6, 8, 10.
    assert files == ["ema-00008.safetensors", "ema-00010.safetensors",
                     "lawa-00008.safetensors", "lawa-00010.safetensors"]
    _, meta = oe.load_snapshot(tmp_path / "lawa-00010.safetensors")
    assert meta["step"] == 10 and meta["applied"] == 3


def test_save_every_rejects_bad_arguments(tmp_path):
    model, opt, avg = trained(steps=1)
    with avg:
        with pytest.raises(ValueError, match="every must be an int >= 1"):
            avg.save_every(0, str(tmp_path / "{name}-{step}"))
        with pytest.raises(ValueError, match="must contain \\{step\\}"):
            avg.save_every(5, str(tmp_path / "{name}.safetensors"))
        with pytest.raises(ValueError, match="must contain \\{name\\}"):
            avg.save_every(5, str(tmp_path / "x-{step}.safetensors"))
        with pytest.raises(ValueError, match="keep_last must be an int >= 1"):
            avg.save_every(5, str(tmp_path / "{name}-{step}"), keep_last=0)
        with pytest.raises(ValueError, match="no average named 'nope'"):
            avg.save(tmp_path / "x.safetensors", "nope")
        with pytest.raises(ValueError, match="dtype must be a floating-point"):
            avg.save(tmp_path / "x.safetensors", "ema", dtype=torch.int32)
        (tmp_path / "afile").write_text("x")
        with pytest.raises(NotADirectoryError, match="parent is a file"):
            avg.save(tmp_path / "afile" / "x.safetensors", "ema")


def test_apply_snapshot_into_fresh_and_compiled_models(tmp_path):
    model, opt, avg = trained()
    with avg:
        path = avg.save(tmp_path / "l.safetensors", "lawa").result(timeout=60)
        expected = avg.averaged_state_dict("lawa")
    for dtype in (torch.float32, torch.bfloat16):
        fresh = TinyNet(dtype=dtype)
        target = torch.compile(fresh, backend="eager") if dtype == torch.float32 else fresh
        meta = oe.apply_snapshot(target, path)
        assert meta["name"] == "lawa"
        for k, v in fresh.state_dict().items():
            assert torch.equal(v, expected[k].to(v.dtype)), k


def test_apply_snapshot_reports_mismatches_and_writes_nothing(tmp_path):
    model, opt, avg = trained()
    with avg:
        path = avg.save(tmp_path / "e.safetensors", "ema").result(timeout=60)
    other = TinyNet(width=32)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="'fc1.weight' has shape \\[16, 8\\], the model has \\[32, 8\\]"):
        oe.apply_snapshot(other, path)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())

    class Extra(TinyNet):
        def __init__(self):
            super().__init__()
            self.extra = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="missing keys \\['extra.weight', 'extra.bias'\\]"):
        oe.apply_snapshot(Extra(), path)
    small = nn.Sequential()
    with pytest.raises(ValueError, match="unexpected keys"):
        oe.apply_snapshot(small, path)
    bad = TinyNet()
    bad.bn.num_batches_tracked = torch.tensor(0.0)  # a float where the file has int64
    with pytest.raises(ValueError, match="'bn.num_batches_tracked' has dtype torch.int64"):
        oe.apply_snapshot(bad, path)


def test_truncated_foreign_and_missing_files_give_clear_errors(tmp_path):
    model, opt, avg = trained()
    with avg:
        path = avg.save(tmp_path / "e.safetensors", "ema").result(timeout=60)
    data = open(path, "rb").read()
    for cut in (5, 100, len(data) // 2, len(data) - 1):
        trunc = tmp_path / f"trunc{cut}.safetensors"
        trunc.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="not a readable safetensors file"):
            oe.load_snapshot(trunc)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a safetensors file at all" * 10)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        oe.load_snapshot(junk)
    foreign = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file({"w": torch.ones(3)}, foreign, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not an offload_ema snapshot"):
        oe.load_snapshot(foreign)
    with pytest.raises(FileNotFoundError):
        oe.load_snapshot(tmp_path / "nothing.safetensors")
    assert cli.main(["inspect", str(junk)]) == 1


def test_inspect_prints_metadata_and_tensors(tmp_path, capsys):
    model, opt, avg = trained()
    with avg:
        path = avg.save(tmp_path / "e.safetensors", "ema").result(timeout=60)
        sd = avg.averaged_state_dict("ema")
    assert cli.main(["inspect", path]) == 0
    out = capsys.readouterr().out
    assert "name: ema" in out and "step: 5" in out
    line = next(l for l in out.splitlines() if l.strip().startswith("fc1.weight "))
    assert "[16, 8]" in line and "float32" in line
    assert abs(float(line.split()[-1]) - sd["fc1.weight"].double().norm().item()) < 1e-4
    # A directory: said so, with the snapshot files it holds.
    assert cli.main(["inspect", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "is a directory, not a snapshot" in err and "e.safetensors" in err
    (tmp_path / "empty").mkdir()
    assert cli.main(["inspect", str(tmp_path / "empty")]) == 1
    assert "holds no snapshot files" in capsys.readouterr().err


# ---- faults ------------------------------------------------------------------------------------

def test_write_error_raises_from_the_future_and_the_next_step_and_keeps_the_old_file(
        tmp_path, monkeypatch):
    model, opt, avg = trained()
    final = tmp_path / "e.safetensors"
    with avg:
        avg.save(final, "ema").result(timeout=60)
        good = final.read_bytes()
        real = snapshots._write_file

        def disk_full(filename, tensors, meta):
            real(filename, tensors, meta)
            with open(filename, "r+b") as f:
                f.truncate(os.path.getsize(filename) // 2)  # half a file ...
            raise OSError(28, "No space left on device")  # ... then the disk is full
        monkeypatch.setattr(snapshots, "_write_file", disk_full)
        fut = avg.save(final, "ema")
        with pytest.raises(OSError, match="No space left"):
            fut.result(timeout=60)
        assert final.read_bytes() == good  # the previous snapshot is intact
        assert glob.glob(str(tmp_path / ".*tmp*")) == []  # no temporary left behind
        # The Averager keeps working; an error nobody looked at is raised by the next step.
        fut2 = avg.save(final, "ema")
        while not fut2.done():
            time.sleep(0.01)
        with pytest.raises(OSError, match="No space left"):
            train_step(model, opt, 6)
        train_step(model, opt, 7)  # reported once; training goes on
        monkeypatch.setattr(snapshots, "_write_file", real)
        avg.save(final, "ema").result(timeout=60)
        avg.flush()
    _, meta = oe.load_snapshot(final)
    assert meta["step"] == 7


def test_unwritable_directory_is_reported_by_the_future(tmp_path):
    if os.geteuid() == 0:
        bad_dir = "/proc"  # root ignores permission bits; procfs refuses new files for anyone
    else:
        bad_dir = tmp_path / "ro"
        bad_dir.mkdir()
        bad_dir.chmod(0o500)
    model, opt, avg = trained()
    with avg:
        fut = avg.save(os.path.join(bad_dir, "e.safetensors"), "ema")
        with pytest.raises(OSError):
            fut.result(timeout=60)
        train_step(model, opt, 6)  # seen through result(): not raised again
    # Missing parent directories are created (save and save_every templates alike).
    with oe.Averager(model, {"ema": oe.EMA(0.9)}) as avg2:
        avg2.step()
        avg2.save(tmp_path / "no" / "such" / "e.safetensors", "ema").result(timeout=60)
        avg2.save_every(1, str(tmp_path / "new" / "{step}" / "{name}.safetensors"))
        avg2.step()
        avg2.flush()
    assert (tmp_path / "no" / "such" / "e.safetensors").is_file()
    assert (tmp_path / "new" / "2" / "ema.safetensors").is_file()


def test_a_failing_write_reaches_flush_and_close(tmp_path, monkeypatch):
    model, opt, avg = trained()
    monkeypatch.setattr(snapshots, "write_atomic", lambda *a: 1 / 0)
    import offload_ema.writer as writer_mod
    monkeypatch.setattr(writer_mod, "write_atomic", lambda *a: 1 / 0)
    avg.save(tmp_path / "e.safetensors", "ema")
    time.sleep(0.2)
    with pytest.raises(ZeroDivisionError):
        avg.close()


KILL_SCRIPT = r"""
import sys, torch, offload_ema as oe
from torch import nn
path = sys.argv[1]
torch.manual_seed(0)
model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(12)])  # ~12.6M params, ~50 MB
opt = torch.optim.SGD(model.parameters(), lr=1e-3)
avg = oe.Averager(model, {"ema": oe.EMA(0.9)}).attach(opt)
step = 0
while True:
    step += 1
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.01)
    opt.step()
    avg.save(path, "ema").result(timeout=120)
    print(step, flush=True)
"""


def test_sigkill_during_repeated_saves_never_leaves_a_partial_file(tmp_path):
    final = tmp_path / "ema.safetensors"
    script = tmp_path / "saver.py"
    script.write_text(KILL_SCRIPT)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    seen_steps = []
    for delay in (0.05, 0.13, 0.29, 0.41, 0.77):
        p = subprocess.Popen([sys.executable, str(script), str(final)], stdout=subprocess.PIPE,
                             text=True, env=env)
        first = p.stdout.readline()  # one save completed: writes are now going on
        assert first.strip(), "the saver never completed a save"
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
        tensors, meta = oe.load_snapshot(final)  # complete and readable, whatever the moment
        assert len(tensors) == 24 and meta["step"] >= 1
        assert all(t.isfinite().all() for t in tensors.values())
        seen_steps.append(meta["step"])
    assert max(seen_steps) > 1, "no kill happened after more than one save"
    leftovers = glob.glob(str(tmp_path / ".ema.safetensors.tmp-*"))
    print(f"kills left {len(leftovers)} temporaries; steps seen {seen_steps}")
    # The next successful save in a fresh process removes temporaries left by killed writers.
    model, opt = make()
    with oe.Averager(model, {"ema": oe.EMA(0.9)}) as avg:
        avg.attach(opt)
        train_step(model, opt, 1)
        avg.save(final, "ema").result(timeout=60)
    assert glob.glob(str(tmp_path / ".ema.safetensors.tmp-*")) == []


def test_written_files_read_back_exactly_with_safetensors(tmp_path):
    tensors = {
        "f32": torch.randn(3, 5), "bf16": torch.randn(7).bfloat16(), "f16": torch.randn(2, 2).half(),
        "f64": torch.randn(4, dtype=torch.float64), "i64": torch.tensor(12345), "empty": torch.zeros(0, 3),
        "u8": torch.arange(5, dtype=torch.uint8), "b": torch.tensor([True, False, True]),
        "odd": torch.randn(3).bfloat16(),  # leaves the data unaligned for what follows
        "noncontig": torch.randn(4, 6).t(),
    }
    path = tmp_path / "x.safetensors"
    snapshots.write_atomic(str(path), tensors, {"format": "test", "k": "v"})
    back = safetensors.torch.load_file(path)
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v), k
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "test", "k": "v"}


def test_frozen_parameters_and_buffers_are_written_with_their_values(tmp_path):
    """Frozen parameters are copied by the worker (off the training thread), buffers at save()."""
    model, _ = make()
    model.fc1.weight.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with oe.Averager(model, {"ema": oe.EMA(0.5)}) as avg:
        avg.attach(opt)
        train_step(model, opt, 1)
        running_mean = model.bn.running_mean.clone()
        fut = avg.save(tmp_path / "ema.safetensors", "ema")
        train_step(model, opt, 2)  # changes the buffers after save(): not in the file
        fut.result(timeout=60)
    tensors, _ = oe.load_snapshot(tmp_path / "ema.safetensors")
    assert torch.equal(tensors["fc1.weight"], model.fc1.weight.detach())
    assert torch.equal(tensors["bn.running_mean"], running_mean)
    assert int(tensors["bn.num_batches_tracked"]) == 1


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait(timeout=30)
    return p.pid


def test_save_every_removes_every_stale_temporary_of_this_host(tmp_path):
    """Killed writers leave temporaries under the names they were writing; save_every's names
    change with the step, so each kill left one (up to a whole snapshot) that nothing removed.
    Any of ours whose process is gone goes now; another machine's (shared disk) and live ones
    stay."""
    dead = _dead_pid()
    host = snapshots._HOST
    stale = [f".ema-00000010.safetensors.tmp-{dead}-0@{host}",
             f".ema-00000020.safetensors.tmp-{dead}-3@{host}",
             f".lawa-00000010.safetensors.tmp-{dead}-1",  # an earlier version's name (no host)
             f".ema-00000030.safetensors.tmp-{dead}-7@{host}"]
    keep = [f".ema-00000040.safetensors.tmp-{dead}-0@another-machine",
            f".ema-00000050.safetensors.tmp-{os.getppid()}-0@{host}",  # a live process
            ".notes.txt", "ema-old.safetensors.tmp-123"]
    for name in stale + keep:
        (tmp_path / name).write_bytes(b"x" * 64)
    (tmp_path / stale[-1]).unlink()
    (tmp_path / stale[-1]).mkdir()  # a directory's (save_pretrained)
    (tmp_path / stale[-1] / "part").write_bytes(b"x")
    model, opt = make()
    with oe.Averager(model, {"ema": oe.EMA(0.9)}) as avg:
        avg.attach(opt)
        avg.save_every(2, str(tmp_path / "{name}-{step:08d}.safetensors"))
        for s in range(1, 3):
            train_step(model, opt, s)
        avg.flush()
    left = sorted(os.listdir(tmp_path))
    assert not set(stale) & set(left), left
    assert set(keep) <= set(left), left


@pytest.mark.parametrize("target", ["/proc", "a directory"])
def test_a_failed_write_names_the_users_path_not_our_temporary(target, tmp_path):
    model, opt = make()
    path = "/proc/y.safetensors" if target == "/proc" else str(tmp_path / "newdir")
    if target == "a directory":
        os.mkdir(path)
    with oe.Averager(model, {"ema": oe.EMA(0.9)}) as avg:
        avg.attach(opt)
        train_step(model, opt, 1)
        with pytest.raises(OSError) as info:
            avg.save(path, "ema").result(timeout=60)
    message = str(info.value)
    assert path in message and ".tmp-" not in message, message


def test_keep_last_never_removes_this_runs_files_for_an_older_runs_higher_steps(tmp_path):
    """A run restarted from step 1 in a directory where an earlier run reached step 40: the
    earlier run's higher-step files were "newest" by step, and rotation deleted the new run's
    own files as soon as they were written."""
    template = str(tmp_path / "{name}-{step:05d}.safetensors")
    model, opt = make()
    with oe.Averager(model, {"ema": oe.EMA(0.9)}) as avg:  # the earlier run: steps 1..40
        avg.attach(opt)
        avg.save_every(10, template, keep_last=2)
        for s in range(1, 41):
            train_step(model, opt, s)
    assert sorted(p.name for p in tmp_path.glob("ema-*")) == ["ema-00030.safetensors",
                                                               "ema-00040.safetensors"]
    model, opt = make(seed=1)
    with pytest.warns(RuntimeWarning, match="steps above this run's 10"):
        with oe.Averager(model, {"ema": oe.EMA(0.9)}) as avg:  # restarted from step 1
            avg.attach(opt)
            avg.save_every(10, template, keep_last=2)
            for s in range(1, 26):
                train_step(model, opt, s)
    names = sorted(p.name for p in tmp_path.glob("ema-*"))
    # This run's two newest, at or below its step (10 and 20), and the earlier run's 30 and 40
    # untouched. (Before: each of this run's files was removed right after it was written.)
    assert names == ["ema-00010.safetensors", "ema-00020.safetensors", "ema-00030.safetensors",
                     "ema-00040.safetensors"], names
    _, meta = oe.load_snapshot(tmp_path / "ema-00020.safetensors")
    assert meta["step"] == 20


def _write_with_meta(path, meta):
    from offload_ema.snapshots import write_atomic
    write_atomic(str(path), {"w": torch.zeros(2)}, meta)


@pytest.mark.parametrize("meta,field", [
    ({"format": "offload_ema.snapshot", "name": "ema", "step": "3"}, "'average'"),
    ({"format": "offload_ema.snapshot", "average": "{not json", "step": "3"}, "'average'"),
    ({"format": "offload_ema.snapshot", "average": "[1]", "step": "3"}, "'average'"),
    ({"format": "offload_ema.snapshot", "average": "{}", "step": "three"}, "'step'"),
])
def test_damaged_metadata_is_a_value_error_naming_the_file_and_field(tmp_path, meta, field):
    path = tmp_path / "bad.safetensors"
    _write_with_meta(path, meta)
    with pytest.raises(ValueError, match=f"bad.safetensors.*{field}"):
        oe.load_snapshot(path)


def test_the_writer_thread_runs_before_any_save_and_a_save_handed_over_at_exit_is_written(
        tmp_path, monkeypatch):
    """Python 3.12.0-3.12.2 cannot start a thread inside the exit's close: the writer's thread
    exists from the start, so a first save whose copy runs in that close is still written."""
    model, opt = make()
    avg = oe.Averager(model, {"ema": oe.EMA(0.9)}).attach(opt)
    assert avg._writer._thread.is_alive()  # before any save
    for s in range(1, 4):
        train_step(model, opt, s)
    ref = RefEMA(0.9)
    # (the reference of the three steps, replayed)
    model2, opt2 = make()
    for s in range(1, 4):
        train_step(model2, opt2, s)
        ref.update(snapshot(model2))

    start = threading.Thread.start

    def refuse(self):  # as at exit on those versions (the test's own timer thread may start)
        if self.name.startswith("offload_ema"):
            raise RuntimeError("can't create new thread at interpreter shutdown")
        return start(self)
    monkeypatch.setattr(threading.Thread, "start", refuse)
    fut = avg.save(tmp_path / "ema.safetensors", "ema")
    call_with_timeout(avg.close, 30, "close", abandon=[avg])
    monkeypatch.undo()
    assert fut.result(timeout=5) == str(tmp_path / "ema.safetensors")
    tensors, _ = snapshots.load_snapshot(tmp_path / "ema.safetensors")
    assert_matches(tensors, ref.avg, rtol=1e-6, atol=1e-7)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code, tmp_path, timeout=120):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, cwd=tmp_path, env=env)


# The worker is slowed down so that the save is still queued behind the updates when the script
# ends: it must be written before the process exits.
_EXIT_SCRIPT = """
import sys, time, torch, offload_ema as oe

real = oe.ops.ema_update_multi_
def slow(*a, **k):
    time.sleep(0.2)
    return real(*a, **k)
oe.ops.ema_update_multi_ = slow
if sys.argv[2] == "fail":
    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")
    import offload_ema.writer as writer_mod
    writer_mod.write_atomic = disk_full
m = torch.nn.Linear(64, 64)
opt = torch.optim.SGD(m.parameters(), lr=0.1)
avg = oe.Averager(m, {"ema": oe.EMA(0.9)}, staging_bytes=1 << 20).attach(opt)
for _ in range(4):
    m(torch.randn(4, 64)).sum().backward(); opt.step(); opt.zero_grad()
avg.save(sys.argv[1], "ema")
print("end of script", flush=True)
"""


def test_a_save_pending_at_exit_is_written(tmp_path):
    path = tmp_path / "ema.safetensors"
    r = _python(_EXIT_SCRIPT.replace("sys.argv[1]", repr(str(path))).replace(
        "sys.argv[2]", "'ok'"), tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "end of script"
    tensors, meta = oe.load_snapshot(path)
    assert meta["step"] == 4 and meta["applied"] == 4 and set(tensors) == {"weight", "bias"}


def test_a_save_that_fails_at_exit_is_loud_and_the_exit_status_is_not_zero(tmp_path):
    path = tmp_path / "ema.safetensors"
    r = _python(_EXIT_SCRIPT.replace("sys.argv[1]", repr(str(path))).replace(
        "sys.argv[2]", "'fail'"), tmp_path)
    assert r.returncode != 0
    assert "No space left on device" in r.stderr and "pending snapshot" in r.stderr
    assert not path.exists()
