"""Resume at any world size and parallelism: an Averager saved with torch.distributed.checkpoint
(gloo, 1 to 4 processes on the CPU) loads into a fresh one elsewhere, holds the saved averages
exactly and goes on as one uninterrupted run (a float64 reference)."""
import safetensors.torch
import torch

from offload_ema import cli
from test_distributed import launch


def _ok(results, what):
    for r, (code, out, err) in enumerate(results):
        assert code == 0, f"{what}: rank {r} failed:\n{err[-4000:]}"
        assert out.strip().endswith(f"OK {r}"), (what, out)


def _run(what, tmp_path, world):
    # Each launch its own rendezvous file (they are not reusable).
    init = tmp_path / f"pg_{what.replace(':', '_')}_{world}"
    _ok(launch(what, tmp_path, world=world, worker="resume_worker.py", timeout=180, init=init),
        what)


def _consolidated_equal_saved(tmp_path, source):
    """`offload-ema consolidate` of the training checkpoint, in this one process: each average
    as one file, equal to the averages the saving run read."""
    out = tmp_path / f"{source}-out"
    assert cli.main(["consolidate", str(tmp_path / source), str(out)]) == 0
    saved = torch.load(tmp_path / f"{source}.pt")["averages"]
    assert sorted(p.name for p in out.iterdir()) == [f"{n}.safetensors" for n in sorted(saved)]
    for name, values in saved.items():
        got = safetensors.torch.load_file(out / f"{name}.safetensors")
        assert sorted(got) == sorted(values)
        for k, v in values.items():
            assert torch.equal(got[k], v), (source, name, k)


def test_ddp_at_two_loads_at_one_three_and_four_and_under_fsdp2(tmp_path, capsys):
    _run("save:ddp", tmp_path, 2)
    _consolidated_equal_saved(tmp_path, "ddp-2")
    assert cli.main(["consolidate", str(tmp_path / "ddp-2"), str(tmp_path / "x"),
                     "--key", "model"]) == 1
    assert "holds Averager states under ['averager'], not 'model'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    for world in (1, 3, 4):
        _run("load:ddp:ddp-2", tmp_path, world)
    _run("load:fsdp2:ddp-2", tmp_path, 2)


def test_fsdp2_at_two_loads_under_ddp_at_two_and_fsdp2_at_four(tmp_path):
    _run("save:fsdp2", tmp_path, 2)
    _consolidated_equal_saved(tmp_path, "fsdp2-2")
    _run("load:ddp:fsdp2-2", tmp_path, 2)
    _run("load:fsdp2:fsdp2-2", tmp_path, 4)
    _run("load:local:fsdp2-2", tmp_path, 1)
    _run("load:fsdp2tp:fsdp2-2", tmp_path, 4)  # 2-D: FSDP2 x tensor parallel (gloo, CPU)


def test_one_process_loads_under_ddp_and_fsdp2_at_two(tmp_path):
    _run("save:local", tmp_path, 1)
    _run("load:ddp:local-1", tmp_path, 2)
    _run("load:fsdp2:local-1", tmp_path, 2)


def test_fsdp2_with_tensor_parallel_at_four_loads_under_ddp_at_two(tmp_path):
    _run("save:fsdp2tp", tmp_path, 4)
    _consolidated_equal_saved(tmp_path, "fsdp2tp-4")
    _run("load:ddp:fsdp2tp-4", tmp_path, 2)


def test_a_checkpoint_of_another_model_or_averages_or_without_the_entry_is_refused(tmp_path):
    _run("save:ddp", tmp_path, 2)
    _run("bad:ddp:ddp-2", tmp_path, 2)
