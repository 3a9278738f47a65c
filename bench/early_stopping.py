"""Early stopping on averaged weights: a small, reproducible AlgoPerf-style experiment.

    python bench/early_stopping.py [--quick] [--json PATH] [--plot-dir DIR]

Two workloads that need no download:
  bytes-lm     a byte-level GPT (offload_ema.gpt) on this Python's standard-library sources;
  teacher-mlp  an MLP classifier on inputs labelled by a fixed random teacher network (10% noise).
Train / validation splits are fixed by seed 0; model init and data order vary with the run seed.

Protocol (per workload, per seed): NAdamW (NAdam with decoupled weight decay), linear warm-up, then
cosine decay to zero at the step budget T; the raw model's final validation loss is the target.
In the same run, an Averager keeps EMA and LAWA averages (several settings, from one snapshot per
step); every E steps each is scored with ``Averager.swapped``. Reported: steps to reach the target
for raw / EMA / LAWA (mean +- std over seeds) and the fraction of the budget saved; a second run
with a constant LR after warm-up tells whether averaging replaces the decay; the extra averages
form a small sweep of EMA beta and LAWA window / interval. Post-hoc EMA: the decay run also keeps
two power EMAs (sigma_rel 0.05 and 0.15), saved at every evaluation; after the run, power EMAs of
other widths are synthesised from those profiles (``oe.posthoc_ema``) and compared with power EMAs
of the same widths tracked directly in the same run.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import statistics
import sys
import sysconfig
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

import offload_ema as oe
from offload_ema.gpt import GPT, GPTConfig, lm_loss

def averages(T):
    """The main EMA and LAWA and a small sweep, scaled to the budget T: the main ones average
    over about the last 10-20% of the run."""
    def ema(horizon):
        return oe.EMA(round(1 - 1 / max(2, horizon), 4))
    return {
        "ema": ema(T // 10),
        "lawa": oe.LAWA(5, every=max(1, T // 25)),
        f"ema_h{max(2, T // 40)}": ema(T // 40),
        f"ema_h{max(2, T // 4)}": ema(T // 4),
        f"lawa_10x{max(1, T // 50)}": oe.LAWA(10, every=max(1, T // 50)),
        f"lawa_3x{max(1, T // 10)}": oe.LAWA(3, every=max(1, T // 10)),
    }


PROFILES = {"profile_a": 0.05, "profile_b": 0.15}  # stored for post-hoc synthesis
POSTHOC_SIGMAS = (0.03, 0.08, 0.12, 0.2)             # synthesised, and tracked directly


def power_specs():
    specs = {n: oe.PowerEMA(s) for n, s in PROFILES.items()}
    specs.update({f"pow_{s}": oe.PowerEMA(s) for s in POSTHOC_SIGMAS})
    return specs


# ---- workloads ------------------------------------------------------------------------------

class BytesLM:
    name = "bytes-lm"

    def __init__(self, quick):
        files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
        data = b"".join(open(f, "rb").read() for f in files)[: (200_000 if quick else 2_000_000)]
        blocks = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        blocks = blocks[: len(blocks) // 1024 * 1024].view(-1, 1024)
        perm = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(0))
        n_val = max(4, len(blocks) // 10)
        self.val, self.train = blocks[perm[:n_val]], blocks[perm[n_val:]]
        self.cfg = GPTConfig(vocab=256, seq=32 if quick else 64, width=64 if quick else 128,
                             layers=1 if quick else 2, heads=4, batch=16)
        g = torch.Generator().manual_seed(1)
        self.val_batch = self._windows(self.val, 32 if quick else 64, g)
        self.lr, self.steps = 3e-3, (50 if quick else 400)

    def _windows(self, blocks, n, g):
        rows = torch.randint(0, len(blocks), (n,), generator=g)
        cols = torch.randint(0, 1024 - self.cfg.seq - 1, (n,), generator=g)
        return torch.stack([blocks[r, c:c + self.cfg.seq + 1] for r, c in zip(rows, cols)])

    def model(self):
        return GPT(self.cfg)

    def batch(self, g):
        return self._windows(self.train, self.cfg.batch, g)

    def loss(self, model, batch):
        return lm_loss(model, batch)

    @torch.no_grad()
    def evaluate(self, model):
        return lm_loss(model, self.val_batch).item()


class TeacherMLP:
    name = "teacher-mlp"

    def __init__(self, quick):
        g = torch.Generator().manual_seed(0)
        teacher = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 10))
        with torch.no_grad():
            for p in teacher.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 1.5)
        n = 4000 if quick else 30000
        x = torch.randn(n, 32, generator=g)
        with torch.no_grad():
            y = teacher(x).argmax(1)
        noise = torch.rand(n, generator=g) < 0.1
        y[noise] = torch.randint(0, 10, (int(noise.sum()),), generator=g)
        n_val = n // 5
        self.val, self.train = (x[:n_val], y[:n_val]), (x[n_val:], y[n_val:])
        self.lr, self.steps, self.bs = 2e-3, (50 if quick else 400), 64

    def model(self):
        return nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                             nn.Linear(256, 10))

    def batch(self, g):
        i = torch.randint(0, len(self.train[0]), (self.bs,), generator=g)
        return self.train[0][i], self.train[1][i]

    def loss(self, model, batch):
        return F.cross_entropy(model(batch[0]), batch[1])

    @torch.no_grad()
    def evaluate(self, model):
        return F.cross_entropy(model(self.val[0]), self.val[1]).item()


WORKLOADS = {"bytes-lm": BytesLM, "teacher-mlp": TeacherMLP}


# ---- one training run -----------------------------------------------------------------------

def lr_at(step, T, base, schedule):
    warm = max(1, T // 20)
    if step <= warm:
        return base * step / warm
    if schedule == "constant":
        return base
    return base * 0.5 * (1 + math.cos(math.pi * (step - warm) / (T - warm)))


def train(work, seed, schedule, specs, every_eval, profile_dir=None):
    """Curves of raw and averaged validation loss; with ``profile_dir``, the power-EMA profiles
    are saved at every evaluation and a ``posthoc`` entry holds, per synthesised sigma_rel, the
    final loss of the post-hoc average and of the directly tracked one."""
    curves = {"raw": []}
    curves.update({n: [] for n in specs})  # power EMAs: compared at the end only
    if profile_dir is not None:
        specs = {**specs, **power_specs()}
    torch.manual_seed(seed)
    model = work.model()
    opt = torch.optim.NAdam(model.parameters(), lr=work.lr, weight_decay=0.05,
                            decoupled_weight_decay=True)
    g = torch.Generator().manual_seed(1000 + seed)
    saves = []
    with oe.Averager(model, specs) as avg:
        avg.attach(opt)
        for step in range(1, work.steps + 1):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, work.steps, work.lr, schedule)
            model.train()
            work.loss(model, work.batch(g)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step % every_eval == 0 or step == work.steps:
                model.eval()
                curves["raw"].append((step, work.evaluate(model)))
                for n, spec in specs.items():
                    if n not in curves:
                        continue
                    if step < spec.start + spec.every:
                        continue  # no snapshot yet
                    with avg.swapped(model, n):
                        curves[n].append((step, work.evaluate(model)))
                if profile_dir is not None:
                    for n in PROFILES:
                        saves.append(avg.save(
                            os.path.join(profile_dir, f"{n}-{step:06d}.safetensors"), n))
        if profile_dir is not None:
            for fut in saves:  # written (flush() waits for the averages, not for the files)
                fut.result()
            curves["posthoc"] = _posthoc_losses(work, model, avg, profile_dir)
    return curves


def _posthoc_losses(work, model, avg, profile_dir):
    """{sigma_rel: [post-hoc final loss, tracked final loss, fit residual]}."""
    paths = sorted(glob.glob(os.path.join(profile_dir, "profile_*.safetensors")))
    out = {}
    model.eval()
    for sigma in POSTHOC_SIGMAS:
        synth, info = oe.posthoc_ema(paths, sigma, return_info=True)
        with avg.swapped(model, f"pow_{sigma}"):
            tracked = work.evaluate(model)
            saved = {k: v.clone() for k, v in model.state_dict().items()}
            model.load_state_dict({k: v.to(saved[k].dtype) for k, v in synth.items()})
            posthoc = work.evaluate(model)
            model.load_state_dict(saved)
        out[str(sigma)] = [posthoc, tracked, info["residual"]]
    return out


def steps_to(curve, target):
    for step, loss in curve:
        if loss <= target:
            return step
    return None


def _ms(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "never"
    return f"{statistics.mean(xs):.0f} ± {statistics.stdev(xs) if len(xs) > 1 else 0:.0f}"


def run(args):
    results = {}
    for wname in args.workloads:
        work = WORKLOADS[wname](args.quick)
        T = work.steps
        every = max(1, T // 20)
        specs = averages(T)
        runs = []
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as profile_dir:
                decay = train(work, seed, "cosine", specs, every, profile_dir)
            const = train(work, seed, "constant", specs, every)
            runs.append({"seed": seed, "decay": decay, "constant": const})
            print(f"[{wname}] seed {seed}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        results[wname] = {"T": T, "eval_every": every, "runs": runs, "specs": {
            n: s.config() for n, s in specs.items()}}
    return results


def summarise(results):
    out = {}
    for wname, res in results.items():
        T, runs = res["T"], res["runs"]
        targets = [r["decay"]["raw"][-1][1] for r in runs]
        names = [n for n in runs[0]["decay"] if n != "posthoc"]
        rows = {}
        for n in names:
            steps = [steps_to(r["decay"][n], t) for r, t in zip(runs, targets)]
            final = [r["decay"][n][-1][1] for r in runs]
            const = [r["constant"][n][-1][1] for r in runs]
            reached = [s for s in steps if s is not None]
            rows[n] = {"steps_to_target": steps, "final_decay": final, "final_constant": const,
                       "saved_fraction": (1 - statistics.mean(reached) / T) if reached else None}
        posthoc = {s: {"posthoc": statistics.mean(r["decay"]["posthoc"][s][0] for r in runs),
                       "tracked": statistics.mean(r["decay"]["posthoc"][s][1] for r in runs),
                       "residual": max(r["decay"]["posthoc"][s][2] for r in runs)}
                   for s in runs[0]["decay"]["posthoc"]}
        out[wname] = {"T": T, "targets": targets, "rows": rows, "posthoc": posthoc}
    return out


def report(summary):
    for wname, s in summary.items():
        T = s["T"]
        print(f"\n### {wname}: budget T = {T} steps, target = raw final val loss with LR decay "
              f"({statistics.mean(s['targets']):.4f} mean over {len(s['targets'])} seeds)\n")
        print("| weights | steps to target (mean ± std) | budget saved | final val loss |")
        print("|---|---|---|---|")
        for n in ["raw", "ema", "lawa"]:
            r = s["rows"][n]
            saved = "-" if r["saved_fraction"] is None else f"{100 * r['saved_fraction']:.0f}%"
            print(f"| {n} | {_ms(r['steps_to_target'])} | {saved} | "
                  f"{statistics.mean(r['final_decay']):.4f} |")
        print("\nConstant LR after warm-up vs cosine decay (final val loss, mean over seeds):\n")
        print("| weights | constant LR | cosine decay |")
        print("|---|---|---|")
        for n in ["raw", "ema", "lawa"]:
            r = s["rows"][n]
            print(f"| {n} | {statistics.mean(r['final_constant']):.4f} | "
                  f"{statistics.mean(r['final_decay']):.4f} |")
        print("\nPost-hoc EMA from two stored profiles (sigma_rel 0.05, 0.15, saved every "
              "evaluation) vs power EMAs tracked directly, final val loss with LR decay:\n")
        print("| sigma_rel | post-hoc | tracked | fit residual (max) |")
        print("|---|---|---|---|")
        for sigma, r in s["posthoc"].items():
            print(f"| {sigma} | {r['posthoc']:.4f} | {r['tracked']:.4f} | {r['residual']:.3g} |")
        print("\nSweep (EMA h = horizon 1 / (1 - beta) in steps; LAWA window x interval):\n")
        print("| average | steps to target | final val loss | constant-LR final |")
        print("|---|---|---|---|")
        for n, r in s["rows"].items():
            if n == "raw":
                continue
            print(f"| {n} | {_ms(r['steps_to_target'])} | {statistics.mean(r['final_decay']):.4f} | "
                  f"{statistics.mean(r['final_constant']):.4f} |")


def plot(results, summary, directory):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(directory, exist_ok=True)
    paths = []
    for wname, res in results.items():
        fig, ax = plt.subplots(figsize=(6, 3.5))
        run0 = res["runs"][0]["decay"]
        for n, style in (("raw", "-"), ("ema", "--"), ("lawa", ":")):
            xs, ys = zip(*run0[n])
            ax.plot(xs, ys, style, label=n)
        ax.axhline(summary[wname]["targets"][0], color="grey", lw=0.8, label="target")
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss")
        ax.set_title(f"{wname}, seed 0, cosine decay")
        ax.set_ylim(top=min(max(y for _, y in run0["raw"]), summary[wname]["targets"][0] * 2))
        ax.legend()
        fig.tight_layout()
        p = os.path.join(directory, f"{wname}-curves.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.25
    for i, n in enumerate(["raw", "ema", "lawa"]):
        vals = []
        for wname in results:
            xs = [x for x in summary[wname]["rows"][n]["steps_to_target"] if x is not None]
            vals.append(statistics.mean(xs) / summary[wname]["T"] if xs else float("nan"))
        ax.bar([j + i * width for j in range(len(results))], vals, width, label=n)
    ax.set_xticks([j + width for j in range(len(results))], list(results))
    ax.set_ylabel("steps to target / budget")
    ax.legend()
    fig.tight_layout()
    p = os.path.join(directory, "steps-to-target.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small models and budgets (< 2 min)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per workload (default 3, quick 2)")
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--plot-dir", metavar="DIR")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    args.seeds = args.seeds or (2 if args.quick else 3)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    bad = [w for w in args.workloads if w not in WORKLOADS]
    if bad or args.seeds < 2:
        p.error(f"unknown workloads {bad}" if bad else "--seeds must be >= 2 (for a std)")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    results = run(args)
    summary = summarise(results)
    report(summary)
    print(f"\n({time.perf_counter() - t0:.0f} s, torch {torch.__version__}, "
          f"{args.seeds} seeds{', quick' if args.quick else ''})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "results": results}, f)
    if args.plot_dir:
        for path in plot(results, summary, args.plot_dir):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
