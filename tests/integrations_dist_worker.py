"""One rank of the 2-process integration tests (tests/test_integrations_distributed.py launches
it per rank): python integrations_dist_worker.py FRAMEWORK PHASE RANK WORLD INIT_FILE OUT_DIR

FRAMEWORK is "lightning" or "transformers"; PHASE "straight" trains N steps with a checkpoint at
N/2, "resume" starts from that checkpoint in fresh processes and trains to N. Each rank writes
what it ends with (the gathered averages, its raw weights, the step count) to
OUT_DIR/<framework>-<phase>-rank<r>.pt for the test to compare.

The process group is set up here (gloo, file:// rendezvous, so concurrent test runs never race
for a TCP port) before either framework starts; both then use the existing group, and the
torchrun-style variables below tell them they run distributed and which rank they are."""
import datetime
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

STEPS, HALF = 8, 4


def specs():
    import offload_ema as oe
    return {"ema": oe.EMA(0.8), "lawa": oe.LAWA(3, every=2)}


def dump(cb, model, out, framework, phase, rank, extra=None):
    avg = cb.averager
    result = {name: avg.averaged_state_dict(name) for name in specs()}  # collective: every rank
    result.update(raw={k: v.detach().clone() for k, v in model.state_dict().items()},
                  step=avg.step_count, taken=avg.stats()["snapshots_taken"],
                  averager_world=avg.stats()["world"], **(extra or {}))
    torch.save(result, os.path.join(out, f"{framework}-{phase}-rank{rank}.pt"))
    avg.close()


# ---- Lightning ------------------------------------------------------------------------------
def lightning(phase, rank, out):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset
    from offload_ema.integrations.lightning import AveragerCallback

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 1))

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def validation_step(self, batch, _):
            x, y = batch
            self.log("val_loss", nn.functional.mse_loss(self.net(x), y), sync_dist=True)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    # 16 samples, 2 ranks, batch 2: 4 steps per epoch, so the checkpoint at step 4 ends an epoch
    # (Lightning restarts a plain DataLoader's epoch from its start on a mid-epoch resume, which
    # would not replay the uninterrupted run).
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 6, generator=g)
    data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True).sin()), batch_size=2, shuffle=False)
    ckpt_dir = os.path.join(out, "lightning_ckpts")
    # Validation at each epoch's end on the raw weights and on the EMA (keep_raw: val_loss/ema,
    # each rank its share of the data, reduced over the ranks).
    vx = torch.randn(8, 6, generator=g)
    val = DataLoader(TensorDataset(vx, vx.sum(1, keepdim=True).sin()), batch_size=2, shuffle=False)
    cb = AveragerCallback(specs(), validate_with="ema", keep_raw=True)
    # ModelCheckpoint, not a hand-made save: its saves must reach the gather on every rank too.
    mc = pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", every_n_train_steps=HALF,
                                      save_top_k=-1)
    other = phase == "other_world"  # resumed with another number of processes, no more steps
    trainer = pl.Trainer(max_steps=HALF if other else STEPS, accelerator="cpu",
                         devices=dist.get_world_size(), strategy="ddp",
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=[cb, mc])
    module = Tiny()
    ckpt = os.path.join(ckpt_dir, f"step={HALF}.ckpt") if phase != "straight" else None
    trainer.fit(module, data, val, ckpt_path=ckpt)
    if other:
        dump(cb, module, out, "lightning", phase, rank)
        return
    dump(cb, module, out, "lightning", phase, rank,
         {"val_loss_ema": float(trainer.callback_metrics["val_loss/ema"]),
          "val_loss": float(trainer.callback_metrics["val_loss"]), "val_x": vx})


# ---- Hugging Face Trainer -------------------------------------------------------------------
def transformers_(phase, rank, out):
    import transformers
    from offload_ema.integrations.transformers import AveragerCallback

    from helpers import Reg, RegData as Data

    def make(output_dir, cb, max_steps=STEPS):
        args = transformers.TrainingArguments(
            output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=2,
            learning_rate=0.05, lr_scheduler_type="constant", report_to=[], use_cpu=True,
            logging_strategy="no", save_strategy="steps", save_steps=HALF,
            dataloader_num_workers=0, seed=0, data_seed=0, disable_tqdm=True)
        model = Reg()
        # 32 samples, 2 ranks, batch 2: the checkpoint at step 4 is mid-epoch (the Trainer
        # skips the batches it has seen, so the resumed run replays the uninterrupted one).
        return transformers.Trainer(model=model, args=args, train_dataset=Data(32, 1),
                                    callbacks=[cb]), model

    extra = {}
    if phase == "straight":
        cb = AveragerCallback(specs())
        trainer, model = make(os.path.join(out, "hf"), cb)
        trainer.train()
    elif phase == "other_world":  # another number of processes: the state as loaded
        class Loaded(transformers.TrainerCallback):  # runs after ours loaded the state
            def on_train_begin(self, args, state, control, **kwargs):
                avg = cb.averager
                extra.update(loaded={n: avg.averaged_state_dict(n) for n in specs()},
                             loaded_step=avg.step_count)

        cb = AveragerCallback(specs())
        trainer, model = make(os.path.join(out, "hf_other"), cb, max_steps=HALF + 1)
        trainer.add_callback(Loaded())
        trainer.train(resume_from_checkpoint=os.path.join(out, "hf_other", f"checkpoint-{HALF}"))
    else:
        # The test left a copy of checkpoint-4 without rank 1's file in hf_missing: resuming
        # from it must fail on both ranks, with the reason, rather than leave rank 0 waiting.
        bad = AveragerCallback(specs())
        trainer, _ = make(os.path.join(out, "hf_missing"), bad)
        try:
            trainer.train(resume_from_checkpoint=os.path.join(out, "hf_missing", f"checkpoint-{HALF}"))
            extra["missing_error"] = None
        except Exception as exc:  # noqa: BLE001 -- reported to the test
            extra["missing_error"] = f"{type(exc).__name__}: {exc}"
        if bad.averager is not None:
            bad.averager.close()
        cb = AveragerCallback(specs())
        trainer, model = make(os.path.join(out, "hf_resume"), cb)
        trainer.train(resume_from_checkpoint=os.path.join(out, "hf_resume", f"checkpoint-{HALF}"))
    dump(cb, model, out, "transformers", phase, rank, extra)


def transformers_best(phase, rank, out):
    """load_best_model_at_end by the EMA's evaluation loss, averages sharded over the ranks:
    every rank ends with the best checkpoint's EMA (gathered from both ranks' state files), as
    a float64 reference recorded at each evaluation."""
    import transformers
    from offload_ema.integrations.transformers import AveragerCallback, AveragerTrainer

    from helpers import Reg, RefEMA, RegData as Data

    ref, refs_at = RefEMA(0.8), {}

    class Record(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            ref.update({n: p.detach().double().clone() for n, p in model.named_parameters()})

        def on_evaluate(self, args, state, control, **kwargs):
            refs_at[state.global_step] = {k: v.clone() for k, v in ref.avg.items()}

    cb = AveragerCallback(specs(), evaluate_with="ema")
    args = transformers.TrainingArguments(
        output_dir=os.path.join(out, "hf_best"), max_steps=STEPS, per_device_train_batch_size=2,
        learning_rate=0.2, lr_scheduler_type="constant", report_to=[], use_cpu=True,
        logging_strategy="no", save_strategy="steps", save_steps=2, eval_strategy="steps",
        eval_steps=2, metric_for_best_model="ema_loss", greater_is_better=False,
        load_best_model_at_end=True, dataloader_num_workers=0, seed=0, data_seed=0,
        disable_tqdm=True)
    model = Reg()
    trainer = AveragerTrainer(model=model, args=args, train_dataset=Data(32, 1),
                              eval_dataset=Data(8, 2), callbacks=[cb, Record()])
    trainer.train()
    best = int(trainer.state.best_model_checkpoint.rsplit("-", 1)[1])
    assert cb.averager.stats()["world"] == 2  # sharded: the best average came from both files
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v.double(), refs_at[best][k], rtol=1e-5, atol=1e-6)
    dump(cb, model, out, "transformers_best", phase, rank, {"best": best})


# ---- Hugging Face Trainer with DeepSpeed ZeRO-3 ---------------------------------------------
def transformers_zero3(phase, rank, out):
    """The Trainer with a ZeRO-3 config: train, evaluate on the average, checkpoint, resume.
    A callback records the parameters DeepSpeed gathers after each optimizer step: the float64
    reference of the averages and of the evaluation loss on the average."""
    import deepspeed
    import transformers
    from offload_ema.integrations.transformers import AveragerCallback

    from helpers import Reg, RefEMA, RefLAWA, RegData as Data

    refs = {"ema": RefEMA(0.8), "lawa": RefLAWA(3)}

    class Record(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            params = list(model.named_parameters())
            with deepspeed.zero.GatheredParameters([p for _, p in params]):
                full = {n: p.detach().double().clone() for n, p in params}
            refs["ema"].update(full)
            if state.global_step % 2 == 0:
                refs["lawa"].update(full)

    ds_config = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 10},
                 "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                 "train_batch_size": "auto", "steps_per_print": 10 ** 9}
    eval_data = Data(8, 2)

    def make(output_dir, cb):
        args = transformers.TrainingArguments(
            output_dir=output_dir, max_steps=STEPS, per_device_train_batch_size=2,
            learning_rate=0.05, lr_scheduler_type="constant", report_to=[], use_cpu=True,
            logging_strategy="no", save_strategy="steps", save_steps=HALF,
            eval_strategy="no", per_device_eval_batch_size=4,
            dataloader_num_workers=0, seed=0, data_seed=0, disable_tqdm=True,
            deepspeed=ds_config)
        model = Reg()
        trainer = transformers.Trainer(model=model, args=args, train_dataset=Data(32, 1),
                                       eval_dataset=eval_data, callbacks=[cb, Record()])
        return trainer, model

    cb = AveragerCallback(specs(), evaluate_with="ema")
    if phase == "straight":
        trainer, model = make(os.path.join(out, "hfz"), cb)
        trainer.train()
    else:
        trainer, model = make(os.path.join(out, "hfz_resume"), cb)
        trainer.train(resume_from_checkpoint=os.path.join(out, "hfz_resume", f"checkpoint-{HALF}"))
    metrics = trainer.evaluate()  # with the EMA swapped in too (the callback adds its loss)
    ref_model = Reg().double()
    ref_model.load_state_dict({k: v for k, v in refs["ema"].avg.items()})
    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params):
        raw = {k: v.detach().clone() for k, v in model.state_dict().items()}
    extra = {"eval_ema_loss": metrics.get("eval_ema_loss"), "eval_loss": metrics["eval_loss"],
             "refs": {n: r.avg for n, r in refs.items()}, "ref_model": ref_model.state_dict(),
             "eval_x": eval_data.x, "eval_y": eval_data.y}
    avg = cb.averager
    result = {name: avg.averaged_state_dict(name) for name in specs()}
    result.update(raw=raw, step=avg.step_count, taken=avg.stats()["snapshots_taken"],
                  averager_world=avg.stats()["world"], **extra)
    torch.save(result, os.path.join(out, f"transformers_zero3-{phase}-rank{rank}.pt"))
    avg.close()


def main():
    framework, phase, rank, world, init_file, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), \
        int(sys.argv[4]), sys.argv[5], sys.argv[6]
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), NODE_RANK="0", MASTER_ADDR="127.0.0.1")
    # A short timeout: a rank left alone fails soon instead of waiting out the test's limit
    # (yet long enough for the two ranks' imports to drift apart on a busy 2-core machine).
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    if framework == "transformers_zero3":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ["LOCAL_SIZE"] = str(world)
    {"lightning": lightning, "transformers": transformers_, "transformers_best": transformers_best,
     "transformers_zero3": transformers_zero3}[framework](phase, rank, out)
    dist.barrier()
    dist.destroy_process_group()
    print("OK", rank, flush=True)
    sys.stderr.flush()
    # Results are on disk and every averager closed: skip the interpreter's teardown of torch and
    # the frameworks, which takes seconds per process here.
    os._exit(0)


if __name__ == "__main__":
    main()
