"""Sharded averaging over torch.distributed (gloo, 2 processes on the CPU), against a single-
process float64 reference; a failing rank must not leave the other hanging."""
import os
import subprocess
import sys
import time

import pytest
import torch

import safetensors.torch

import offload_ema as oe
from offload_ema import cli
from helpers import TinyNet

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def launch(scenario, tmp_path, world=2, timeout=120, worker="dist_worker.py", init=None):
    init = init or tmp_path / "pg_init"  # (a rendezvous file serves one launch)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", OFFLOAD_EMA_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, worker), scenario,
                               str(r), str(world), str(init), str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for r in range(world)]
    deadline = time.monotonic() + timeout
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"scenario {scenario!r}: a rank hung past {timeout}s")
        results.append((p.returncode, out, err))
    return results


def test_ddp_shares_averages_swapped_and_snapshot_match_single_process(tmp_path):
    results = launch("ddp", tmp_path)
    for r, (code, out, err) in enumerate(results):
        assert code == 0, f"rank {r} failed:\n{err[-3000:]}"
        assert out.strip() == f"OK {r}"
    # The snapshot written by both ranks (one file each + index) loads in one process.
    assert sorted(p.name for p in tmp_path.glob("ema*")) == [
        "ema-00001-of-00002.safetensors", "ema-00002-of-00002.safetensors",
        "ema.safetensors.index.json"]
    tensors, meta = oe.load_snapshot(tmp_path / "ema.safetensors.index.json")
    assert meta["world"] == 2 and meta["name"] == "ema" and meta["step"] == 12
    ref = torch.load(tmp_path / "ref.pt")
    model = TinyNet(width=24)
    assert list(tensors) == list(model.state_dict())
    for k, v in ref.items():
        torch.testing.assert_close(tensors[k], v, rtol=1e-5, atol=1e-7)
    out = tmp_path / "one.safetensors"
    assert cli.main(["consolidate", str(tmp_path / "ema.safetensors"), str(out)]) == 0
    one = safetensors.torch.load_file(out)
    assert set(one) == set(tensors) and all(torch.equal(one[k], tensors[k]) for k in one)
    # apply_snapshot takes the index (or the name it was saved under) into a plain model.
    oe.apply_snapshot(model, tmp_path / "ema.safetensors")
    for k, v in ref.items():
        torch.testing.assert_close(dict(model.named_parameters())[k].detach(), v, rtol=1e-5, atol=1e-7)


def test_posthoc_ema_reads_sharded_power_ema_snapshots(tmp_path):
    from offload_ema.posthoc import solve_weights

    results = launch("ddp", tmp_path)
    for r, (code, out, err) in enumerate(results):
        assert code == 0, f"rank {r} failed:\n{err[-3000:]}"
    paths = [tmp_path / f"power-{s}.safetensors" for s in (6, 12)]  # resolved to their indexes
    got, info = oe.posthoc_ema(paths, 0.2, return_info=True)
    parts = [oe.load_snapshot(p) for p in paths]
    assert [m["world"] for _, m in parts] == [2, 2]
    gamma = parts[0][1]["average"]["gamma"]
    x, _ = solve_weights([6, 12], [gamma, gamma], 12, info["gamma"])
    for k, v in parts[1][0].items():
        if v.is_floating_point() and not k.startswith("bn.running"):
            expect = (x[0] * parts[0][0][k].double() + x[1] * parts[1][0][k].double()).float()
            torch.testing.assert_close(got[k], expect, msg=k)


def test_a_failing_rank_does_not_leave_the_other_hanging(tmp_path):
    t0 = time.monotonic()
    results = launch("fail", tmp_path, timeout=90)
    assert results[1][0] != 0 and "rank 1 fails" in results[1][2]
    assert results[0][0] != 0, "rank 0 should fail once its peer is gone"
    assert time.monotonic() - t0 < 90


def test_fsdp2_local_shards_gathered_swapped_and_saved_match_single_process(tmp_path):
    results = launch("fsdp2", tmp_path)
    for r, (code, out, err) in enumerate(results):
        assert code == 0, f"rank {r} failed:\n" + "\n".join(
            f"--- rank {q} ---\n{e[-2500:]}" for q, (_, _, e) in enumerate(results))
        assert out.strip() == f"OK {r}"
    ref = torch.load(tmp_path / "fsdp_ref.pt")
    # Each rank wrote its row blocks; the index puts them together in one process ...
    tensors, meta = oe.load_snapshot(tmp_path / "fsdp_ema.safetensors")
    assert meta["world"] == 2 and meta["step"] == 8
    assert set(tensors) == set(ref)
    for k, v in ref.items():
        torch.testing.assert_close(tensors[k], v, rtol=1e-5, atol=1e-7)
    # ... and consolidate writes them as one plain safetensors file.
    out = tmp_path / "one.safetensors"
    assert cli.main(["consolidate", str(tmp_path / "fsdp_ema.safetensors.index.json"), str(out)]) == 0
    one = safetensors.torch.load_file(out)
    for k, v in ref.items():
        torch.testing.assert_close(one[k], v, rtol=1e-5, atol=1e-7)
    _, meta1 = oe.load_snapshot(out)
    assert meta1["consolidated_from_world"] == "2" and meta1["name"] == "ema"
    # The torch.distributed.checkpoint export: consolidated into one safetensors file.
    dcp_dir = tmp_path / "fsdp_ema.dcp"
    assert (dcp_dir / ".metadata").is_file()
    assert not list(tmp_path.glob(".fsdp_ema.dcp.tmp-*"))  # no temporary directory left
    out2 = tmp_path / "from_dcp.safetensors"
    assert cli.main(["consolidate", str(dcp_dir), str(out2)]) == 0
    t2, meta2 = oe.load_snapshot(out2)
    assert meta2["step"] == 8 and meta2["name"] == "ema"
    for k, v in ref.items():
        torch.testing.assert_close(t2[k], v, rtol=1e-5, atol=1e-7)


def _check_ranks(results):
    for r, (code, out, err) in enumerate(results):
        assert code == 0, f"rank {r} failed:\n" + "\n".join(
            f"--- rank {q} ---\n{e[-2500:]}" for q, (_, _, e) in enumerate(results))
        assert out.strip() == f"OK {r}"


def test_fsdp2_swapped_reshards_root_owned_parameters_and_dcp_uses_its_own_gloo_group(tmp_path):
    _check_ranks(launch("fsdp2_root", tmp_path))


def test_ddp_rank_that_owns_no_tensor_works(tmp_path):
    _check_ranks(launch("tiny", tmp_path))
    tensors, meta = oe.load_snapshot(tmp_path / "tiny.safetensors")
    assert list(tensors) == ["weight"] and meta["world"] == 2


def test_ddp_on_the_simulated_copy_engine_over_several_seeds(tmp_path):
    _check_ranks(launch("ddp_lazy", tmp_path))


def test_diffusers_drop_in_keeps_the_whole_ema_on_every_rank(tmp_path):
    pytest.importorskip("diffusers")
    _check_ranks(launch("diffusers_main_only", tmp_path, timeout=90))


def test_fsdp2_gather_to_one_rank_materialises_full_tensors_there_only(tmp_path):
    results = launch("fsdp2_gather", tmp_path)
    for r, (code, out, err) in enumerate(results):
        assert code == 0, f"rank {r} failed:\n{err[-3000:]}"
        assert out.strip() == f"OK {r}"


def test_fsdp2_averagers_on_data_parallel_subgroups_export_without_waiting_for_others(tmp_path):
    results = launch("fsdp2_subgroups", tmp_path, world=4)
    for r, (code, out, err) in enumerate(results):
        assert code == 0, f"rank {r} failed:\n{err[-3000:]}"
        assert out.strip() == f"OK {r}"
    for g in (0, 1):
        tensors, meta = oe.load_snapshot(tmp_path / f"group{g}.dcp")
        assert meta["step"] == 3 and set(tensors) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def _gpt2_small_shapes():
    """GPT-2 small's parameter shapes (124M parameters; the token embedding is 31% of them)."""
    shapes = [(50257, 768), (1024, 768)]
    for _ in range(12):
        shapes += [(768,), (768,), (768, 2304), (2304,), (768, 768), (768,), (768,), (768,),
                   (768, 3072), (3072,), (3072, 768), (768,)]
    return shapes + [(768,), (768,)]


@pytest.mark.parametrize("world", [2, 4, 8])
def test_ddp_shares_are_balanced_for_a_gpt2_small_shaped_model(world):
    """Whole tensors to owner ranks, largest first to the least loaded: the most loaded rank
    holds no more than the larger of the mean and the largest tensor (no assignment of whole
    tensors can do better), within 1%."""
    from offload_ema.layout import Entry, shard_owners
    entries = [Entry(f"t{i}", [], None, torch.Size(s), torch.float32, 0, 0)
               for i, s in enumerate(_gpt2_small_shapes())]
    owner = shard_owners(entries, world)
    load = [0] * world
    for e in entries:
        load[owner[e.name]] += e.numel * 4
    mean, largest = sum(load) / world, max(e.numel * 4 for e in entries)
    assert max(load) <= 1.01 * max(mean, largest), (load, mean, largest)
    if largest <= mean:  # world 2: every rank about half
        assert max(load) / mean < 1.01 and min(load) / mean > 0.99, load
    else:  # the embedding alone on one rank; the rest spread evenly over the others
        rest = sorted(load)[:-1]
        assert max(rest) / min(rest) < 1.05, load
    print(f"world {world}: max / mean bytes per rank {max(load) / mean:.4f}, "
          f"max / bound {max(load) / max(mean, largest):.6f}")
