"""DeepSpeed ZeRO with real DeepSpeed on two CPU ranks (gloo, the CPU accelerator): each rank
averages its own partitions (ZeRO-3) or its share of whole tensors (ZeRO-1/2), against a float64
reference built from the parameters DeepSpeed gathers after every optimizer step."""
import json
import os

import pytest

from test_distributed import launch

deepspeed = pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra (make deps)")


def _run(scenario, tmp_path, timeout=240):
    results = launch(scenario, tmp_path, timeout=timeout, worker="ds_worker.py")
    for r, (code, out, err) in enumerate(results):
        assert code == 0, f"rank {r} failed:\n{err[-4000:]}"
        assert f"OK {r}" in out
    return results


def test_zero3_averages_partitions_not_placeholders(tmp_path):
    """Above and below the persistence threshold, a padded last partition, gradient
    accumulation: averages, gathers (all ranks and one), swapped evaluation and exact restore,
    per-rank files with an index, resume per rank."""
    _run("zero3", tmp_path)
    sizes = [json.load(open(tmp_path / f"rank{r}.json"))["bytes"] for r in range(2)]
    assert all(0 < b for b in sizes)  # every rank averages its own half
    files = sorted(os.listdir(tmp_path))
    assert "ema.safetensors.index.json" in files
    assert "ema-00001-of-00002.safetensors" in files and "ema-00002-of-00002.safetensors" in files


@pytest.mark.parametrize("stage", [1, 2])
def test_zero1_and_zero2_work_like_ddp(tmp_path, stage):
    _run(f"zero{stage}", tmp_path)


def test_load_checkpoint_waits_for_the_snapshot_in_flight(tmp_path):
    _run("reload", tmp_path)


def test_unsupported_zero3_setups_fail_at_construction(tmp_path):
    _run("refusals", tmp_path)
