"""The overhead benchmark end to end on a very small model: records, table, plot, CLI errors."""
import json
import os
import subprocess
import sys

import pytest

from offload_ema import cli
from offload_ema.gpt import GPT, PRESETS

KEYS = {"mode", "preset", "device", "params", "tensors", "experts", "dtype", "step_ms_median",
        "step_ms_p90", "overhead_pct", "averager_us_per_step", "averager_us_median",
        "gpu_mem_delta_bytes", "rss_delta_bytes", "pinned_bytes", "applied", "skipped",
        "coalesced"}


def test_presets_have_the_sizes_they_claim():
    for name in ("tiny", "many"):
        cfg = PRESETS[name]
        ps = list(GPT(cfg).parameters())
        assert sum(p.numel() for p in ps) == cfg.params, name
        assert len(ps) == cfg.tensors, name
    assert 0.95e9 <= PRESETS["1b"].params <= 1.1e9
    assert PRESETS["many"].tensors >= 10_000


def test_experts_model_counts_and_trains_every_expert():
    import dataclasses

    import torch

    from offload_ema.gpt import lm_loss

    cfg = dataclasses.replace(PRESETS["tiny"], width=32, heads=2, layers=2, experts=7,
                              expert_hidden=3)
    torch.manual_seed(0)
    model = GPT(cfg)
    ps = list(model.parameters())
    assert len(ps) == cfg.tensors == 5 + 2 * (9 + 4 * 7)
    assert sum(p.numel() for p in ps) == cfg.params
    lm_loss(model, torch.randint(0, cfg.vocab, (2, 9))).backward()
    # A dense mixture: every expert's four tensors take part in every step.
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert dataclasses.replace(cfg, expert_hidden=0).hidden == 4 * 32 // 7
    with pytest.raises(ValueError, match="experts"):
        GPT(dataclasses.replace(cfg, experts=-1))


def _measured(rows):
    """The modes that ran (a peer whose package is missing is a row saying so), checked."""
    from offload_ema.benchmark import PEERS
    assert all(r["mode"] in PEERS for r in rows if "unavailable" in r)
    return [r for r in rows if "unavailable" not in r]


def _default_rows(js):
    """The records of a run of the default modes (the CPU-only ones first, in order), checked."""
    rows = _measured(json.loads(js.read_text()))
    assert [r["mode"] for r in rows][:6] == ["none", "naive", "swa_utils", "offload",
                                             "offload_fold", "offload_multi"]
    for r in rows:
        assert KEYS <= set(r), KEYS - set(r)
    return rows


def test_bench_many_tensors_reports_the_averager_time_of_every_mode(tmp_path, capsys):
    js = tmp_path / "o.json"
    # 5 + 2 x (9 + 4 x 150) = 1223 tensors at 2 x 150 experts (42x tiny): a few seconds.
    rc = cli.main(["bench", "--layers", "2", "--width", "32", "--experts", "150", "--rounds", "1",
                   "--steps", "2", "--warmup", "1", "--json", str(js)])
    assert rc == 0
    rows = _default_rows(js)
    for r in rows:
        assert r["tensors"] == 1223 and r["experts"] == 150
        us = r["averager_us_per_step"]
        assert isinstance(us, float) and us >= 0 and r["averager_us_median"] >= 0
        if r["mode"] == "none":
            assert us == 0
        else:  # every other mode does its averaging on the training thread, in part or whole
            assert us > 0, r["mode"]
        # Each step's averaging lies within that step, and the median of 2 steps is their mean.
        assert us / 1e3 <= r["step_ms_median"] * 1.0001, r
    out = capsys.readouterr().out
    assert "tensors=1223 (experts=150x1 per block)" in out and "train us" in out
    assert "us/step median" in out and "for 1223 tensors" in out


def test_averager_time_is_the_time_inside_the_averagers_hooks(tmp_path, monkeypatch):
    """The offload figure brackets the Averager's own hooks: a 10 ms sleep in its post-hook shows
    as >= 10 ms per step there, and nowhere else."""
    import time

    import offload_ema as oe

    real = oe.Averager._step

    def slow_step(self, *a, **k):
        time.sleep(0.01)
        return real(self, *a, **k)
    monkeypatch.setattr(oe.Averager, "_step", slow_step)
    js = tmp_path / "o.json"
    assert cli.main(["bench", "--layers", "1", "--width", "64", "--rounds", "1", "--steps", "3",
                     "--warmup", "1", "--modes", "none,naive,offload", "--json", str(js)]) == 0
    by = {r["mode"]: r for r in json.loads(js.read_text())}
    assert by["offload"]["averager_us_median"] >= 10_000
    assert by["none"]["averager_us_per_step"] == 0
    assert by["naive"]["averager_us_median"] < 10_000


def test_hook_clock_times_only_the_hooks_registered_between_open_and_close():
    import time

    import torch

    from offload_ema.benchmark import HookClock

    class SlowSGD(torch.optim.SGD):
        @torch.no_grad()
        def step(self, closure=None):
            time.sleep(0.05)  # the optimizer's own work: not the averaging's
            return super().step(closure)

    class Owner:
        avg_s = 0.0

    p = torch.nn.Parameter(torch.zeros(3))
    opt = SlowSGD([p], lr=0.1)
    opt.register_step_pre_hook(lambda *a: time.sleep(0.05))  # someone else's hook, before
    owner = Owner()
    clock = HookClock(owner, opt)
    clock.open()
    h = [opt.register_step_pre_hook(lambda *a: time.sleep(0.002)),
         opt.register_step_post_hook(lambda *a: time.sleep(0.003))]
    clock.close()
    opt.register_step_post_hook(lambda *a: time.sleep(0.05))  # and after
    p.grad = torch.ones(3)
    opt.step()
    assert 0.005 <= owner.avg_s < 0.05, owner.avg_s
    clock.remove()
    for x in h:
        x.remove()
    opt.step()  # removed: counts nothing more
    assert owner.avg_s < 0.05


def test_bench_writes_records_table_and_plot(tmp_path, capsys):
    js, png = tmp_path / "o.json", tmp_path / "o.png"
    rc = cli.main(["bench", "--layers", "1", "--width", "64", "--rounds", "2", "--steps", "2",
                   "--warmup", "1", "--json", str(js), "--plot", str(png)])
    assert rc == 0
    rows = _default_rows(js)
    for r in rows:
        assert r["step_ms_median"] > 0 and r["step_ms_p90"] >= r["step_ms_median"]
        assert len(r["round_medians_ms"]) == 2
    by = {r["mode"]: r for r in rows}
    assert by["none"]["overhead_pct"] == 0
    # 2 rounds x (1 warm-up + 2 timed) steps, every snapshot applied under on_busy="block".
    assert by["offload"]["applied"] == by["offload_multi"]["applied"] == 6
    assert by["offload_fold"]["applied"] == 6 and by["offload_fold"]["fold"] == 4
    assert 2 <= by["offload_fold"]["folds"] <= 4  # per round: the flush applies what is held
    assert by["offload"]["skipped"] == by["offload"]["coalesced"] == 0
    assert by["naive"]["applied"] == 6 and by["swa_utils"]["applied"] == 6
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "offload vs naive: " in out and "naive vs none: " in out and "offload vs none: " in out
    assert "offload vs naive, training thread:" in out
    assert "host update per snapshot: fold 1" in out and "vs fold 4" in out


def test_bench_rejects_unknown_modes():
    with pytest.raises(SystemExit, match="unknown \\['fast'\\]"):
        cli.main(["bench", "--modes", "none,fast"])


def test_console_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "offload_ema", "bench", "--help"],
                       capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0 and "--on-busy" in r.stdout


def test_bench_save_every_reports_write_and_disk_speed(tmp_path, capsys):
    js = tmp_path / "o.json"
    rc = cli.main(["bench", "--layers", "1", "--width", "64", "--rounds", "1", "--steps", "4",
                   "--warmup", "0", "--modes", "none,offload", "--save-every", "2",
                   "--save-dir", str(tmp_path / "new" / "dir"), "--json", str(js)])
    assert rc == 0  # a missing --save-dir is created
    off = {r["mode"]: r for r in json.loads(js.read_text())}["offload"]
    assert off["saves"] == 2 and off["save_gbps"] > 0 and off["disk_write_gbps"] > 0
    import offload_ema as oe
    tensors, meta = oe.load_snapshot(tmp_path / "new" / "dir" / "offload.safetensors")
    assert meta["name"] == "ema" and meta["step"] == 4
    assert "of the disk's sequential write speed" in capsys.readouterr().out


def test_bench_nproc_2_halves_the_averager_host_memory_per_rank(tmp_path):
    def host_bytes(n):
        js = tmp_path / f"n{n}.json"
        assert cli.main(["bench", "--nproc", str(n), "--layers", "2", "--width", "64",
                         "--rounds", "1", "--steps", "2", "--warmup", "1",
                         "--modes", "none,offload", "--json", str(js)]) == 0
        off = {r["mode"]: r for r in json.loads(js.read_text())}["offload"]
        return off.get("host_bytes_per_rank", [off["host_bytes"]])
    one, = host_bytes(1)
    two = host_bytes(2)
    assert len(two) == 2
    for b in two:
        assert 0.4 < b / one < 0.6, (one, two)


class FakeAllocator:
    """CUDA's three memory queries over a simulated allocator."""

    def __init__(self):
        self.now = self.peak = 0

    def alloc(self, n):
        self.now += n
        self.peak = max(self.peak, self.now)

    def free(self, n):
        self.now -= n

    def reset_peak(self):
        self.peak = self.now


def test_gpu_memory_of_each_mode_is_measured_from_just_before_it_started():
    """gpu_foreach keeps a 400-byte accumulator from its construction on; every training step
    peaks 1000 bytes above what is allocated. Over several rounds, none's figure must not take
    in that accumulator (it did: gpu_foreach came out at 0 from round 2 on)."""
    from offload_ema.benchmark import MemoryMeter

    mem = FakeAllocator()
    mem.alloc(5000)  # model, AdamW state
    meter = MemoryMeter(lambda: mem.now, lambda: mem.peak, mem.reset_peak)

    def step(extra=0):
        mem.alloc(1000 + extra)  # activations, gradients (+ the mode's temporaries)
        mem.free(1000 + extra)

    for rnd in range(3):
        if rnd == 0:
            with meter.constructing("none"):
                pass
        with meter.running("none"):
            step()
        if rnd == 0:
            with meter.constructing("gpu_foreach"):
                mem.alloc(400)
        with meter.running("gpu_foreach"):
            step(extra=30)
        if rnd == 0:
            with meter.constructing("offload"):
                pass
        with meter.running("offload"):
            step()
        assert meter.delta("none") == 0
        assert meter.delta("gpu_foreach") == 430, rnd
        assert meter.delta("offload") == 0
    assert meter.cost("none") == 1000


def test_memory_meter_without_a_reference_reports_the_whole_cost():
    from offload_ema.benchmark import MemoryMeter

    mem = FakeAllocator()
    meter = MemoryMeter(lambda: mem.now, lambda: mem.peak, mem.reset_peak)
    with meter.constructing("gpu_foreach"):
        mem.alloc(64)
    with meter.running("gpu_foreach"):
        mem.alloc(8)
        mem.free(8)
    assert meter.delta("gpu_foreach") == 72


def test_write_json_replaces_the_file_whole(tmp_path):
    from offload_ema.benchmark import write_json

    path = tmp_path / "o.json"
    write_json(str(path), [{"mode": "none"}])
    write_json(str(path), [{"mode": "none"}, {"mode": "offload"}])
    assert [r["mode"] for r in json.loads(path.read_text())] == ["none", "offload"]
    assert [p.name for p in tmp_path.iterdir()] == ["o.json"]  # no temporary file left


def test_a_run_cut_after_its_first_round_leaves_that_round_in_the_json(tmp_path, monkeypatch):
    from offload_ema import benchmark

    begun = []

    def begin(self):
        begun.append(self.name)
        if len(begun) > 2:  # round 2 of none: as if the device command's time ran out
            raise KeyboardInterrupt
    monkeypatch.setattr(benchmark.Mode, "begin", begin)
    js = tmp_path / "o.json"
    with pytest.raises(KeyboardInterrupt):
        cli.main(["bench", "--layers", "1", "--width", "64", "--rounds", "3", "--steps", "2",
                  "--warmup", "0", "--modes", "none,naive", "--json", str(js)])
    rows = json.loads(js.read_text())
    assert [r["mode"] for r in rows] == ["none", "naive"]
    for r in rows:
        assert r["partial"] and r["rounds"] == 1 and len(r["round_medians_ms"]) == 1
        assert KEYS <= set(r), KEYS - set(r)
    assert rows[1]["applied"] == 2


def test_bench_records_are_marked_complete(tmp_path):
    js = tmp_path / "o.json"
    assert cli.main(["bench", "--layers", "1", "--width", "64", "--rounds", "2", "--steps", "1",
                     "--warmup", "0", "--modes", "none,offload", "--json", str(js)]) == 0
    rows = json.loads(js.read_text())
    assert [r["partial"] for r in rows] == [False, False]
    assert [len(r["round_medians_ms"]) for r in rows] == [2, 2]


_RANK_TEARDOWN = r"""
import glob, json, sys, types
import torch
from offload_ema import benchmark

def gloo_threads():
    names = [open(t + "/comm").read().strip() for t in glob.glob("/proc/self/task/*")]
    return sorted(n for n in names if "gloo" in n)

seen = {}
def run(args, rank, world):  # what the benchmark's DDP modes hold, without the timing
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = DDP(torch.nn.Linear(8, 8))
    model(torch.randn(2, 8)).sum().backward()
    seen["during"] = gloo_threads()
    return []
benchmark.run = run
benchmark._rank_main(0, types.SimpleNamespace(device="cpu", nproc=1), sys.argv[1])
print(json.dumps({"during": seen["during"], "after": gloo_threads()}))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="thread names from /proc")
def test_rank_teardown_stops_the_gloo_group_before_exit(tmp_path):
    """A gloo group still alive at interpreter exit aborted the --nproc runs now and then
    (SIGABRT, "terminate called without an active exception", from a gloo worker thread that
    needed the GIL during finalization): DDP's lazy import of torch.distributed.nn kept the
    default group referenced past destroy_process_group."""
    r = subprocess.run([sys.executable, "-c", _RANK_TEARDOWN, str(tmp_path)], capture_output=True,
                       text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr
    threads = json.loads(r.stdout.strip().splitlines()[-1])
    if not threads["during"]:
        pytest.skip("this torch does not name its gloo threads")
    assert threads["after"] == [], threads


def test_report_explains_itself_and_warns_when_too_noisy(capsys):
    from offload_ema import benchmark

    def row(mode, med, p90, overhead, rounds):
        return {"mode": mode, "step_ms_median": med, "step_ms_p90": p90, "overhead_pct": overhead,
                "round_medians_ms": rounds, "gpu_mem_delta_bytes": 0, "rss_delta_bytes": 0,
                "pinned_bytes": 0, "applied": 3, "skipped": 0, "coalesced": 0,
                "fence_ms_per_snapshot": 0.0, "copy_ms_per_snapshot": 0.0,
                "update_ms_per_snapshot": 0.0, "averager_us_per_step": 0.0,
                "averager_us_median": 0.0, "tensors": 29}
    quiet = [row("none", 10.0, 10.5, 0.0, [10.0, 10.1]),
             row("offload", 10.5, 11.0, 5.0, [10.4, 10.6])]
    benchmark.report(quiet)
    out = capsys.readouterr().out
    assert "skip / coal: dropped or merged" in out and "warning" not in out
    assert quiet[1]["overhead_pct_rounds"] == pytest.approx([4.0, 100 * (10.6 / 10.1 - 1)])
    assert "(+4.0..+5.0)" in out
    noisy = [row("none", 10.0, 25.0, 0.0, [9.0, 12.0]), row("offload", 10.3, 11.0, 3.0, [9.3, 12.3])]
    benchmark.report(noisy)
    out = capsys.readouterr().out
    assert "warning: this run is too noisy" in out
    assert "offload's overhead (+3.0%) is smaller than the drift of none's own round medians" in out
    assert "none: p90 step time is over twice the median" in out


def test_peer_modes_run_the_peers_own_classes_and_missing_ones_are_reported(tmp_path, capsys):
    pytest.importorskip("diffusers")
    js = tmp_path / "peers.json"
    rc = cli.main(["bench", "--layers", "1", "--width", "64", "--rounds", "1", "--steps", "3",
                   "--warmup", "0", "--modes",
                   "none,offload,diffusers,diffusers_offload,timm_v3,lightning_ema",
                   "--json", str(js)])
    assert rc == 0
    out = capsys.readouterr().out
    rows = {r["mode"]: r for r in json.loads(js.read_text())}
    for peer in ("diffusers", "diffusers_offload"):
        assert rows[peer]["applied"] == 3 and "overhead_pct" in rows[peer]
        assert f"offload vs {peer}: step overhead" in out
    assert "diffusers_offload: its moves to and from the device do nothing on a CPU-only run" in out
    import importlib.util
    if importlib.util.find_spec("timm") is None:
        assert "would replace the installed torch" in rows["timm_v3"]["unavailable"]
        assert "timm_v3: not installed" in out
    try:
        from lightning.pytorch.callbacks import EMAWeightAveraging  # noqa: F401
    except ImportError:
        assert "unavailable" in rows["lightning_ema"]
    else:
        assert rows["lightning_ema"]["applied"] == 3


def test_the_verdict_calls_a_difference_only_when_the_rounds_agree(capsys):
    """Paired rounds (the same drift on both modes): every round slower is a difference, stated
    with its direction in words; rounds that disagree are a tie, however large the median."""
    from offload_ema import benchmark

    slower = benchmark.compare([12.0, 12.2, 11.9, 12.5, 12.1, 12.3], [10.0] * 6)
    assert slower["decided"] and slower["agree"] == 6 and slower["p"] == pytest.approx(2 / 64)
    assert "offload's step is 1.21x slower (naive 1.21x faster; 6 of 6 rounds agree" in \
        benchmark.in_words("offload", "naive", slower)
    faster = benchmark.compare([8.0] * 7, [10.0] * 7)
    assert "offload's step is 1.25x faster (none 1.25x slower" in \
        benchmark.in_words("offload", "none", faster)
    mixed = benchmark.compare([13.0, 7.0, 14.0, 9.0, 12.5, 8.5], [10.0] * 6)
    assert not mixed["decided"]
    assert "a tie within this machine's noise" in benchmark.in_words("offload", "none", mixed)
    five = benchmark.compare([12.0] * 5, [10.0] * 5)  # five rounds cannot decide at 5%
    assert not five["decided"] and five["p"] == pytest.approx(2 / 32)


def test_auto_rounds_stop_once_the_verdict_is_settled():
    from offload_ema import benchmark
    steps = 2
    clear = {"none": [0.010] * 12, "offload": [0.010] * 12, "naive": [0.020] * 12}
    assert benchmark._settled(clear, steps, 1)  # a clear difference and an exact tie
    noisy = {"none": [0.010, 0.010, 0.030, 0.030, 0.010, 0.010] * 2,
             "offload": [0.030, 0.030, 0.010, 0.010, 0.010, 0.010] * 2}
    assert not benchmark._settled(noisy, steps, 1)
