"""Averages written as from_pretrained-loadable model directories (transformers, diffusers),
against float64 references of the training snapshots."""
import os

import pytest
import torch
from torch import nn

import offload_ema as oe
from helpers import RefEMA


def _train(model, steps, batch, loss_fn, specs):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref = RefEMA(specs["ema"].beta)
    avg = oe.Averager(model, specs).attach(opt)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        loss = loss_fn(model, batch(g))
        opt.zero_grad()
        loss.backward()
        opt.step()
        ref.update({k: v.detach().double().clone() for k, v in model.state_dict().items()
                    if v.is_floating_point()})
    return avg, ref


def test_transformers_model_round_trips_with_tied_weights(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied

    def loss_fn(m, ids):
        return m(input_ids=ids, labels=ids).loss
    avg, ref = _train(model, 6, lambda g: torch.randint(0, 50, (2, 8), generator=g), loss_fn,
                      {"ema": oe.EMA(0.7)})
    with avg:
        out = avg.save_pretrained(tmp_path / "ema_model", "ema").result(timeout=120)
    loaded = transformers.GPT2LMHeadModel.from_pretrained(out)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # still tied
    sd = loaded.state_dict()
    for k, v in ref.avg.items():
        if k in sd:
            torch.testing.assert_close(sd[k].double(), v, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, k=k: f"{k}: {m}")
    assert loaded.config.n_embd == 16


def test_diffusers_model_round_trips(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1,
                                  layers_per_block=1, block_out_channels=(8, 16),
                                  down_block_types=("DownBlock2D", "DownBlock2D"),
                                  up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)

    def loss_fn(m, x):
        return (m(x, 3).sample - x).pow(2).mean()
    avg, ref = _train(model, 4, lambda g: torch.randn(2, 1, 8, 8, generator=g), loss_fn,
                      {"ema": oe.EMA(0.6)})
    with avg:
        out = avg.save_pretrained(tmp_path / "unet_ema", "ema").result(timeout=120)
        again = avg.save_pretrained(tmp_path / "unet_ema", "ema").result(timeout=120)
    assert again == out  # an existing directory is replaced once the new one is whole
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left
    loaded = diffusers.UNet2DModel.from_pretrained(out)
    sd = loaded.state_dict()
    assert set(sd) == set(model.state_dict())
    for k, v in ref.avg.items():
        torch.testing.assert_close(sd[k].double(), v, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, k=k: f"{k}: {m}")


def test_a_plain_module_is_pointed_to_save(tmp_path):
    model = nn.Linear(3, 2)
    with oe.Averager(model, {"ema": oe.EMA(0.9)}) as avg:
        avg.step()
        with pytest.raises(TypeError, match=r"save_pretrained needs a model .*avg.save\(path"):
            avg.save_pretrained(tmp_path / "x", "ema")
        with pytest.raises(ValueError, match="no average named"):
            avg.save_pretrained(tmp_path / "x", "nope")


def test_a_quantized_model_is_refused(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)
    model = transformers.GPT2LMHeadModel(cfg)
    model.hf_quantizer = object()  # as transformers marks a quantized model
    with oe.Averager(model, {"ema": oe.EMA(0.9)}) as avg:
        avg.step()
        with pytest.raises(TypeError, match="quantized model"):
            avg.save_pretrained(tmp_path / "q", "ema")


def test_temporaries_of_killed_writers_are_removed(tmp_path):
    """A directory left by a writer killed mid-write (its process gone) is removed by the next
    save_pretrained of that name; one of a live process is left alone."""
    import subprocess
    import sys
    diffusers = pytest.importorskip("diffusers")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".unet_ema.tmp-{dead}-1"
    stale.mkdir()
    (stale / "half-written.safetensors").write_bytes(b"x")
    live = tmp_path / f".unet_ema.tmp-{os.getppid()}-1"  # our parent: alive
    live.mkdir()
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1,
                                  layers_per_block=1, block_out_channels=(8, 16),
                                  down_block_types=("DownBlock2D", "DownBlock2D"),
                                  up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    with oe.Averager(model, {"ema": oe.EMA(0.9)}) as avg:
        avg.step()
        avg.save_pretrained(tmp_path / "unet_ema", "ema").result(timeout=120)
    assert not stale.exists() and live.exists()
    assert (tmp_path / "unet_ema" / "config.json").is_file()
