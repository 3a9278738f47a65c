"""A short step-overhead measurement: training step time with no averaging, with offload_ema
(EMA every step), and with the naive synchronous CPU EMA, measured in one process, interleaved.

    python bench/quick_overhead.py [--width 8192 --layers 8] [--json PATH]

It is the quick check that bench/gpu_check.sh runs; the full benchmark is the main job.
"""
import argparse
import json
import statistics
import sys
import time

import torch
from torch import nn

import offload_ema as oe


def build(width, layers, device, dtype):
    torch.manual_seed(0)
    blocks = []
    for _ in range(layers):
        blocks += [nn.Linear(width, width, bias=False), nn.GELU()]
    return nn.Sequential(*blocks).to(device=device, dtype=dtype)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("--device", default=dev)
    p.add_argument("--width", type=int, default=8192 if dev == "cuda" else 256)
    p.add_argument("--layers", type=int, default=8 if dev == "cuda" else 4)
    p.add_argument("--batch", type=int, default=8192 if dev == "cuda" else 64)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json")
    a = p.parse_args(argv)
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    model = build(a.width, a.layers, a.device, dtype)
    n = sum(q.numel() for q in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    x = torch.randn(a.batch, a.width, device=a.device, dtype=dtype)

    def sync():
        if a.device == "cuda":
            torch.cuda.synchronize()

    def train_step():
        model(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    naive_acc = None

    def naive_step():
        nonlocal naive_acc
        train_step()
        host = [q.detach().float().cpu() for q in model.parameters()]
        if naive_acc is None:
            naive_acc = host
        else:
            for acc, h in zip(naive_acc, host):
                acc.lerp_(h, 1 - 0.999)

    results = {"none": [], "offload": [], "naive": []}
    avg = oe.Averager(model, {"ema": oe.EMA(0.999)})
    for _ in range(3):
        train_step()
    for _ in range(a.rounds):
        for mode in ("none", "offload", "naive"):
            if mode == "offload":
                avg.attach(opt)
            fn = naive_step if mode == "naive" else train_step
            for i in range(a.steps):
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                if i >= 3:
                    results[mode].append(time.perf_counter() - t0)
            if mode == "offload":
                avg.detach()
                avg.flush()
    st = avg.stats()
    avg.close()
    base = statistics.median(results["none"])
    rows = []
    print(f"device={a.device} params={n / 1e6:.1f}M dtype={dtype} steps={a.steps}x{a.rounds}")
    for mode, ts in results.items():
        med = statistics.median(ts)
        rows.append({"mode": mode, "step_ms_median": med * 1e3, "overhead_pct": 100 * (med / base - 1)})
        print(f"{mode:>8}: {med * 1e3:9.2f} ms/step  overhead {100 * (med / base - 1):+7.2f}%")
    print("offload stats:", {k: st[k] for k in ("snapshots_taken", "snapshots_applied",
          "snapshots_skipped", "copy_seconds", "update_seconds", "fence_wait_seconds",
          "pinned_bytes")})
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"params": n, "rows": rows, "stats": st}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
