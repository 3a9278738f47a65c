"""offload_ema.integrations.diffusers.EMAModel against diffusers' own EMAModel: the same numbers
on the same training run (both decay rules), and the EMA lines of diffusers' training scripts
run unchanged with one import swapped."""
import copy
import re

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


# ---- shadow_params (issue: the drop-in had none) -------------------------------------------------
def _assert_same_average(ours, theirs, rtol=1e-6, atol=1e-7):
    """``ours`` (an EMAModel's shadow_params) against diffusers' shadow values, element-wise."""
    theirs = list(theirs)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.device.type == "cpu" and a.dtype == torch.float32 and a.shape == b.shape
        torch.testing.assert_close(a, b.float(), rtol=rtol, atol=atol)


def test_shadow_params_read_and_assign_as_diffusers():
    """Reading ``shadow_params`` gives the average now (parameter order, pending updates waited
    for); assigning a list sets the average, before and after update_after_step, as diffusers'
    assignment does; the moving idiom ``ema.shadow_params = [p.to(d) for p in
    ema.shadow_params]`` changes nothing; writing into a read copy leaves the average alone."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kw = dict(decay=0.9, update_after_step=3)
    theirs = DiffusersEMA(model.parameters(), **kw)
    ours = EMAModel(model.parameters(), **kw)
    _assert_same_average(ours.shadow_params, theirs.shadow_params)  # before any step
    _train_both(model, opt, theirs, ours, 2, seed=5)
    _assert_same_average(ours.shadow_params, theirs.shadow_params)
    g = torch.Generator().manual_seed(6)
    # Set before the EMA starts: what reads give until the next step, as diffusers'.
    values = [torch.randn(p.shape, generator=g) for p in model.parameters()]
    theirs.shadow_params = [v.clone() for v in values]
    ours.shadow_params = [v.clone() for v in values]
    _assert_same_average(ours.shadow_params, theirs.shadow_params)
    _train_both(model, opt, theirs, ours, 6, seed=7)
    _assert_same_average(ours.shadow_params, theirs.shadow_params)
    # Set while the EMA runs: the average continues from these values.
    values = [torch.randn(p.shape, generator=g) for p in model.parameters()]
    theirs.shadow_params = [v.clone() for v in values]
    ours.shadow_params = [v.clone() for v in values]
    _assert_same_average(ours.shadow_params, theirs.shadow_params)
    _train_both(model, opt, theirs, ours, 5, seed=8)
    _assert_same_average(ours.shadow_params, theirs.shadow_params)
    ours.shadow_params = [p.to("cpu") for p in ours.shadow_params]  # "moving" it
    ours.shadow_params[0].zero_()  # a copy: documented, the average is not changed
    _train_both(model, opt, theirs, ours, 3, seed=9)
    _assert_same_average(ours.shadow_params, theirs.shadow_params)
    assert ours.state_dict()["shadow_params"][0].shape == theirs.shadow_params[0].shape
    with pytest.raises(ValueError, match="shadow_params must be a list"):
        ours.shadow_params = tuple(ours.shadow_params)
    with pytest.raises(ValueError, match="4 parameters"):
        ours.shadow_params = ours.shadow_params[:2]
    with pytest.raises(ValueError, match="shape"):
        ours.shadow_params = [t.t() for t in ours.shadow_params]
    ours.close()


# ---- resume before update_after_step (issue: the step count restarted at 0) ----------------------
@pytest.mark.parametrize("resume_at", [3, 7, 8, 9, 12])
@pytest.mark.parametrize("source", ["diffusers_state", "own_state"])
def test_resume_keeps_optimization_step_as_diffusers(resume_at, source):
    """Train, save the state at ``resume_at`` (before, at and after update_after_step=8), load it
    into fresh EMAModels (ours from diffusers' state_dict or from its own), train on: the same
    averages as diffusers' EMAModel resumed the same way, element-wise."""
    kw = dict(decay=0.95, update_after_step=8, min_decay=0.2)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    theirs = DiffusersEMA(model.parameters(), **kw)
    ours = EMAModel(model.parameters(), **kw)
    _train_both(model, opt, theirs, ours, resume_at, seed=10)
    state = copy.deepcopy(theirs.state_dict() if source == "diffusers_state" else
                          ours.state_dict())
    their_state = copy.deepcopy(theirs.state_dict())
    ours.close()
    theirs = DiffusersEMA(_mlp().parameters(), **kw)  # other weights at construction
    theirs.load_state_dict(their_state)
    ours = EMAModel(_mlp().parameters(), **kw)
    ours.load_state_dict(state)
    assert ours.optimization_step == theirs.optimization_step == resume_at
    _assert_same_average(ours.shadow_params, theirs.shadow_params)
    g = torch.Generator().manual_seed(11)
    for _ in range(20 - resume_at):
        model(torch.randn(8, 6, generator=g)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        theirs.step(model.parameters())
        ours.step(model.parameters())
        assert ours.optimization_step == theirs.optimization_step
        assert ours.cur_decay_value == pytest.approx(theirs.cur_decay_value, abs=1e-15)
        _assert_same_average(ours.shadow_params, theirs.shadow_params)
    ours.close()


@pytest.mark.parametrize("resume_at", [4, 12])
def test_from_pretrained_continues_as_diffusers(tmp_path, resume_at):
    """save_pretrained at ``resume_at`` (before / after update_after_step=6), from_pretrained, train
    on with the loaded EMAModel: the same average as diffusers' from_pretrained run."""
    kw = dict(decay=0.9, update_after_step=6)
    model = _unet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    emas = {}
    for name, cls in (("theirs", DiffusersEMA), ("ours", EMAModel)):
        emas[name] = cls(model.parameters(), model_cls=diffusers.UNet2DModel,
                         model_config=model.config, **kw)
    g = torch.Generator().manual_seed(12)

    def train(steps):
        for _ in range(steps):
            x = torch.randn(2, 1, 8, 8, generator=g)
            model(x, torch.tensor([3, 7])).sample.pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            for ema in emas.values():
                ema.step(model.parameters())
    train(resume_at)
    for name, cls in (("theirs", DiffusersEMA), ("ours", EMAModel)):
        emas[name].save_pretrained(str(tmp_path / name))
        if name == "ours":
            emas[name].close()
        emas[name] = cls.from_pretrained(str(tmp_path / name), diffusers.UNet2DModel)
    assert emas["ours"].optimization_step == resume_at
    train(14 - resume_at)
    _assert_same_average(emas["ours"].shadow_params, emas["theirs"].shadow_params, rtol=1e-5,
                         atol=1e-6)
    emas["ours"].close()


# ---- requires_grad changed after the first step --------------------------------------------------
def test_frozen_parameter_copied_as_diffusers_and_unfreezing_refused():
    """A parameter frozen from the start is reported with its value, as diffusers' copy of it;
    unfreezing it (which diffusers would average from then on) is refused with a clear error at
    the next step or read; freezing a trained one is refused too."""
    model = _mlp()
    model[2].bias.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    theirs = DiffusersEMA(model.parameters(), decay=0.9)
    ours = EMAModel(model.parameters(), decay=0.9)
    _train_both(model, opt, theirs, ours, 5, seed=13)
    _assert_same_average(ours.shadow_params, theirs.shadow_params)
    model[2].bias.requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"parameter 3 .*unfrozen.*after the EMAModel"):
        ours.shadow_params
    with pytest.raises(RuntimeError, match=r"parameter 3 .*unfrozen"):
        ours.step(model.parameters())
    with pytest.raises(RuntimeError, match=r"parameter 3 .*unfrozen"):
        ours.copy_to([torch.zeros_like(p) for p in model.parameters()])
    ours.close()

    model = _mlp()
    ours = EMAModel(model.parameters(), decay=0.9)
    ours.step(model.parameters())
    model[0].weight.requires_grad_(False)
    with pytest.raises(RuntimeError, match=r"parameter 0 .*frozen.*after the EMAModel"):
        for _ in range(3):  # the worker or the step's own check: at the latest the next step
            ours.step(model.parameters())
    ours.close()


def test_unfreezing_is_found_by_steps_alone_within_a_bounded_number_of_steps():
    """The step's check costs O(1): it looks at a few parameters per step, in turn; an unfrozen
    parameter is found within len(parameters) / (parameters per step) steps."""
    from offload_ema.integrations import diffusers as integ
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(20)])  # 40 tensors
    for p in model.parameters():
        p.requires_grad_(False)
    model[0].weight.requires_grad_(True)
    ours = EMAModel(model.parameters(), decay=0.9)
    ours.step(model.parameters())
    model[19].bias.requires_grad_(True)
    bound = -(-40 // integ._CHECKS_PER_STEP)
    with pytest.raises(RuntimeError, match=r"parameter 39 .*unfrozen"):
        for _ in range(bound):
            ours.step(model.parameters())
    ours.close()


# ---- step() with other parameters ----------------------------------------------------------------
def test_step_with_other_parameters_is_refused():
    """diffusers averages whatever list a step gets into its shadow values, position by position;
    the drop-in averages the first step's parameters, so another model's or list's parameters
    are refused with a clear error instead of being ignored."""
    model, other = _mlp(), _mlp()
    ours = EMAModel(model.parameters(), decay=0.9)
    ours.step(model.parameters())
    for bad in (other.parameters(), other, list(other.parameters()),
                list(model.parameters())[:-1], (p for p in other.parameters()),
                list(model.parameters())[:-1] + [other[2].bias]):
        with pytest.raises(ValueError, match="other parameters than its first step"):
            ours.step(bad)
    assert ours.optimization_step == 1  # refused steps are not counted
    ours.close()


def test_step_check_is_o1_for_the_forms_scripts_use():
    """``model.parameters()`` is identified by its module without being iterated (the check
    costs the same whatever the tensor count); lists by length and three elements; a module seen
    once is not compared again."""
    import inspect
    model = _mlp()
    theirs = DiffusersEMA(model.parameters(), decay=0.9)
    ours = EMAModel(model.parameters(), decay=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    params = list(model.parameters())
    calls = []
    orig = model.named_parameters

    def counting(*a, **k):
        calls.append(1)
        return orig(*a, **k)
    g = torch.Generator().manual_seed(14)
    forms = [lambda: model.parameters(), lambda: params, lambda: list(model.parameters()),
             lambda: (p for p in model.parameters())]
    for i in range(12):
        model(torch.randn(8, 6, generator=g)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        theirs.step(model.parameters())
        arg = forms[i % len(forms)]()
        if i >= 4 and i % len(forms) == 0:
            model.named_parameters = counting
            ours.step(arg)
            assert inspect.getgeneratorstate(arg) == inspect.GEN_CREATED  # not iterated
            del model.named_parameters
        else:
            ours.step(arg)
    assert not calls
    _assert_same_average(ours.shadow_params, theirs.shadow_params)
    ours.close()


# ---- nn.Module arguments (diffusers' deprecated form) --------------------------------------------
def test_module_arguments_as_diffusers():
    """``EMAModel(model)`` (warm-up on, as diffusers) and ``step(model)``: accepted with diffusers'
    FutureWarning, the same numbers; so are the deprecated max_value / min_value."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(FutureWarning, match="Passing a `torch.nn.Module`"):
        theirs = DiffusersEMA(model, power=3 / 4)
    with pytest.warns(FutureWarning, match="Passing a `torch.nn.Module`"):
        ours = EMAModel(model, power=3 / 4)
    assert ours.use_ema_warmup is True
    g = torch.Generator().manual_seed(15)
    for _ in range(10):
        model(torch.randn(8, 6, generator=g)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        with pytest.warns(FutureWarning, match="ExponentialMovingAverage.step"):
            theirs.step(model)
        with pytest.warns(FutureWarning, match="ExponentialMovingAverage.step"):
            ours.step(model)
    _assert_same_average(ours.shadow_params, theirs.shadow_params)
    assert ours.cur_decay_value == pytest.approx(theirs.cur_decay_value, abs=1e-15)
    ours.close()
    with pytest.warns(FutureWarning, match="max_value"):
        theirs = DiffusersEMA(model.parameters(), max_value=0.0, min_value=0.0)
    with pytest.warns(FutureWarning, match="max_value"):
        ours = EMAModel(model.parameters(), max_value=0.0, min_value=0.0)
    assert (ours.decay, ours.min_decay) == (theirs.decay, theirs.min_decay) == (0.0, 0.0)
    ours.close()


def test_to_another_dtype_is_refused():
    """diffusers' ``to(dtype=torch.float16)`` keeps its EMA in float16 from then on; the drop-in
    keeps float32 in host memory, so that is refused rather than silently different."""
    ours = EMAModel(_mlp().parameters())
    ours.to("cpu")
    ours.to(dtype=torch.float32)
    with pytest.raises(ValueError, match="float16"):
        ours.to(dtype=torch.float16)


# ---- no code from files -------------------------------------------------------------------------
class _Planted:
    """A pickle that runs code when loaded without weights_only: it creates ``path``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def _bin_dir(path):
    """An EMA directory written by save_pretrained, its weights as a torch.save pickle instead
    of safetensors (as ``save_pretrained(safe_serialization=False)`` writes them)."""
    from safetensors.torch import load_file
    model = _unet()
    ema = EMAModel(model.parameters(), decay=0.9, model_cls=diffusers.UNet2DModel,
                   model_config=model.config)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        ema.step(model.parameters())
    ema.save_pretrained(str(path))
    ema.close()
    (weights,) = path.glob("*.safetensors")
    torch.save(load_file(weights), path / "diffusion_pytorch_model.bin")
    weights.unlink()
    return path / "diffusion_pytorch_model.bin"


def test_from_pretrained_of_pickled_weights_as_diffusers(tmp_path):
    """Weights in a pickle of tensors load (read with weights_only=True), as diffusers' do."""
    _bin_dir(tmp_path)
    theirs = DiffusersEMA.from_pretrained(str(tmp_path), diffusers.UNet2DModel)
    ours = EMAModel.from_pretrained(str(tmp_path), diffusers.UNet2DModel)
    assert ours.optimization_step == theirs.optimization_step == 3
    _assert_same_average(ours.shadow_params, theirs.shadow_params, rtol=0, atol=0)


def test_from_pretrained_never_runs_code_from_a_pickle(tmp_path):
    """A directory whose weights file is a pickle that would run code: refused with a ValueError
    naming the file, and nothing in it ran."""
    weights = _bin_dir(tmp_path / "ema")
    marker = tmp_path / "ran"
    torch.save({"conv_in.weight": _Planted(str(marker))}, weights)
    with pytest.raises(ValueError, match=re.escape(f"{weights}: not loadable as model weights") +
                       ".*refused, nothing in it ran"):
        EMAModel.from_pretrained(str(tmp_path / "ema"), diffusers.UNet2DModel)
    assert not marker.exists()


def test_freezing_found_by_the_worker_is_reported_in_emamodel_terms():
    """A parameter frozen late in the order: the worker's check (every snapshot) finds it before
    the step's turn comes; the step reports it as the EMAModel's parameter, with the cause."""
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(20)])  # 40 tensors
    ours = EMAModel(model.parameters(), decay=0.9)
    ours.step(model.parameters())
    model[19].bias.requires_grad_(False)
    with pytest.raises(RuntimeError, match=r"parameter 39 .*frozen") as info:
        for _ in range(3):
            ours.step(model.parameters())
    assert info.value.__cause__ is not None
    ours.close()


def test_changing_requires_grad_the_documented_way_continues_as_diffusers():
    """The error's advice: state_dict() before unfreezing, loaded into a new EMAModel built
    after; the run goes on as diffusers' EMAModel (which needs nothing of the sort)."""
    model = _mlp()
    model[0].bias.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    kw = dict(decay=0.9, update_after_step=2)
    theirs = DiffusersEMA(model.parameters(), **kw)
    ours = EMAModel(model.parameters(), **kw)
    _train_both(model, opt, theirs, ours, 6, seed=16)
    state = ours.state_dict()
    ours.close()
    model[0].bias.requires_grad_(True)
    opt.add_param_group({"params": [model[0].bias]})
    ours = EMAModel(model.parameters(), **kw)
    ours.load_state_dict(state)
    _train_both(model, opt, theirs, ours, 6, seed=17)
    _assert_same_average(ours.shadow_params, theirs.shadow_params)
    ours.close()


def test_a_state_of_another_model_without_shadow_values_is_refused():
    """An ``offload_ema`` state that does not fit the parameters, with no shadow values to fall
    back on: the first step raises, and the EMAModel is left as it was."""
    a = EMAModel(_mlp().parameters(), decay=0.9)
    a.step(_mlp().parameters())
    state = {k: v for k, v in a.state_dict().items() if k != "shadow_params"}
    a.close()
    other = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 4))
    b = EMAModel(other.parameters(), decay=0.9)
    b.load_state_dict(state)
    with pytest.raises(ValueError, match="different model"):
        b.step(other.parameters())
    assert b.averager is None and b.optimization_step == 1


@pytest.mark.parametrize("how", ["attribute", "load_state_dict_assign"])
def test_parameter_replaced_in_the_model_is_refused(how):
    """diffusers' step averages whatever tensors ``model.parameters()`` yields now; the drop-in
    averages the first step's tensors, so a parameter replaced in the model is refused (at the
    next read, and by the steps within len(parameters) / checks per step)."""
    from offload_ema.integrations import diffusers as integ
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(10)])  # 20 tensors
    ours = EMAModel(model.parameters(), decay=0.9)
    ours.step(model.parameters())
    if how == "attribute":
        model[7].weight = nn.Parameter(model[7].weight.detach().clone())
        match = r"parameter 14 \('7.weight'\) .*replaced"
    else:
        model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
        match = r"parameter \d+ .*replaced"
    with pytest.raises(RuntimeError, match=match):
        ours.shadow_params
    with pytest.raises(RuntimeError, match=match):
        for _ in range(-(-20 // integ._CHECKS_PER_STEP)):
            ours.step(model.parameters())
    ours.close()


@pytest.mark.parametrize("change", [dict(update_after_step=20), dict(optimization_step=3),
                                    dict(decay=0.5, min_decay=0.2), dict(use_ema_warmup=True)])
@pytest.mark.parametrize("update_after_step", [0, 20])
def test_settings_loaded_mid_run_as_diffusers(change, update_after_step):
    """``load_state_dict`` of settings alone at step 10 (the EMA started or not): the values read
    right after and the averages of the steps after, as diffusers' EMAModel's."""
    kw = dict(decay=0.9, update_after_step=update_after_step)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    theirs = DiffusersEMA(model.parameters(), **kw)
    ours = EMAModel(model.parameters(), **kw)
    _train_both(model, opt, theirs, ours, 10, seed=18)
    theirs.load_state_dict(dict(change))
    ours.load_state_dict(dict(change))
    _assert_same_average(ours.shadow_params, theirs.shadow_params)
    for i in range(15):
        _train_both(model, opt, theirs, ours, 1, seed=19 + i)
        assert ours.cur_decay_value == pytest.approx(theirs.cur_decay_value, abs=1e-15)
        _assert_same_average(ours.shadow_params, theirs.shadow_params)
    ours.close()
