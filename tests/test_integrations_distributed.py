"""The Lightning and Hugging Face callbacks under DDP (gloo, 2 processes on the CPU): averages are
sharded per rank, so checkpoints must hold every rank's share. Each test trains N steps with a
checkpoint at N/2, resumes from it in fresh processes, trains to N, and compares every rank's
gathered averages with the uninterrupted run's.

Bit for bit: a resumed run replays the same float32 computation (same weights, optimizer state,
data and gloo reductions), the averager state is restored by exact copies, and the averages are
folded in the same order, so nothing leaves room for even a rounding difference. The raw weights
are compared too, so a failure says whether training or the averages diverged."""
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "integrations_dist_worker.py")
HALF = 4


def launch(framework, phase, tmp_path, world=2, timeout=150):
    """Runs one phase on `world` ranks; kills every rank if one hangs. Returns per-rank results."""
    init = tmp_path / f"pg_init_{framework}_{phase}"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", OFFLOAD_EMA_NUM_THREADS="1",
               PYTHONWARNINGS="ignore", DS_ACCELERATOR="cpu")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # the worker sets its own
    procs = [subprocess.Popen([sys.executable, WORKER, framework, phase, str(r), str(world),
                               str(init), str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                              cwd=str(tmp_path))
             for r in range(world)]
    deadline = time.monotonic() + timeout
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(1, deadline - time.monotonic()))
            results.append((p.returncode, out, err))
    except subprocess.TimeoutExpired:
        pytest.fail(f"{framework} {phase}: a rank hung past {timeout}s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(30)
    for r, (code, out, err) in enumerate(results):
        assert code == 0 and out.strip().endswith(f"OK {r}"), \
            f"{framework} {phase}: rank {r} failed (exit {code}):\n" + "\n".join(
                f"--- rank {q} ---\n{e[-3000:]}" for q, (_, _, e) in enumerate(results))
    return [torch.load(tmp_path / f"{framework}-{phase}-rank{r}.pt", weights_only=False)
            for r in range(world)]


def assert_same(straight, resumed):
    for r, (a, b) in enumerate(zip(straight, resumed)):
        assert a["averager_world"] == 2  # sharded: each rank held its own share
        assert (b["step"], b["taken"]) == (a["step"], a["taken"]) == (2 * HALF, 2 * HALF)
        for k in a["raw"]:
            assert torch.equal(a["raw"][k], b["raw"][k]), f"rank {r}: training diverged at {k}"
        for name in ("ema", "lawa"):
            assert list(a[name]) == list(b[name])
            for k in a[name]:
                assert torch.equal(a[name][k], b[name][k]), \
                    f"rank {r}: {name} {k} differs by {(a[name][k] - b[name][k]).abs().max()}"
    # Gathered: every rank reports the same full averages.
    for name in ("ema", "lawa"):
        for k in straight[0][name]:
            assert torch.equal(straight[0][name][k], straight[1][name][k])


def _assert_ddp_shares(states):
    """DDP ranks' saved states (global names): each rank's own tensors, disjoint, together
    every parameter, one metadata at the saved step."""
    from offload_ema import resume
    metas = [resume.read_meta(s[resume.META_KEY]) for s in states]
    assert all(m == metas[0] for m in metas) and metas[0]["step"] == HALF
    shares = [{k for k in s if k.startswith("ema/")} for s in states]
    assert all(shares) and not set.intersection(*shares), shares


def _assert_saved_averages(result, states):
    """A run resumed at another world size (no further step) holds exactly the averages of the
    saved ranks' states, merged."""
    from offload_ema import resume
    saved = resume.averages_from_checkpoint(resume.merge_global(states), "")
    assert result["step"] == HALF
    for name in ("ema", "lawa"):
        _, values = saved[name]
        got = {k.removeprefix("module."): v for k, v in result[name].items()}
        assert sorted(got) == sorted(values), (name, sorted(got), sorted(values))
        for k, v in values.items():
            assert torch.equal(got[k], v), (name, k)


def test_lightning_ddp_checkpoint_holds_every_rank_and_resume_matches(tmp_path):
    pytest.importorskip("lightning.pytorch")
    straight = launch("lightning", "straight", tmp_path)
    ckpt = torch.load(tmp_path / "lightning_ckpts" / f"step={HALF}.ckpt", weights_only=False)
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("offload_ema.")]
    assert state["world"] == 2 and len(state["averager_ranks"]) == 2
    _assert_ddp_shares(state["averager_ranks"])
    resumed = launch("lightning", "resume", tmp_path)
    assert_same(straight, resumed)
    # One process resumes the two ranks' checkpoint: their shares merged, the saved averages.
    other = launch("lightning", "other_world", tmp_path, world=1)
    _assert_saved_averages(other[0], state["averager_ranks"])
    # keep_raw: the last validation (at the end, step 8) on the EMA, over both ranks' shares.
    from torch import nn
    net = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 1)).double()
    net.load_state_dict({k.removeprefix("net."): v.double() for k, v in straight[0]["ema"].items()})
    x = straight[0]["val_x"].double()
    with torch.no_grad():
        expect = nn.functional.mse_loss(net(x), x.sum(1, keepdim=True).sin()).item()
    for r in range(2):
        assert abs(straight[r]["val_loss_ema"] - expect) < 1e-5, (r, straight[r]["val_loss_ema"])
        assert straight[r]["val_loss"] != straight[r]["val_loss_ema"]


def test_transformers_ddp_each_rank_saves_and_resumes_its_own_file(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from offload_ema.integrations.transformers import STATE_FILE, rank_state_file

    straight = launch("transformers", "straight", tmp_path)
    folder = tmp_path / "hf" / f"checkpoint-{HALF}"
    names = sorted(p.name for p in folder.iterdir() if p.name.startswith("offload_ema"))
    assert names == [rank_state_file(0, 2), rank_state_file(1, 2)]
    assert STATE_FILE not in names
    _assert_ddp_shares([torch.load(folder / rank_state_file(r, 2), weights_only=True)
                        for r in range(2)])
    # The resume reads copies: one whole, one without rank 1's file.
    shutil.copytree(folder, tmp_path / "hf_resume" / folder.name)
    shutil.copytree(folder, tmp_path / "hf_missing" / folder.name)
    os.remove(tmp_path / "hf_missing" / folder.name / rank_state_file(1, 2))
    shutil.copytree(folder, tmp_path / "hf_other" / folder.name)
    resumed = launch("transformers", "resume", tmp_path)
    assert resumed[1]["missing_error"].startswith("FileNotFoundError")
    assert rank_state_file(1, 2) in resumed[1]["missing_error"]
    # Rank 0 had its file, yet fails too, saying why, instead of waiting for rank 1 forever.
    assert resumed[0]["missing_error"].startswith("RuntimeError")
    assert "failed on rank 1" in resumed[0]["missing_error"]
    assert_same(straight, resumed)
    # One process resumes the two ranks' checkpoint: both files merged, the saved averages.
    other = launch("transformers", "other_world", tmp_path, world=1)[0]
    _assert_saved_averages({"step": other["loaded_step"], **other["loaded"]},
                           [torch.load(folder / rank_state_file(r, 2), weights_only=True)
                            for r in range(2)])


def test_transformers_ddp_best_model_at_end_is_the_best_checkpoints_average(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    res = launch("transformers_best", "straight", tmp_path)  # each rank checks its model
    assert res[0]["best"] == res[1]["best"]
    for k in res[0]["raw"]:
        assert torch.equal(res[0]["raw"][k], res[1]["raw"][k])


def test_transformers_deepspeed_zero3_trains_evaluates_saves_and_resumes(tmp_path):
    """The Trainer with a DeepSpeed ZeRO-3 config on two CPU ranks: the averages of the
    partitions equal a float64 reference of the parameters DeepSpeed gathers after each step;
    evaluation on the average reports the reference average's loss over every rank's share of
    the data; each rank saves and resumes its own file, and the resumed run ends bit for bit
    where the uninterrupted one did."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    pytest.importorskip("deepspeed")
    from helpers import Reg
    from offload_ema.integrations.transformers import rank_state_file

    straight = launch("transformers_zero3", "straight", tmp_path)
    folder = tmp_path / "hfz" / f"checkpoint-{HALF}"
    names = sorted(p.name for p in folder.iterdir() if p.name.startswith("offload_ema"))
    assert names == [rank_state_file(0, 2), rank_state_file(1, 2)]
    for r, res in enumerate(straight):
        for name in ("ema", "lawa"):
            ref = res["refs"][name]
            assert {k: tuple(v.shape) for k, v in res[name].items()} == {
                k: tuple(v.shape) for k, v in ref.items()}  # full tensors, not placeholders
            for k, v in ref.items():
                torch.testing.assert_close(res[name][k].double(), v, rtol=1e-5, atol=1e-7)
        model = Reg().double()
        model.load_state_dict(res["ref_model"])
        with torch.no_grad():
            expect = torch.nn.functional.mse_loss(model.net(res["eval_x"].double()),
                                                  res["eval_y"].double()).item()
        assert abs(res["eval_ema_loss"] - expect) < 1e-5, (r, res["eval_ema_loss"], expect)
        assert res["eval_ema_loss"] != res["eval_loss"]
    shutil.copytree(folder, tmp_path / "hfz_resume" / folder.name)
    resumed = launch("transformers_zero3", "resume", tmp_path)
    for r, (a, b) in enumerate(zip(straight, resumed)):
        assert (b["step"], b["taken"]) == (a["step"], a["taken"]) == (2 * HALF, 2 * HALF)
        for k in a["raw"]:
            assert torch.equal(a["raw"][k], b["raw"][k]), f"rank {r}: training diverged at {k}"
        for name in ("ema", "lawa"):
            for k in a[name]:
                assert torch.equal(a[name][k], b[name][k]), f"rank {r}: {name} {k}"
