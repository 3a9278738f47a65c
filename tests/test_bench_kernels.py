"""bench/kernels.py (the kernels beside torch and beside plain C + OpenMP) and
bench/host_staging.py, end to end in small forms."""
import json
import os
import shutil

import pytest

from offload_ema import ops
from helpers import load_bench_script

needs_cc = pytest.mark.skipif(not (os.environ.get("CC") or shutil.which("cc") or
                                   shutil.which("gcc")), reason="no C compiler")
needs_cpp = pytest.mark.skipif(ops.backend() != "cpp", reason="the C++ extension is not built")


def _load(name, monkeypatch):
    had = os.environ.get("OMP_WAIT_POLICY")
    mod = load_bench_script(name)
    if had is None:  # (set for its own process; torch is loaded already in this one)
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    return mod


@needs_cc
@needs_cpp
def test_the_yardstick_runs_beside_the_kernels_with_ratios_and_a_verdict(tmp_path, capsys,
                                                                        monkeypatch):
    ks = _load("kernels", monkeypatch)
    out_json = tmp_path / "k.json"
    assert ks.main(["--numel", "70001", "--threads", "1,2", "--repeats", "2", "--rounds", "2",
                    "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "yardstick: " in out and "none" not in out.split("yardstick: ")[1].splitlines()[0]
    rows = json.loads(out_json.read_text())
    compared = [r for r in rows if "yardstick_ratio" in r]
    # ema_update_, ema_update_multi_, ema_fold_, ema_fold_multi_, mean_: at each thread count.
    assert len(compared) == 5 * 2
    for r in compared:
        assert r["yardstick_seconds"] > 0
        assert r["yardstick_ratio"] == pytest.approx(r["yardstick_seconds"] / r["seconds"])
    lines = [line for line in out.splitlines() if "yardstick / ours by threads" in line]
    assert len(lines) == 5 and all(" 1:" in line and " 2:" in line for line in lines)
    assert "verdict: " in out


def test_without_a_compiler_the_kernels_are_still_measured(tmp_path, capsys, monkeypatch):
    ks = _load("kernels", monkeypatch)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    binary, why = ks.build_yardstick()
    assert binary is None and "no-such-compiler could not be run" in why
    assert ks.main(["--numel", "4099", "--threads", "1", "--repeats", "1", "--rounds", "1",
                    "--no-yardstick"]) == 0
    out = capsys.readouterr().out
    assert "yardstick: none (--no-yardstick)" in out and "verdict" not in out


@needs_cpp
def test_the_host_staging_benchmark_compares_the_native_copy_with_foreach(capsys):
    hs = load_bench_script("host_staging")
    assert hs.main(["--preset", "tiny", "--snapshots", "3", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "native host_copy_plan" in out and "torch _foreach_copy_" in out and "speed-up" in out
