"""The overhead benchmark end to end on a very small model: records, table, plot, CLI errors."""
import json
import os
import subprocess
import sys

import pytest

from offload_ema import cli
from offload_ema.gpt import GPT, PRESETS

KEYS = {"mode", "preset", "device", "params", "dtype", "step_ms_median", "step_ms_p90",
        "overhead_pct", "gpu_mem_delta_bytes", "rss_delta_bytes", "pinned_bytes", "applied",
        "skipped", "coalesced"}


def test_presets_have_the_sizes_they_claim():
    cfg = PRESETS["tiny"]
    assert sum(p.numel() for p in GPT(cfg).parameters()) == cfg.params
    assert 0.95e9 <= PRESETS["1b"].params <= 1.1e9


def test_bench_writes_records_table_and_plot(tmp_path, capsys):
    js, png = tmp_path / "o.json", tmp_path / "o.png"
    rc = cli.main(["bench", "--layers", "1", "--width", "64", "--rounds", "2", "--steps", "2",
                   "--warmup", "1", "--json", str(js), "--plot", str(png)])
    assert rc == 0
    rows = json.loads(js.read_text())
    assert [r["mode"] for r in rows] == ["none", "naive", "swa_utils", "offload", "offload_multi"]
    for r in rows:
        assert KEYS <= set(r), KEYS - set(r)
        assert r["step_ms_median"] > 0 and r["step_ms_p90"] >= r["step_ms_median"]
        assert len(r["round_medians_ms"]) == 2
    by = {r["mode"]: r for r in rows}
    assert by["none"]["overhead_pct"] == 0
    # 2 rounds x (1 warm-up + 2 timed) steps, every snapshot applied under on_busy="block".
    assert by["offload"]["applied"] == by["offload_multi"]["applied"] == 6
    assert by["offload"]["skipped"] == by["offload"]["coalesced"] == 0
    assert by["naive"]["applied"] == 6 and by["swa_utils"]["applied"] == 6
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "naive / none step time" in out and "offload: overhead" in out


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
                   "--save-dir", str(tmp_path), "--json", str(js)])
    assert rc == 0
    off = {r["mode"]: r for r in json.loads(js.read_text())}["offload"]
    assert off["saves"] == 2 and off["save_gbps"] > 0 and off["disk_write_gbps"] > 0
    import offload_ema as oe
    tensors, meta = oe.load_snapshot(tmp_path / "offload.safetensors")
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
