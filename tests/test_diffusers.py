"""offload_ema.integrations.diffusers.EMAModel against diffusers' own EMAModel: the same numbers
on the same training run (both decay rules), and the EMA lines of diffusers' training scripts
run unchanged with one import swapped."""
import pytest
import torch
from torch import nn

diffusers = pytest.importorskip("diffusers")  # CI installs it (Makefile deps)
from diffusers.training_utils import EMAModel as DiffusersEMA  # noqa: E402

from offload_ema.integrations.diffusers import EMAModel  # noqa: E402


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 3))


CASES = {
    "default_rule": dict(decay=0.999),
    "default_rule_after_5": dict(decay=0.95, update_after_step=5, min_decay=0.3),
    "warmup": dict(decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4),
    "warmup_gamma_4": dict(decay=0.99, use_ema_warmup=True, inv_gamma=4.0, power=2 / 3,
                           min_decay=0.1),
}


def _train_both(model, opt, theirs, ours, steps, seed):
    """``steps`` SGD steps, each followed by diffusers' EMA step and ours."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        model(torch.randn(8, 6, generator=g)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        theirs.step(model.parameters())
        ours.step(model.parameters())


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_numbers_as_diffusers_on_the_same_run(case):
    kw = CASES[case]
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    theirs = DiffusersEMA(model.parameters(), **kw)
    ours = EMAModel(model.parameters(), **kw)
    g = torch.Generator().manual_seed(1)
    for step in range(1, 61):
        loss = model(torch.randn(8, 6, generator=g)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        theirs.step(model.parameters())
        ours.step(model.parameters())
        assert ours.optimization_step == theirs.optimization_step == step
        assert ours.cur_decay_value == pytest.approx(theirs.cur_decay_value, abs=1e-15)
        if step in (3, 6, 30, 60):
            for a, b in zip(ours.state_dict()["shadow_params"], theirs.shadow_params):
                torch.testing.assert_close(a, b.float(), rtol=1e-5, atol=1e-6)
    assert ours.get_decay(1000) == pytest.approx(theirs.get_decay(1000), abs=1e-15)
    ours.close()


def _unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"))


def _script(EMA, out, separate=False):
    """The EMA lines of diffusers' examples/unconditional_image_generation/train_unconditional.py
    (and train_text_to_image.py's checkpoint hooks), around a tiny denoising loop. ``separate``:
    as train_text_to_image.py, the EMAModel is built on a copy of the model (``ema_unet``) and
    stepped with the training model's parameters."""
    model = _unet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    source = _unet() if separate else model
    ema_model = EMA(source.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0,
                    power=3 / 4, model_cls=diffusers.UNet2DModel, model_config=model.config)
    ema_model.to("cpu")
    g = torch.Generator().manual_seed(2)
    record = {}
    for step in range(1, 51):
        clean = torch.randn(2, 1, 8, 8, generator=g)
        noise = torch.randn(2, 1, 8, 8, generator=g)
        t = torch.randint(0, 100, (2,), generator=g)
        loss = (model(clean + noise * t.view(-1, 1, 1, 1) / 100, t).sample - noise).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        ema_model.step(model.parameters())
        if step == 25:
            # Checkpoint hooks: save_pretrained, then from_pretrained + load_state_dict (resume).
            ema_model.save_pretrained(str(out / "unet_ema"))
            load_model = EMA.from_pretrained(str(out / "unet_ema"), diffusers.UNet2DModel)
            ema_model.load_state_dict(load_model.state_dict())
            ema_model.to("cpu")
            del load_model
        if step == 40:  # validation on the EMA weights, then the training weights come back
            before = [p.detach().clone() for p in model.parameters()]
            ema_model.store(model.parameters())
            ema_model.copy_to(model.parameters())
            record["ema_at_40"] = [p.detach().clone() for p in model.parameters()]
            ema_model.restore(model.parameters())
            assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    record["raw"] = [p.detach().clone() for p in model.parameters()]
    ema_model.copy_to(model.parameters())  # the end of the script: the pipeline gets the EMA
    record["final"] = [p.detach().clone() for p in model.parameters()]
    record["decay"] = ema_model.cur_decay_value
    if hasattr(ema_model, "close"):
        ema_model.close()
    return record


@pytest.mark.parametrize("separate", [False, True])
def test_diffusers_training_script_lines_with_one_import_swapped(tmp_path, separate):
    (tmp_path / "theirs").mkdir()
    (tmp_path / "ours").mkdir()
    theirs = _script(DiffusersEMA, tmp_path / "theirs", separate)
    ours = _script(EMAModel, tmp_path / "ours", separate)
    assert ours["decay"] == pytest.approx(theirs["decay"], abs=1e-15)
    for a, b in zip(ours["raw"], theirs["raw"]):
        assert torch.equal(a, b)  # training itself is untouched
    for key in ("ema_at_40", "final"):
        for a, b in zip(ours[key], theirs[key]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # What save_pretrained wrote loads as the model class, with the EMA settings in its config.
    loaded = diffusers.UNet2DModel.from_pretrained(str(tmp_path / "ours" / "unet_ema"))
    assert loaded.config["optimization_step"] == 25 and loaded.config["power"] == 0.75


def test_bad_arguments_are_named():
    model = _mlp()
    with pytest.raises(ValueError, match="decay must be in"):
        EMAModel(model.parameters(), decay=1.5)
    with pytest.raises(ValueError, match="inv_gamma must be a number > 0"):
        EMAModel(model.parameters(), use_ema_warmup=True, inv_gamma=0)
    with pytest.raises(ValueError, match="update_after_step"):
        EMAModel(model.parameters(), update_after_step=-1)
    with pytest.raises(TypeError, match="unexpected arguments: bogus"):
        EMAModel(model.parameters(), bogus=1)
    with pytest.raises(ValueError, match="`save_pretrained` can only be used if `model_cls`"):
        EMAModel(model.parameters()).save_pretrained("x")


def test_attached_to_the_optimizer_the_numbers_stay_the_same():
    """attach(opt): step() no longer fences; the optimizer's next step does. Same numbers."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    theirs = DiffusersEMA(model.parameters(), decay=0.9)
    ours = EMAModel(model.parameters(), decay=0.9).attach(opt)
    _train_both(model, opt, theirs, ours, 40, seed=3)
    for a, b in zip(ours.state_dict()["shadow_params"], theirs.shadow_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    ours.close()


def test_a_loaded_state_is_what_copy_to_and_state_dict_give_before_the_next_step():
    """Resume, then validate or checkpoint before the next step: the loaded EMA, not the
    construction-time weights; a settings-only load keeps the average so far."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    theirs = DiffusersEMA(model.parameters(), decay=0.9)
    ours = EMAModel(model.parameters(), decay=0.9)
    _train_both(model, opt, theirs, ours, 10, seed=4)
    state = ours.state_dict()
    fresh = EMAModel(_mlp().parameters(), decay=0.9)  # other weights at construction
    fresh.load_state_dict(state)
    target = [torch.zeros_like(p) for p in model.parameters()]
    fresh.copy_to(target)
    for a, b in zip(target, theirs.shadow_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert "offload_ema" in fresh.state_dict()
    ours.load_state_dict({"decay": 0.95})  # settings only: the average so far is kept
    for a, b in zip(ours.state_dict()["shadow_params"], theirs.shadow_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert ours.decay == 0.95
    ours.close()
