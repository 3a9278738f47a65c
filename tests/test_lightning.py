"""The Lightning callback: averages vs a swa_utils/float64 reference at the real optimizer
steps (gradient accumulation), validation with the average swapped in, exact resume."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")  # CI installs lightning (Makefile deps)

import offload_ema as oe  # noqa: E402
from offload_ema.integrations.lightning import AveragerCallback  # noqa: E402
from helpers import RefDecay, RefEMA, RefLAWA, assert_matches  # noqa: E402


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 1))
        self.seen_in_validation = []

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, _):
        self.seen_in_validation.append({k: v.detach().clone() for k, v in self.state_dict().items()})
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def data(n=40):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True).sin()), batch_size=2, shuffle=False)


class Recorder(pl.Callback):
    """float64 references fed at every real optimizer step (global_step moved)."""

    def __init__(self):
        self.ema, self.lawa, self.last = RefEMA(0.8), RefLAWA(3), 0

    def on_train_batch_end(self, trainer, module, *_):
        if trainer.global_step != self.last:
            self.last = trainer.global_step
            snap = {f"net.{k}": v.detach().double().clone() for k, v in module.net.named_parameters()}
            self.ema.update(snap)
            if trainer.global_step % 2 == 0:
                self.lawa.update(snap)


def trainer(max_steps, callbacks, **kw):
    return pl.Trainer(max_steps=max_steps, accumulate_grad_batches=2, accelerator="cpu",
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=callbacks, **kw)


def specs():
    return {"ema": oe.EMA(0.8), "lawa": oe.LAWA(3, every=2)}


def test_averages_follow_real_optimizer_steps_with_accumulation():
    cb, rec = AveragerCallback(specs()), Recorder()
    trainer(15, [cb, rec], limit_val_batches=0).fit(Tiny(), data())
    st = cb.averager.stats()
    assert st["step"] == 15 and st["snapshots_taken"] == 15  # 30 batches, accumulation 2
    assert_matches(cb.averager.averaged_state_dict("ema"), rec.ema.avg, rtol=1e-6, atol=1e-7)
    assert_matches(cb.averager.averaged_state_dict("lawa"), rec.lawa.avg, rtol=1e-6, atol=1e-7)
    cb.averager.close()


def test_validation_runs_with_the_average_swapped_in_and_restores():
    cb = AveragerCallback(specs(), validate_with="ema")
    module = Tiny()
    t = trainer(10, [cb], val_check_interval=10, limit_val_batches=1, num_sanity_val_steps=1)
    t.fit(module, data(), data(4))
    # Sanity check before any snapshot ran on the raw weights; the last validation on the EMA.
    ema = cb.averager.averaged_state_dict("ema")
    last = module.seen_in_validation[-1]
    for k, v in last.items():
        torch.testing.assert_close(v, ema[k])
    raw = dict(module.state_dict())
    assert not torch.equal(raw["net.0.weight"], ema["net.0.weight"])  # restored after
    cb.averager.close()


def test_checkpoint_resume_continues_exactly(tmp_path):
    # Lightning's own resume does not replay the identical trajectory here (the raw weights of a
    # resumed and an uninterrupted fit differ), so the reference follows the run that happens:
    # float64 averages fed before the checkpoint and, carried over, after it.
    first, rec = AveragerCallback(specs()), Recorder()
    t1 = trainer(10, [first, rec], limit_val_batches=0)
    t1.fit(Tiny(), data())
    ckpt = tmp_path / "ten.ckpt"
    t1.save_checkpoint(ckpt)
    first.averager.close()

    resumed, rec2 = AveragerCallback(specs()), Recorder()
    rec2.ema, rec2.lawa, rec2.last = rec.ema, rec.lawa, 10
    trainer(20, [resumed, rec2], limit_val_batches=0).fit(Tiny(), data(), ckpt_path=ckpt)
    st = resumed.averager.stats()
    assert resumed.averager.step_count == 20 and st["snapshots_taken"] == 20
    assert_matches(resumed.averager.averaged_state_dict("ema"), rec2.ema.avg, rtol=1e-6, atol=1e-7)
    assert_matches(resumed.averager.averaged_state_dict("lawa"), rec2.lawa.avg, rtol=1e-6, atol=1e-7)
    resumed.averager.close()


def test_resume_at_another_number_of_processes_says_so(tmp_path):
    # A sharded 2-process run keeps every rank's state in rank 0's checkpoint (the 2-process
    # round trip is tests/test_integrations_distributed.py); one process cannot take it over.
    first = AveragerCallback(specs())
    t1 = trainer(4, [first], limit_val_batches=0)
    t1.fit(Tiny(), data())
    ckpt = tmp_path / "four.ckpt"
    t1.save_checkpoint(ckpt)
    c = torch.load(ckpt, weights_only=False)
    (key,) = [k for k in c["callbacks"] if k.startswith("offload_ema.")]
    # FSDP2 / ZeRO-3 ranks' own flat states (DDP's global ones merge at any world size: the
    # 2-process round trip in tests/test_integrations_distributed.py).
    state = first.averager._rank_state_dict()
    c["callbacks"][key] = {"averager_ranks": [state, state], "world": 2}
    first.averager.close()
    torch.save(c, ckpt)
    resumed = AveragerCallback(specs())
    with pytest.raises(ValueError, match="averager states of 2 processes, this run has 1.*resume "
                                         "with 2 processes"):
        trainer(8, [resumed], limit_val_batches=0).fit(Tiny(), data(), ckpt_path=ckpt)
    resumed.averager.close()


def test_periodic_snapshots_from_the_callback(tmp_path):
    cb = AveragerCallback(specs(), save_every=5, save_path=str(tmp_path / "{name}-{step}.safetensors"),
                          keep_last=1)
    trainer(10, [cb], limit_val_batches=0).fit(Tiny(), data())
    cb.averager.close()  # waits for the writer
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema-10.safetensors", "lawa-10.safetensors"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="validate_with must name one of the averages"):
        AveragerCallback(specs(), validate_with="swa")
    with pytest.raises(ValueError, match="save_every and save_path go together"):
        AveragerCallback(specs(), save_every=5)


def test_decay_schedules_through_the_callback():
    """EMA warm-up, PowerEMA and SWA through Lightning, at the real optimizer steps."""
    specs = {"warm": oe.EMA(0.9, warmup_gamma=1.0), "power": oe.PowerEMA(gamma=4.0),
             "swa": oe.SWA(every=2)}
    refs = {"warm": RefDecay(lambda k: 0.0 if k == 1 else min(0.9, 1 - k ** (-2 / 3))),
            "power": RefDecay(lambda k: 0.0 if k == 1 else (1 - 1 / k) ** 5),
            "swa": RefDecay(lambda k: (k - 1) / k)}

    class Rec(pl.Callback):
        last = 0

        def on_train_batch_end(self, trainer, module, *_):
            if trainer.global_step != self.last:
                self.last = trainer.global_step
                snap = {f"net.{k}": v.detach().double().clone()
                        for k, v in module.net.named_parameters()}
                for n, spec in specs.items():
                    if spec.is_due(trainer.global_step):
                        refs[n].update(snap)
    cb = AveragerCallback(specs)
    trainer(12, [cb, Rec()], limit_val_batches=0).fit(Tiny(), data())
    for n in specs:
        assert_matches(cb.averager.averaged_state_dict(n), refs[n].avg, rtol=1e-6, atol=1e-7)
    cb.averager.close()


class Logged(Tiny):
    """Logs per batch, keeps per-epoch outputs (cleared at epoch end) and a torchmetrics-style
    object, and scales its inputs in a batch-transfer hook: the average's pass must honour all."""

    def __init__(self):
        super().__init__()
        self.outputs, self.epoch_sizes, self.batch_starts = [], [], 0
        from torchmetrics import MeanAbsoluteError
        self.mae = MeanAbsoluteError()

    def on_after_batch_transfer(self, batch, dataloader_idx):
        x, y = batch
        return x * 0.5, y

    def validation_step(self, batch, _):
        x, y = batch
        out = self.net(x)
        self.outputs.append(out)
        self.log("val_loss", nn.functional.mse_loss(out, y))
        self.mae(out, y)
        self.log("val_mae", self.mae)
        return out

    def on_validation_batch_start(self, batch, batch_idx):
        self.batch_starts += 1

    def on_validation_batch_end(self, outputs, batch, batch_idx):
        self.log("val_max", outputs.abs().max())  # a metric logged from a batch hook

    def on_validation_epoch_end(self):
        self.epoch_sizes.append(len(self.outputs))
        self.outputs.clear()


def test_keep_raw_logs_the_average_beside_the_raw_metrics(tmp_path):
    """validate_with + keep_raw: the raw validation as usual, then the average's, logged as
    val_loss/ema and val_mae/ema beside val_loss and val_mae (CSVLogger: both series)."""
    cb, rec = AveragerCallback(specs(), validate_with="ema", keep_raw=True), Recorder()
    module = Logged()
    logger = pl.loggers.CSVLogger(str(tmp_path), name="run")
    mc = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), monitor="val_loss/ema",
                                      mode="min")
    t = pl.Trainer(max_steps=8, accumulate_grad_batches=2, accelerator="cpu", logger=logger,
                   enable_progress_bar=False,
                   enable_model_summary=False, callbacks=[cb, rec, mc], val_check_interval=8,
                   check_val_every_n_epoch=None, limit_val_batches=3, num_sanity_val_steps=0,
                   log_every_n_steps=1)
    val = data(6)  # 3 batches of 2
    t.fit(module, data(), val)
    ref = Tiny()
    ref.load_state_dict({k: v.float() for k, v in rec.ema.avg.items()})
    x, y = val.dataset.tensors
    x = x * 0.5  # the module's on_after_batch_transfer
    assert module.epoch_sizes == [3] * 4  # 2 validations x (raw, average): no leak
    with torch.no_grad():
        out = ref.net(x)
        raw_out = module.net(x)
    assert t.callback_metrics["val_loss/ema"].item() == pytest.approx(
        nn.functional.mse_loss(out, y).item(), rel=1e-5)
    assert t.callback_metrics["val_mae/ema"].item() == pytest.approx(
        (out - y).abs().mean().item(), rel=1e-5)
    # The module's batch hooks run in the average's pass too (2 validations x 2 passes x 3).
    assert module.batch_starts == 12
    assert t.callback_metrics["val_max/ema"].item() == pytest.approx(
        sum(out[i:i + 2].abs().max().item() for i in (0, 2, 4)) / 3, rel=1e-5)
    assert t.callback_metrics["val_loss"].item() == pytest.approx(
        nn.functional.mse_loss(raw_out, y).item(), rel=1e-5)  # the raw weights, restored
    import csv
    rows = list(csv.DictReader(open(logger.log_dir + "/metrics.csv")))
    names = set().union(*(r.keys() for r in rows))
    assert {"val_loss", "val_mae", "val_loss/ema", "val_mae/ema"} <= names
    assert any(r.get("val_loss/ema") for r in rows) and any(r.get("val_loss") for r in rows)
    # A checkpoint callback can monitor the average's metric.
    assert mc.best_model_score.item() == pytest.approx(t.callback_metrics["val_loss/ema"].item())
    with pytest.raises(ValueError, match="keep_raw needs validate_with"):
        AveragerCallback(specs(), keep_raw=True)
    cb.averager.close()
    # An EarlyStopping on the average's metric listed first would look before it exists.
    early = pl.callbacks.EarlyStopping(monitor="val_loss/ema")
    cb2 = AveragerCallback(specs(), validate_with="ema", keep_raw=True)
    with pytest.raises(ValueError, match="list the AveragerCallback first"):
        pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, callbacks=[early, cb2]).fit(Logged(), data(), val)


def _plain(value, where="state"):
    """Asserts ``value`` holds only what torch.load(weights_only=True) reads without running
    code: tensors, numbers, strings, None, lists / tuples and dicts of them."""
    if isinstance(value, dict):
        for k, v in value.items():
            assert isinstance(k, (str, int)), f"{where}: key {k!r}"
            _plain(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _plain(v, f"{where}[{i}]")
    else:
        assert value is None or isinstance(value, (torch.Tensor, bool, int, float, str)), \
            f"{where}: {type(value).__name__}"


def test_resume_from_a_checkpoint_loaded_with_weights_only(tmp_path):
    """The callback's checkpoint state is plain data, so Lightning can load the checkpoint with
    weights_only=True (nothing in it can run code) and the averages continue exactly."""
    first, rec = AveragerCallback(specs()), Recorder()
    t1 = trainer(10, [first, rec], limit_val_batches=0)
    t1.fit(Tiny(), data())
    _plain(first.state_dict())
    ckpt = tmp_path / "ten.ckpt"
    t1.save_checkpoint(ckpt)
    first.averager.close()
    (key,) = [k for k in torch.load(ckpt, weights_only=True)["callbacks"]
              if k.startswith("offload_ema.")]

    resumed, rec2 = AveragerCallback(specs()), Recorder()
    rec2.ema, rec2.lawa, rec2.last = rec.ema, rec.lawa, 10
    trainer(20, [resumed, rec2], limit_val_batches=0).fit(Tiny(), data(), ckpt_path=ckpt,
                                                          weights_only=True)
    assert resumed.averager.step_count == 20 and resumed.state_key == key
    assert_matches(resumed.averager.averaged_state_dict("ema"), rec2.ema.avg, rtol=1e-6, atol=1e-7)
    assert_matches(resumed.averager.averaged_state_dict("lawa"), rec2.lawa.avg, rtol=1e-6,
                   atol=1e-7)
    resumed.averager.close()


class _Planted:
    """A pickle that runs code when loaded without weights_only: it creates ``path``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import pathlib
        return pathlib.Path.touch, (pathlib.Path(self.path),)


def test_a_planted_pickle_in_the_callback_state_is_refused_without_running_it(tmp_path):
    first = AveragerCallback(specs())
    t1 = trainer(4, [first], limit_val_batches=0)
    t1.fit(Tiny(), data())
    ckpt, marker = tmp_path / "four.ckpt", tmp_path / "ran"
    t1.save_checkpoint(ckpt)
    first.averager.close()
    c = torch.load(ckpt, weights_only=True)
    (key,) = [k for k in c["callbacks"] if k.startswith("offload_ema.")]
    c["callbacks"][key]["averager"]["averages"] = _Planted(marker)
    torch.save(c, ckpt)
    resumed = AveragerCallback(specs())
    import pickle
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        trainer(8, [resumed], limit_val_batches=0).fit(Tiny(), data(), ckpt_path=ckpt,
                                                       weights_only=True)
    assert not marker.exists()
    assert resumed.averager is None or resumed.averager.step_count == 0
    if resumed.averager is not None:
        resumed.averager.close()
