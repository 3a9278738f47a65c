"""The payoff of averaging across budgets: steps to the raw model's target for raw / EMA / LAWA
at several step budgets, under a constant LR at the largest, and over batch size x peak LR.

    python bench/budget_sweep.py [--quick] [--budgets 400,1600,6400] [--workload NAME]
                                 [--json PATH] [--plot-dir DIR]

Protocol as in bench/early_stopping.py (NAdamW, linear warm-up then cosine decay to zero at the
budget T; the target is the raw model's final validation loss; averages kept by an Averager in
the same run and scored with ``swapped``), with what a budget sweep needs:

- Workloads that do not overfit at the largest budget, so that a "saving" is not the raw model
  getting worse at the end: ``teacher-fresh`` draws fresh inputs every step and labels them with a
  fixed random teacher network (10% label noise), the validation set is fixed. ``digits`` is real
  data (scikit-learn's bundled 8x8 digits, 1,797 images, no download; optional); it is small, so
  the raw model's own steps-to-target is reported as the sanity check (it must be the budget).
- Evaluation every T/100 steps (the evaluation's cost is reported).
- Averaging horizons scaled to the budget: EMA horizons 1 / (1 - beta) of 1%, 5% and 20% of T;
  LAWA windows of 5 snapshots spanning 1%, 5% and 20% of T (the seed found LAWA's best around 1%).
  The tables report the best of each family per budget, and every setting in the JSON.
- At the largest budget: a constant-LR run of the same length (does averaging replace the decay?)
  and the horizon sweep from two stored power-EMA profiles (post-hoc EMA) beside power EMAs
  tracked directly.
- A noise sweep at one budget: batch size x peak LR, the budget saved by EMA and LAWA at each.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time

import torch
from torch import nn

import offload_ema as oe

_HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("early_stopping",
                                               os.path.join(_HERE, "early_stopping.py"))
es = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(es)  # lr_at, steps_to, train (one run with its curves), post-hoc


class TeacherFresh(es.TeacherMLP):
    """An MLP learning a fixed random teacher from fresh samples every step (10% label noise):
    unlimited data, so longer budgets do not overfit. Loss and evaluation as the teacher-mlp's."""
    name = "teacher-fresh"

    def __init__(self, quick):
        g = torch.Generator().manual_seed(0)
        self.teacher = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 10))
        with torch.no_grad():
            for p in self.teacher.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 1.5)
        self.val = self._label(torch.randn(2048 if quick else 4096, 32, generator=g), g)
        self.lr, self.bs, self.steps = 2e-3, 64, 400

    @torch.no_grad()
    def _label(self, x, g):
        y = self.teacher(x).argmax(1)
        noise = torch.rand(len(x), generator=g) < 0.1
        y[noise] = torch.randint(0, 10, (int(noise.sum()),), generator=g)
        return x, y

    def model(self):
        return nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                             nn.Linear(128, 10))

    def batch(self, g):
        return self._label(torch.randn(self.bs, 32, generator=g), g)


class Digits(es.TeacherMLP):
    """scikit-learn's bundled 8x8 digits (real data, no download): an MLP, 80 / 20 split. Batches,
    loss and evaluation as the teacher-mlp's."""
    name = "digits"

    def __init__(self, quick):
        from sklearn.datasets import load_digits
        d = load_digits()
        x = torch.tensor(d.data, dtype=torch.float32) / 16.0
        y = torch.tensor(d.target, dtype=torch.long)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        x, y = x[perm], y[perm]
        n_val = len(x) // 5
        self.val, self.train = (x[:n_val], y[:n_val]), (x[n_val:], y[n_val:])
        self.lr, self.bs, self.steps = 1e-3, 32, 400

    def model(self):
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


WORKLOADS = {"teacher-fresh": TeacherFresh, "digits": Digits}
SPANS = (0.01, 0.05, 0.2)  # of the budget: EMA horizons, LAWA window spans


def averages(T):
    specs = {}
    for f in SPANS:
        h = max(2, round(f * T))
        specs[f"ema_{f:g}"] = oe.EMA(round(1 - 1 / h, 6))
        specs[f"lawa_{f:g}"] = oe.LAWA(5, every=max(1, round(f * T / 5)))
    return specs


def one_budget(work, T, seeds, constant=False, posthoc=False, evals=100):
    """Runs of one workload at budget T: per seed the cosine run (and constant-LR, post-hoc),
    evaluated ``evals`` times."""
    work.steps = T
    every = max(1, T // evals)
    specs = averages(T)
    runs = []
    for seed in range(seeds):
        t0 = time.perf_counter()
        if posthoc:
            with tempfile.TemporaryDirectory() as d:
                decay = es.train(work, seed, "cosine", specs, every, d)
        else:
            decay = es.train(work, seed, "cosine", specs, every)
        run = {"seed": seed, "decay": decay, "seconds": time.perf_counter() - t0}
        if constant:
            run["constant"] = es.train(work, seed, "constant", specs, every)
        runs.append(run)
    return {"T": T, "eval_every": every, "runs": runs,
            "specs": {n: s.config() for n, s in specs.items()}}


def summarise(res):
    """Steps to target (raw, each average, best EMA / LAWA by mean steps), saved fractions."""
    T, runs = res["T"], res["runs"]
    targets = [r["decay"]["raw"][-1][1] for r in runs]
    rows = {}
    for n in [k for k in runs[0]["decay"] if k != "posthoc"]:
        steps = [es.steps_to(r["decay"][n], t) for r, t in zip(runs, targets)]
        rows[n] = {"steps": steps, "final": statistics.mean(r["decay"][n][-1][1] for r in runs)}
        if "constant" in runs[0]:
            rows[n]["final_constant"] = statistics.mean(r["constant"][n][-1][1] for r in runs)

    def score(n):  # mean steps, a run that never reached it counted as the budget
        return statistics.mean(T if s is None else s for s in rows[n]["steps"])
    best = {fam: min((n for n in rows if n.startswith(fam + "_")), key=score)
            for fam in ("ema", "lawa")}
    # Saved relative to the raw model's own steps to its target (not to T): near the end of a
    # cosine run the loss is flat, and noise lets the raw model touch its final value early too.
    out = {"T": T, "targets": targets, "rows": rows, "best": best,
           "saved": {fam: 1 - score(n) / score("raw") for fam, n in best.items()},
           "saved_vs_budget": {fam: 1 - score(n) / T for fam, n in best.items()},
           "raw_steps": rows["raw"]["steps"]}
    if "posthoc" in runs[0]["decay"]:
        out["posthoc"] = {s: [statistics.mean(r["decay"]["posthoc"][s][i] for r in runs)
                              for i in range(3)] for s in runs[0]["decay"]["posthoc"]}
    return out


def _ms(xs, T):
    vals = [T if x is None else x for x in xs]
    never = sum(x is None for x in xs)
    s = f"{statistics.mean(vals):.0f} ± {statistics.stdev(vals) if len(vals) > 1 else 0:.0f}"
    return s + (f" ({never} never)" if never else "")


def run(args):
    work = WORKLOADS[args.workload](args.quick)
    base_lr, base_bs = work.lr, work.bs
    out = {"workload": args.workload, "budgets": {}, "noise": {}}
    t_eval = time.perf_counter()
    model = work.model()
    for _ in range(20):
        work.evaluate(model)
    out["eval_ms"] = (time.perf_counter() - t_eval) / 20 * 1e3
    largest = max(args.budgets)
    for T in args.budgets:
        t0 = time.perf_counter()
        res = one_budget(work, T, args.seeds, constant=T == largest, posthoc=T == largest,
                         evals=args.evals)
        res["summary"] = summarise(res)
        out["budgets"][str(T)] = res
        print(f"[{args.workload}] T={T}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    for bs in args.noise_batches:
        for lr_mult in args.noise_lrs:
            work.bs, work.lr = bs, base_lr * lr_mult
            res = one_budget(work, args.noise_budget, args.noise_seeds, evals=args.evals)
            res["summary"] = summarise(res)
            out["noise"][f"{bs}x{lr_mult:g}"] = {"batch": bs, "lr": work.lr, **res}
    work.bs, work.lr = base_bs, base_lr
    return out


def report(out):
    w = out["workload"]
    print(f"\n### {w}: steps to the raw model's final validation loss (cosine decay), "
          f"evaluated every T/100 (one evaluation of raw + 6 averages: "
          f"{7 * out['eval_ms']:.1f} ms)\n")
    print("Saved: 1 - (steps of the best average) / (the raw model's own steps to its final "
          "loss), a run that never reaches it counted as T.\n")
    print("| budget T | raw | best EMA (horizon) | best LAWA (span) | saved EMA | saved LAWA |")
    print("|---|---|---|---|---|---|")
    for T, res in out["budgets"].items():
        s = res["summary"]
        T = int(T)
        e, la = s["best"]["ema"], s["best"]["lawa"]
        print(f"| {T} | {_ms(s['raw_steps'], T)} | {_ms(s['rows'][e]['steps'], T)} "
              f"({e.split('_')[1]} T) | {_ms(s['rows'][la]['steps'], T)} ({la.split('_')[1]} T) "
              f"| {100 * s['saved']['ema']:.1f}% | {100 * s['saved']['lawa']:.1f}% |")
    largest = out["budgets"][str(max(int(t) for t in out["budgets"]))]["summary"]
    print(f"\nConstant LR vs cosine decay at T = {largest['T']} (final val loss, mean over "
          "seeds; the decayed raw model is the target):\n")
    print("| weights | constant LR | cosine decay |")
    print("|---|---|---|")
    for n, r in largest["rows"].items():
        if "final_constant" in r:
            print(f"| {n} | {r['final_constant']:.4f} | {r['final']:.4f} |")
    if "posthoc" in largest:
        print(f"\nPost-hoc EMA at T = {largest['T']} from two stored profiles vs power EMAs "
              "tracked directly (final val loss, cosine decay):\n")
        print("| sigma_rel | post-hoc | tracked | fit residual |")
        print("|---|---|---|---|")
        for sigma, (p, t, r) in largest["posthoc"].items():
            print(f"| {sigma} | {p:.4f} | {t:.4f} | {r:.3g} |")
    if out["noise"]:
        T = next(iter(out["noise"].values()))["T"]
        print(f"\nNoise sweep at T = {T}: budget saved by the best EMA / LAWA (raw steps to its "
              "own target in brackets: the budget unless it got worse at the end)\n")
        print("| batch | peak LR | raw final loss | saved EMA | saved LAWA |")
        print("|---|---|---|---|---|")
        for key, res in out["noise"].items():
            s = res["summary"]
            print(f"| {res['batch']} | {res['lr']:.2g} | {statistics.mean(s['targets']):.4f} "
                  f"({_ms(s['raw_steps'], T)}) | {100 * s['saved']['ema']:.1f}% | "
                  f"{100 * s['saved']['lawa']:.1f}% |")


def plot(out, directory):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(directory, exist_ok=True)
    w, paths = out["workload"], []
    budgets = sorted(int(t) for t in out["budgets"])
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for fam, style in (("ema", "o-"), ("lawa", "s--")):
        ax.plot(budgets, [100 * out["budgets"][str(t)]["summary"]["saved"][fam] for t in budgets],
                style, label=fam)
    ax.set_xscale("log")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("budget T (steps)")
    ax.set_ylabel("budget saved (%)")
    ax.set_title(f"{w}: steps to the raw target")
    ax.legend()
    fig.tight_layout()
    paths.append(os.path.join(directory, f"{w}-saved-vs-budget.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    largest = out["budgets"][str(budgets[-1])]
    s, run0 = largest["summary"], largest["runs"][0]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    shown = []
    for n, style in (("raw", "-"), (s["best"]["ema"], "--"), (s["best"]["lawa"], ":")):
        xs, ys = zip(*run0["decay"][n])
        ax.plot(xs, ys, style, label=f"{n}, cosine")
        shown += ys
    if "constant" in run0:
        xs, ys = zip(*run0["constant"]["raw"])
        ax.plot(xs, ys, "-", alpha=0.5, label="raw, constant LR")
        shown += ys
        xs, ys = zip(*run0["constant"][s["best"]["ema"]])
        ax.plot(xs, ys, "--", alpha=0.5, label=f"{s['best']['ema']}, constant LR")
        shown += ys
    ax.axhline(s["targets"][0], color="grey", lw=0.8)
    lo = min(shown)
    ax.set_ylim(lo * 0.98, lo * 1.3)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title(f"{w}, T = {s['T']}, seed 0")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(directory, f"{w}-curves.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    if out["noise"]:
        batches = sorted({r["batch"] for r in out["noise"].values()})
        lrs = sorted({r["lr"] for r in out["noise"].values()})
        fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
        for ax, fam in zip(axes, ("ema", "lawa")):
            grid = [[next(100 * r["summary"]["saved"][fam] for r in out["noise"].values()
                          if r["batch"] == b and r["lr"] == lr) for lr in lrs] for b in batches]
            im = ax.imshow(grid, cmap="viridis", origin="lower")
            ax.set_xticks(range(len(lrs)), [f"{x:.2g}" for x in lrs])
            ax.set_yticks(range(len(batches)), [str(b) for b in batches])
            ax.set_xlabel("peak LR")
            ax.set_ylabel("batch")
            ax.set_title(f"{fam}: budget saved (%)")
            for i, row in enumerate(grid):
                for j, v in enumerate(row):
                    ax.text(j, i, f"{v:.0f}", ha="center", va="center", color="w", fontsize=8)
            fig.colorbar(im, ax=ax)
        fig.tight_layout()
        paths.append(os.path.join(directory, f"{w}-noise-sweep.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small budgets (< 1 min): a pipeline check")
    p.add_argument("--workload", default="teacher-fresh", choices=sorted(WORKLOADS))
    p.add_argument("--budgets", default=None, help="comma-separated step budgets")
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--noise-budget", type=int, default=None)
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--plot-dir", metavar="DIR")
    args = p.parse_args(argv)
    quick = args.quick
    args.budgets = sorted(int(x) for x in (args.budgets or ("100,200" if quick else
                                                            "400,1600,6400")).split(","))
    args.seeds = args.seeds or (2 if quick else 3)
    if args.seeds < 2 or min(args.budgets) < 100:
        p.error("--seeds must be >= 2 (for a std) and every budget >= 100 (T/100 evaluations)")
    args.noise_budget = args.noise_budget or (100 if quick else 1600)
    args.noise_batches = [16, 64] if quick else [16, 64, 256]
    args.noise_lrs = [1.0, 4.0] if quick else [0.5, 2.0, 8.0]
    args.noise_seeds = 2
    args.evals = 20 if quick else 100  # evaluations per run (quick: a pipeline check)
    if args.workload == "digits" and importlib.util.find_spec("sklearn") is None:
        p.error("the digits workload needs scikit-learn (pip install scikit-learn)")
    t0 = time.perf_counter()
    out = run(args)
    report(out)
    out["seconds"] = time.perf_counter() - t0
    print(f"\n({out['seconds']:.0f} s, torch {torch.__version__}, {args.seeds} seeds"
          f"{', quick' if quick else ''})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f)
    if args.plot_dir:
        for path in plot(out, args.plot_dir):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
