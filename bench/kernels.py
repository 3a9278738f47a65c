"""Kernel benchmark: offload_ema's host-side averaging kernels against torch, side by side.

    python bench/kernels.py                 # table on stdout
    python bench/kernels.py --json k.json   # plus one record per row

Every row moves the bytes its update needs (read avg, write avg, read src; for the mean, read
every slot and write out) and `gbps` counts exactly those bytes, temporaries not included, so
rows compare as useful bandwidth. `copy_` (float32 -> float32, read + write) is the yardstick for
what this host's memory can do. All rows of one thread count run interleaved, repeat after
repeat, so drift on a shared machine hits every row alike; each row reports its median.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

from offload_ema import ops

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _cases(numel, window):
    """(op, src_dtype, impl, bytes moved, setup -> callable)."""
    cases = []
    for name, dt in DTYPES.items():
        src_bytes = dt.itemsize if hasattr(dt, "itemsize") else torch.empty(0, dtype=dt).element_size()
        ema_bytes = numel * (4 + 4 + src_bytes)

        def ours(dt=dt):
            avg, src = torch.zeros(numel), torch.randn(numel).to(dt)
            return lambda: ops.ema_update_(avg, src, 1e-3)

        cases.append(("ema_update", name, "offload_ema", ema_bytes, ours))
        if dt == torch.float32:
            def lerp(dt=dt):
                avg, src = torch.zeros(numel), torch.randn(numel)
                return lambda: avg.lerp_(src, 1e-3)
            cases.append(("ema_update", name, "torch lerp_", ema_bytes, lerp))
        else:
            def lerp_cast(dt=dt):
                avg, src = torch.zeros(numel), torch.randn(numel).to(dt)
                return lambda: avg.lerp_(src.float(), 1e-3)
            cases.append(("ema_update", name, "torch lerp_(src.float())", ema_bytes, lerp_cast))

    def multi():
        avgs = [torch.zeros(numel) for _ in range(3)]
        src = torch.randn(numel).to(torch.bfloat16)
        return lambda: ops.ema_update_multi_(avgs, src, [1e-3, 1e-4, 1e-2])
    cases.append(("ema_update_multi x3", "bfloat16", "offload_ema", numel * (3 * 8 + 2), multi))

    def multi_torch():
        avgs = [torch.zeros(numel) for _ in range(3)]
        src = torch.randn(numel).to(torch.bfloat16)

        def run():
            s = src.float()
            for a, w in zip(avgs, [1e-3, 1e-4, 1e-2]):
                a.lerp_(s, w)
        return run
    cases.append(("ema_update_multi x3", "bfloat16", "torch lerp_(src.float())", numel * (3 * 8 + 2),
                  multi_torch))

    # Four bf16 snapshots into one float32 accumulator: one pass (2 B per snapshot + 8 B) vs four
    # (4 x (2 + 8) B); the fold's traffic bound is 40 / 16 = 2.5x fewer bytes.
    def fold():
        avg = torch.zeros(numel)
        srcs = [torch.randn(numel).to(torch.bfloat16) for _ in range(4)]
        return lambda: ops.ema_fold_(avg, srcs, [1e-3] * 4)
    cases.append(("4 updates, 1 accumulator", "bfloat16", "offload_ema ema_fold_",
                  numel * (4 * 2 + 8), fold))

    def four():
        avg = torch.zeros(numel)
        srcs = [torch.randn(numel).to(torch.bfloat16) for _ in range(4)]

        def run():
            for s in srcs:
                ops.ema_update_(avg, s, 1e-3)
        return run
    cases.append(("4 updates, 1 accumulator", "bfloat16", "offload_ema ema_update_ x4",
                  numel * 4 * (2 + 8), four))

    # Three EMAs fold the same four snapshots (the engine's pass with several EMAs due): one
    # pass, 4 x 2 + 3 x 8 bytes per parameter, vs four ema_update_multi_ calls, 4 x (2 + 3 x 8).
    def fold_multi():
        avgs = [torch.zeros(numel) for _ in range(3)]
        srcs = [torch.randn(numel).to(torch.bfloat16) for _ in range(4)]
        weights = [[1e-3] * 4, [1e-4] * 4, [1e-2] * 4]
        return lambda: ops.ema_fold_multi_(avgs, srcs, weights)
    cases.append(("4 updates, 3 accumulators", "bfloat16", "offload_ema ema_fold_multi_",
                  numel * (4 * 2 + 3 * 8), fold_multi))

    def four_multi():
        avgs = [torch.zeros(numel) for _ in range(3)]
        srcs = [torch.randn(numel).to(torch.bfloat16) for _ in range(4)]

        def run():
            for s in srcs:
                ops.ema_update_multi_(avgs, s, [1e-3, 1e-4, 1e-2])
        return run
    cases.append(("4 updates, 3 accumulators", "bfloat16", "offload_ema ema_update_multi_ x4",
                  numel * 4 * (2 + 3 * 8), four_multi))

    def mean():
        out = torch.empty(numel)
        srcs = [torch.randn(numel).to(torch.bfloat16) for _ in range(window)]
        return lambda: ops.mean_(out, srcs)
    cases.append((f"mean_ of {window}", "bfloat16", "offload_ema", numel * (2 * window + 4), mean))

    def mean_torch():
        out = torch.empty(numel)
        srcs = [torch.randn(numel).to(torch.bfloat16) for _ in range(window)]
        return lambda: torch.mean(torch.stack(srcs).float(), 0, out=out)
    cases.append((f"mean_ of {window}", "bfloat16", "torch stack().float().mean()",
                  numel * (2 * window + 4), mean_torch))

    def copy():
        dst, src = torch.empty(numel), torch.randn(numel)
        return lambda: dst.copy_(src)
    cases.append(("copy_", "float32", "torch copy_", numel * 8, copy))
    return cases


def run(numel, threads_list, repeats, window):
    rows = []
    cases = _cases(numel, window)
    for threads in threads_list:
        ops.set_num_threads(threads)
        torch.set_num_threads(threads)
        fns = []
        for op, dt, impl, nbytes, setup in cases:
            fn = setup()
            fn()  # warm-up: touch every page once
            fns.append(fn)
        times = [[] for _ in cases]
        for _ in range(repeats):
            for i, fn in enumerate(fns):
                t0 = time.perf_counter()
                fn()
                times[i].append(time.perf_counter() - t0)
        for (op, dt, impl, nbytes, _), ts in zip(cases, times):
            sec = statistics.median(ts)
            rows.append({"op": op, "src_dtype": dt, "impl": impl, "numel": numel, "threads": threads,
                         "seconds": sec, "gbps": nbytes / sec / 1e9, "gparams_per_s": numel / sec / 1e9})
        del fns
    return rows


def _find(rows, threads, op, dt, impl):
    for r in rows:
        if (r["threads"], r["op"], r["src_dtype"], r["impl"]) == (threads, op, dt, impl):
            return r
    return None


def goals(rows, window):
    """The issue's goals, as ratios of rows measured in the same run."""
    out = []
    for threads in sorted({r["threads"] for r in rows}):
        ours = _find(rows, threads, "ema_update", "bfloat16", "offload_ema")
        theirs = _find(rows, threads, "ema_update", "bfloat16", "torch lerp_(src.float())")
        copy = _find(rows, threads, "copy_", "float32", "torch copy_")
        multi = _find(rows, threads, "ema_update_multi x3", "bfloat16", "offload_ema")
        fold = _find(rows, threads, "4 updates, 1 accumulator", "bfloat16", "offload_ema ema_fold_")
        four = _find(rows, threads, "4 updates, 1 accumulator", "bfloat16",
                     "offload_ema ema_update_ x4")
        checks = [
            ("bf16 EMA speed-up over torch's bf16 lerp path", theirs["seconds"] / ours["seconds"], ">=", 3.0),
            ("bf16 EMA bandwidth / copy_ bandwidth", ours["gbps"] / copy["gbps"], ">=", 0.8),
            # Memory-traffic floor of this ratio: (3 * 8 + 2) / (8 + 2) = 2.6 bytes per param.
            ("3 accumulators time / 1 accumulator time (traffic ratio 2.6)",
             multi["seconds"] / ours["seconds"], "<", 2.0),
            # Traffic bound of this ratio: 4 x (2 + 8) / (4 x 2 + 8) = 2.5.
            ("fold of 4 bf16 snapshots speed-up over 4 ema_update_ (traffic bound 2.5)",
             four["seconds"] / fold["seconds"], ">=", 2.0),
        ]
        for name, value, op, target in checks:
            ok = value >= target if op == ">=" else value < target
            out.append({"threads": threads, "goal": name, "value": value, "target": f"{op} {target}",
                        "met": ok})
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--numel", type=int, default=1 << 25, help="elements per tensor (default 2^25)")
    p.add_argument("--threads", default="1,max",
                   help="comma-separated thread counts; 'max' = ops.get_num_threads() (default 1,max)")
    p.add_argument("--repeats", type=int, default=9, help="timed repeats per row (default 9)")
    p.add_argument("--window", type=int, default=10, help="slots averaged by the mean_ rows (default 10)")
    p.add_argument("--isa", default="best", help="instruction set for the C++ kernels (default best)")
    p.add_argument("--json", metavar="PATH", help="write one record per row to PATH")
    args = p.parse_args(argv)
    if args.numel < 1 or args.repeats < 1 or args.window < 1:
        p.error("--numel, --repeats and --window must be >= 1")

    if ops.backend() == "cpp":
        ops.set_isa(args.isa)
    most = ops.get_num_threads()
    try:
        threads_list = sorted({most if t.strip() == "max" else int(t) for t in args.threads.split(",")})
    except ValueError:
        p.error(f"--threads must be integers or 'max', got {args.threads!r}")
    if threads_list[0] < 1:
        p.error("--threads must be >= 1")

    print(f"offload_ema kernels: backend={ops.backend()} isa={ops.isa()} torch={torch.__version__} "
          f"cpu={platform.processor() or platform.machine()} cpus={os.cpu_count()} "
          f"numel={args.numel:,} repeats={args.repeats}")
    rows = run(args.numel, threads_list, args.repeats, args.window)
    hdr = f"{'op':<27}{'src':<10}{'impl':<34}{'thr':>4}{'ms':>10}{'GB/s':>9}{'Gparam/s':>10}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['op']:<27}{r['src_dtype']:<10}{r['impl']:<34}{r['threads']:>4}"
              f"{r['seconds'] * 1e3:>10.2f}{r['gbps']:>9.2f}{r['gparams_per_s']:>10.3f}")
    print()
    for g in goals(rows, args.window):
        print(f"[{'met' if g['met'] else 'MISSED':>6}] threads={g['threads']:<3} {g['goal']}: "
              f"{g['value']:.2f} (goal {g['target']})")
    for threads in threads_list:  # no goal set: reported beside them
        fm = _find(rows, threads, "4 updates, 3 accumulators", "bfloat16",
                   "offload_ema ema_fold_multi_")
        um = _find(rows, threads, "4 updates, 3 accumulators", "bfloat16",
                   "offload_ema ema_update_multi_ x4")
        # Traffic bound: 4 x (2 + 3 x 8) / (4 x 2 + 3 x 8) = 3.25.
        print(f"[  info] threads={threads:<3} 3 EMAs: fold of 4 bf16 snapshots speed-up over 4 "
              f"ema_update_multi_ (traffic bound 3.25): {um['seconds'] / fm['seconds']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"wrote {len(rows)} records to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
