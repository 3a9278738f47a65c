"""The Hugging Face Trainer callback on a tiny local model: averages vs a float64 reference at
the real optimizer steps, evaluation with the average swapped in, exact checkpoint resume."""
import os
import re

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")  # CI installs it (Makefile deps)
pytest.importorskip("accelerate")

import offload_ema as oe  # noqa: E402
from offload_ema.testing import lazy_device  # noqa: E402
from offload_ema.integrations.transformers import (  # noqa: E402
    STATE_FILE, AveragerCallback, rank_state_file)
from helpers import RefDecay, RefEMA, RefLAWA, Reg, RegData, assert_matches  # noqa: E402


Data = RegData


class Recorder(transformers.TrainerCallback):
    def __init__(self):
        self.ema, self.lawa = RefEMA(0.8), RefLAWA(3)

    def on_step_end(self, args, state, control, model=None, **kw):
        snap = {f"net.{k}": v.detach().double().clone() for k, v in model.net.named_parameters()}
        self.ema.update(snap)
        if state.global_step % 2 == 0:
            self.lawa.update(snap)


def specs():
    return {"ema": oe.EMA(0.8), "lawa": oe.LAWA(3, every=2)}


def make_trainer(tmp_path, callbacks, max_steps, **kw):
    kw = dict(dict(save_strategy="no"), **kw)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, learning_rate=0.05, lr_scheduler_type="constant",
        report_to=[], use_cpu=True, logging_strategy="no",
        dataloader_num_workers=0, seed=0, data_seed=0, disable_tqdm=True, **kw)
    return transformers.Trainer(model=Reg(), args=args, train_dataset=Data(40, 1),
                                eval_dataset=Data(8, 2), callbacks=callbacks)


def test_averages_follow_real_optimizer_steps_and_evaluation(tmp_path):
    cb, rec = AveragerCallback(specs(), evaluate_with="ema"), Recorder()
    t = make_trainer(tmp_path, [cb, rec], 12)
    t.train()
    st = cb.averager.stats()
    assert st["step"] == 12 and st["snapshots_taken"] == 12  # 24 batches, accumulation 2
    assert_matches(cb.averager.averaged_state_dict("ema"), rec.ema.avg, rtol=1e-6, atol=1e-7)
    assert_matches(cb.averager.averaged_state_dict("lawa"), rec.lawa.avg, rtol=1e-6, atol=1e-7)
    metrics = t.evaluate()
    # The reported EMA loss is the loss of a model holding the EMA weights.
    ref = Reg()
    ref.load_state_dict({k: v.float() for k, v in rec.ema.avg.items()})
    data = Data(8, 2)
    with torch.no_grad():
        expect = ref(data.x, data.y)["loss"].item()
    assert abs(metrics["eval_ema_loss"] - expect) < 1e-5
    assert metrics["eval_loss"] != metrics["eval_ema_loss"]
    cb.averager.close()


def test_checkpoint_resume_continues_exactly(tmp_path):
    straight, rec = AveragerCallback(specs()), Recorder()
    make_trainer(tmp_path / "a", [straight, rec], 10).train()

    first = AveragerCallback(specs())
    t1 = make_trainer(tmp_path / "b", [first], 10, save_strategy="steps", save_steps=5)
    t1.train()
    assert (tmp_path / "b" / "checkpoint-5" / STATE_FILE).is_file()
    first.averager.close()
    resumed = AveragerCallback(specs())
    t2 = make_trainer(tmp_path / "b", [resumed], 10, save_strategy="steps", save_steps=5)
    t2.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-5"))
    assert resumed.averager.step_count == 10
    for name in specs():
        a = straight.averager.averaged_state_dict(name)
        b = resumed.averager.averaged_state_dict(name)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
    straight.averager.close()
    resumed.averager.close()


def test_resume_at_another_number_of_processes_says_so(tmp_path):
    # FSDP2 / ZeRO-3 runs leave one file per rank of the rank's own flat state (the 2-process
    # round trips are tests/test_integrations_distributed.py); one process cannot take them over.
    # (DDP's files hold global names: they merge at any world size, ibid.)
    first = AveragerCallback(specs())
    make_trainer(tmp_path, [first], 6, save_strategy="steps", save_steps=3).train()
    rank_state = first.averager._rank_state_dict()
    first.averager.close()
    ckpt = tmp_path / "checkpoint-3"
    for r in range(2):
        torch.save(rank_state, ckpt / rank_state_file(r, 2))
    os.remove(ckpt / STATE_FILE)
    resumed = AveragerCallback(specs())
    t = make_trainer(tmp_path, [resumed], 6, save_strategy="steps", save_steps=3)
    with pytest.raises(FileNotFoundError, match=f"{STATE_FILE} is missing.*holds "
                       f"{rank_state_file(0, 2)}, {rank_state_file(1, 2)}, written by a different "
                       "number of processes than this run's 1"):
        t.train(resume_from_checkpoint=str(ckpt))
    resumed.averager.close()


def test_decay_schedules_through_the_trainer(tmp_path):
    """EMA warm-up, PowerEMA and SWA through the Trainer, at the real optimizer steps."""
    specs_ = {"warm": oe.EMA(0.9, warmup_gamma=1.0), "power": oe.PowerEMA(0.1), "swa": oe.SWA()}
    refs = {"warm": RefDecay(lambda k: 0.0 if k == 1 else min(0.9, 1 - k ** (-2 / 3))),
            "power": RefDecay(lambda k: 0.0 if k == 1 else (1 - 1 / k) ** (
                specs_["power"].gamma + 1)),
            "swa": RefDecay(lambda k: (k - 1) / k)}

    class Rec(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            snap = {f"net.{k}": v.detach().double().clone() for k, v in model.net.named_parameters()}
            for r in refs.values():
                r.update(snap)
    cb = AveragerCallback(specs_, evaluate_with="power")
    t = make_trainer(tmp_path, [cb, Rec()], 10)
    t.train()
    for n in specs_:
        assert_matches(cb.averager.averaged_state_dict(n), refs[n].avg, rtol=1e-6, atol=1e-7)
    assert "eval_power_loss" in t.evaluate()
    cb.averager.close()


class _Ids(torch.utils.data.Dataset):
    def __init__(self, n):
        g = torch.Generator().manual_seed(3)
        self.ids = torch.randint(0, 50, (n, 8), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_checkpoints_hold_a_from_pretrained_directory_of_the_average(tmp_path):
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    ref = RefEMA(0.8)

    class Rec(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            ref.update({k: v.detach().double().clone() for k, v in model.state_dict().items()})

    cb = AveragerCallback({"ema": oe.EMA(0.8)}, save_pretrained="ema")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, learning_rate=0.01,
        report_to=[], use_cpu=True, logging_strategy="no", save_strategy="steps", save_steps=4,
        dataloader_num_workers=0, seed=0, disable_tqdm=True)
    transformers.Trainer(model=model, args=args, train_dataset=_Ids(16),
                         callbacks=[cb, Rec()]).train()
    cb.averager.close()
    folder = tmp_path / "checkpoint-4" / "offload_ema-ema"
    loaded = transformers.GPT2LMHeadModel.from_pretrained(folder)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    sd = loaded.state_dict()
    for k, v in ref.avg.items():
        if k in sd and sd[k].is_floating_point():
            torch.testing.assert_close(sd[k].double(), v, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, k=k: f"{k}: {m}")
    with pytest.raises(ValueError, match="save_pretrained must name one of the averages"):
        AveragerCallback({"ema": oe.EMA(0.8)}, save_pretrained="nope")


def test_trainer_loop_logs_every_metric_of_the_average_and_picks_the_best_by_it(tmp_path):
    """AveragerTrainer: the average is evaluated through the Trainer's own loop, so its loss and
    every compute_metrics value reach log_history under eval_ema_*, and eval_ema_loss can pick
    the best checkpoint; load_best_model_at_end then leaves that checkpoint's average in the
    model (the weights that scored best), not its raw weights."""
    from offload_ema.integrations.transformers import AveragerTrainer

    def compute_metrics(pred):
        return {"mae": float(abs(pred.predictions - pred.label_ids).mean())}

    cb, rec = AveragerCallback(specs(), evaluate_with="ema"), Recorder()
    refs_at = {}

    class Keep(transformers.TrainerCallback):  # the reference EMA at every evaluation
        def on_evaluate(self, args, state, control, **kw):
            refs_at[state.global_step] = {k: v.clone() for k, v in rec.ema.avg.items()}

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=2,
        learning_rate=0.2, lr_scheduler_type="constant", report_to=[], use_cpu=True,
        logging_strategy="no", eval_strategy="steps", eval_steps=3, save_strategy="steps",
        save_steps=3, metric_for_best_model="ema_loss", greater_is_better=False,
        load_best_model_at_end=True,
        dataloader_num_workers=0, seed=0, data_seed=0, disable_tqdm=True)
    t = AveragerTrainer(model=Reg(), args=args, train_dataset=Data(40, 1),
                        eval_dataset=Data(8, 2), compute_metrics=compute_metrics,
                        callbacks=[cb, rec, Keep()])
    t.train()
    logged = [h for h in t.state.log_history if "eval_ema_loss" in h]
    assert [h["step"] for h in logged] == [3, 6, 9, 12]
    data = Data(8, 2)
    for h in logged:
        assert "eval_ema_mae" in h and "eval_ema_runtime" in h
        ref = Reg()
        ref.load_state_dict({k: v.float() for k, v in refs_at[h["step"]].items()})
        with torch.no_grad():
            out = ref(data.x, data.y)
        assert abs(h["eval_ema_loss"] - out["loss"].item()) < 1e-5
        assert abs(h["eval_ema_mae"] - (out["logits"] - data.y).abs().mean().item()) < 1e-5
    raw = [h for h in t.state.log_history if "eval_loss" in h]
    assert len(raw) == 4 and all("eval_mae" in h for h in raw)  # the raw weights' too
    best = min(logged, key=lambda h: h["eval_ema_loss"])
    # (This run's raw weights would pick another checkpoint: the choice was the average's.)
    assert best["step"] != min(raw, key=lambda h: h["eval_loss"])["step"]
    assert t.state.best_model_checkpoint.endswith(f"checkpoint-{best['step']}")
    assert t.state.best_metric == pytest.approx(best["eval_ema_loss"])
    # The model holds the best checkpoint's EMA (float64 reference), not its raw weights.
    from safetensors.torch import load_file
    raw_best = load_file(os.path.join(t.state.best_model_checkpoint, "model.safetensors"))
    for k, v in t.model.state_dict().items():
        torch.testing.assert_close(v.double(), refs_at[best["step"]][k], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(v, raw_best[k]), k
    cb.averager.close()


def test_the_best_checkpoints_average_is_loaded_only_when_its_metric_picked_it():
    from types import SimpleNamespace as NS
    cb = AveragerCallback({"ema": oe.EMA(0.9), "ema_slow": oe.EMA(0.99)}, evaluate_with="ema_slow")

    def pick(metric, load=True, best="out/checkpoint-6", callback=cb):
        return callback._best_average(
            NS(metric_for_best_model=metric, load_best_model_at_end=load),
            NS(best_model_checkpoint=best))
    assert pick("ema_slow_loss") and pick("eval_ema_slow_mae")
    assert pick("eval_val_ema_slow_loss")  # a dict of evaluation sets: eval_<set>_<name>_*
    assert not pick("ema_loss") and not pick("eval_ema_loss")  # a prefix of the name: not it
    assert not pick("loss") and not pick("eval_loss") and not pick(None)
    assert not pick("ema_slow_loss", load=False) and not pick("ema_slow_loss", best=None)
    assert not pick("ema_slow_loss", callback=AveragerCallback({"ema_slow": oe.EMA(0.99)}))


@pytest.mark.parametrize("why", ["sharded", "missing"])
def test_the_raw_best_weights_stay_with_a_warning_where_the_average_cannot_be_loaded(tmp_path,
                                                                                    why):
    """ZeRO-3 (FSDP) parameters, or a best checkpoint without the averager state (tmp_path
    holds none): the Trainer's raw weights stay, and a warning says why."""
    model = Reg()
    cb = AveragerCallback({"ema": oe.EMA(0.9)}, evaluate_with="ema")
    cb.averager = oe.Averager(model, cb.averages)
    try:
        if why == "sharded":
            p = next(model.parameters())
            p.ds_tensor, p.ds_status = p.detach().clone(), "AVAILABLE"  # as a ZeRO-3 parameter
        match = {"sharded": "sharded .FSDP / DeepSpeed ZeRO-3.*kept",
                 "missing": "averager state saved with it is missing.*kept"}[why]
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.warns(UserWarning, match=match):
            cb._load_best_average(str(tmp_path), model, "ema")
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k])
    finally:
        cb.averager.close()


def test_the_last_snapshot_is_copied_before_the_trainer_loads_the_best_checkpoint(tmp_path):
    """load_best_model_at_end writes the best checkpoint into the parameters in place after the
    loop. Here nothing reads the average after the last step (no evaluation of it, and with
    save_strategy="best" and the highest loss counted best, the first checkpoint stays best, so
    the last step saves nothing): the callback fences at the epoch's end, so the last snapshot
    is that step's weights (deferred copies on the simulated copy engine)."""
    cb, rec = AveragerCallback(specs()), Recorder()
    with lazy_device(seed=3, max_delay=0.05):
        t = make_trainer(tmp_path, [cb, rec], 12, eval_strategy="steps", eval_steps=3,
                         save_strategy="best", load_best_model_at_end=True,
                         metric_for_best_model="loss", greater_is_better=True)
        t.train()
        final = {n: cb.averager.averaged_state_dict(n) for n in specs()}
        cb.averager.close()
    assert t.state.best_model_checkpoint is not None
    assert_matches(final["ema"], rec.ema.avg, rtol=1e-5, atol=1e-6)
    assert_matches(final["lawa"], rec.lawa.avg, rtol=1e-5, atol=1e-6)


def test_a_plain_trainer_picks_and_loads_the_best_checkpoints_average(tmp_path):
    """With a plain Trainer the callback adds eval_ema_loss to the evaluation's metrics before
    the Trainer compares checkpoints: metric_for_best_model="ema_loss" works there too."""
    cb, rec, refs_at = AveragerCallback(specs(), evaluate_with="ema"), Recorder(), {}

    class Keep(transformers.TrainerCallback):  # after the AveragerCallback: metrics are in
        def on_evaluate(self, args, state, control, metrics=None, **kw):
            refs_at[state.global_step] = ({k: v.clone() for k, v in rec.ema.avg.items()},
                                          metrics["eval_ema_loss"])

    t = make_trainer(tmp_path, [cb, rec, Keep()], 12, eval_strategy="steps", eval_steps=3,
                     save_strategy="steps", save_steps=3, load_best_model_at_end=True,
                     metric_for_best_model="ema_loss", greater_is_better=False)
    t.train()
    best = min(refs_at, key=lambda s: refs_at[s][1])
    assert t.state.best_model_checkpoint.endswith(f"checkpoint-{best}")
    for k, v in t.model.state_dict().items():
        torch.testing.assert_close(v.double(), refs_at[best][0][k], rtol=1e-5, atol=1e-6)
    cb.averager.close()


class _Texts(torch.utils.data.Dataset):
    """Token sequences of uneven lengths (2 to 11), padded per batch by ``_pad``."""

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.items = [torch.randint(1, 50, (int(torch.randint(2, 12, (1,), generator=g)),),
                                    generator=g) for _ in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {"input_ids": self.items[i]}


def _pad(items):
    """Right padding; padded labels are -100 (ignored), so batches hold unequal token counts."""
    width = max(len(x["input_ids"]) for x in items)
    ids = torch.zeros(len(items), width, dtype=torch.long)
    labels = torch.full((len(items), width), -100)
    mask = torch.zeros(len(items), width, dtype=torch.long)
    for i, x in enumerate(items):
        n = len(x["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = x["input_ids"], x["input_ids"], 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _gpt2():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16))


class _SummedLoss(transformers.Trainer):
    """A compute_loss of its own: summed token losses per sequence (not the model's mean)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        out = model(**inputs)
        loss = nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1),
                                           labels[:, 1:].flatten(), ignore_index=-100,
                                           reduction="sum") / len(labels)
        return (loss, out) if return_outputs else loss


@pytest.mark.parametrize("trainer_cls,smoothing", [(transformers.Trainer, 0.0),
                                                   (transformers.Trainer, 0.1),
                                                   (_SummedLoss, 0.0)],
                         ids=["plain", "label_smoothing", "own_compute_loss"])
def test_eval_average_loss_is_the_trainers_eval_loss_of_a_model_holding_the_average(
        tmp_path, trainer_cls, smoothing):
    """eval_ema_loss is what the Trainer's own evaluate() reports as eval_loss for a model that
    holds the average: its loss convention (GPT-2: the token count it divides by, batches of
    uneven padding, a last batch of 1 of 3, label smoothing) or a subclass's compute_loss."""
    cb, seen = AveragerCallback({"ema": oe.EMA(0.8)}, evaluate_with="ema"), []

    class Keep(transformers.TrainerCallback):  # after the AveragerCallback: metrics are in
        def on_evaluate(self, args, state, control, metrics=None, **kw):
            seen.append((cb.averager.averaged_state_dict("ema"), dict(metrics)))

    def args(out):
        return transformers.TrainingArguments(
            output_dir=str(out), max_steps=6, per_device_train_batch_size=4,
            per_device_eval_batch_size=3, learning_rate=0.05, lr_scheduler_type="constant",
            label_smoothing_factor=smoothing, report_to=[], use_cpu=True, logging_strategy="no",
            eval_strategy="steps", eval_steps=3, save_strategy="no", dataloader_num_workers=0,
            seed=0, data_seed=0, disable_tqdm=True)

    t = trainer_cls(model=_gpt2(), args=args(tmp_path / "run"), train_dataset=_Texts(40, 1),
                    eval_dataset=_Texts(10, 2), data_collator=_pad, callbacks=[cb, Keep()])
    t.train()
    t.evaluate()  # outside training too
    cb.averager.close()
    assert len(seen) == 3
    for averaged, metrics in seen:
        # The callback adds this one metric, under this name.
        assert {k for k in metrics if "ema" in k} == {"eval_ema_loss"}
        model = _gpt2()
        model.load_state_dict(averaged)
        ref = trainer_cls(model=model, args=args(tmp_path / "ref"), eval_dataset=_Texts(10, 2),
                          data_collator=_pad).evaluate()
        assert metrics["eval_ema_loss"] == pytest.approx(ref["eval_loss"], rel=1e-6, abs=1e-7)
        assert metrics["eval_ema_loss"] != pytest.approx(metrics["eval_loss"], rel=1e-3)


def test_eval_average_loss_outside_a_trainer_says_why_it_is_missing():
    """on_evaluate called by something other than a Trainer holding the callback: the loss is
    the Trainer's loop's, so without one it is not reported, and a warning says so."""
    model = Reg()
    cb = AveragerCallback({"ema": oe.EMA(0.9)}, evaluate_with="ema")
    cb.averager = oe.Averager(model, cb.averages)
    try:
        cb.averager.step()
        cb.averager.flush()
        metrics = {"eval_loss": 1.0}
        loader = torch.utils.data.DataLoader(Data(4, 2), batch_size=2)
        with pytest.warns(UserWarning, match="eval_ema_loss is not reported.*not called by a "
                                             "transformers.Trainer"):
            cb.on_evaluate(None, None, None, metrics=metrics, model=model, eval_dataloader=loader)
        assert metrics == {"eval_loss": 1.0}
    finally:
        cb.averager.close()


class _Planted:
    """A pickle that runs code when loaded without weights_only: it creates ``path``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import pathlib
        return pathlib.Path.touch, (pathlib.Path(self.path),)


def _plant(state_file, marker):
    """Replaces an averager state file by a state-shaped dict holding the planted pickle."""
    torch.save({"format": 1, "averages": _Planted(marker)}, state_file)


def test_the_saved_averager_state_loads_without_running_code(tmp_path):
    """What the callback writes is tensors, numbers, strings, lists and dicts: it loads with
    torch.load(weights_only=True), and resuming from it continues (the resume tests above)."""
    cb = AveragerCallback(specs())
    make_trainer(tmp_path, [cb], 4, save_strategy="steps", save_steps=4).train()
    cb.averager.close()
    state = torch.load(tmp_path / "checkpoint-4" / STATE_FILE, weights_only=True)
    meta = oe.resume.read_meta(state[oe.resume.META_KEY])  # (global names: any world size)
    assert meta["step"] == 4 and set(meta["averages"]) == set(specs())


def test_resuming_from_a_planted_averager_state_refuses_it_without_running_it(tmp_path):
    first = AveragerCallback(specs())
    make_trainer(tmp_path, [first], 6, save_strategy="steps", save_steps=3).train()
    first.averager.close()
    ckpt, marker = tmp_path / "checkpoint-3", tmp_path / "ran"
    _plant(ckpt / STATE_FILE, marker)
    resumed = AveragerCallback(specs())
    t = make_trainer(tmp_path, [resumed], 6, save_strategy="steps", save_steps=3)
    try:
        with pytest.raises(ValueError, match=re.escape(f"{ckpt / STATE_FILE}: not an offload_ema "
                                                       "Averager state file") + ".*refused, "
                                             "nothing in it ran"):
            t.train(resume_from_checkpoint=str(ckpt))
    finally:
        resumed.averager.close()
    assert not marker.exists()


def test_the_best_checkpoints_planted_averager_state_is_refused_without_running_it(tmp_path):
    """load_best_model_at_end by the average's metric reads the best checkpoint's averager state
    after the loop: a planted file there is refused, naming it, and nothing in it runs."""
    cb, marker, planted = AveragerCallback(specs(), evaluate_with="ema"), tmp_path / "ran", []

    class Plant(transformers.TrainerCallback):  # before the AveragerCallback's on_train_end
        def on_train_end(self, args, state, control, **kw):
            planted.append(os.path.join(state.best_model_checkpoint, STATE_FILE))
            _plant(planted[0], marker)

    t = make_trainer(tmp_path, [Plant(), cb], 6, eval_strategy="steps", eval_steps=3,
                     save_strategy="steps", save_steps=3, load_best_model_at_end=True,
                     metric_for_best_model="ema_loss", greater_is_better=False)
    try:
        with pytest.raises(ValueError, match="not an offload_ema Averager state file.*refused, "
                                             "nothing in it ran") as refused:
            t.train()
    finally:
        cb.averager.close()
    assert planted and str(refused.value).startswith(f"{planted[0]}: ")
    assert not marker.exists()
