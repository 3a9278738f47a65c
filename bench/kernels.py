"""Kernel benchmark: offload_ema's host-side averaging kernels against torch, side by side.

    python bench/kernels.py                 # table on stdout
    python bench/kernels.py --json k.json   # plus one record per row

Every row moves the bytes its update needs (read avg, write avg, read src; for the mean, read
every slot and write out) and `gbps` counts exactly those bytes, temporaries not included, so
rows compare as useful bandwidth. `copy_` (float32 -> float32, read + write) shows what this
host's memory can do. All rows of one thread count run interleaved, repeat after repeat, so drift
on a shared machine hits every row alike; each row reports its median.

Where a C compiler with OpenMP is found (``$CC``, ``cc`` or ``gcc``), ``bench/yardstick.c`` (the
same updates as plain C loops + OpenMP, -O3 -march=native) is built and run in the same rounds,
alternating with ours at each thread count: the table then gives its time beside ours, the ratio
(yardstick time / ours: >= 0.9 is the goal), and a verdict line. By default every thread count
from 1 to the kernels' (``--threads all``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

# torch's OpenMP threads (libgomp) spin-wait for milliseconds after each parallel op by default,
# taking cores from every other thread: a row timed right after a torch row would pay for it
# (measured: ema_update_ at 2 threads 11.3 ms after a torch lerp_, 7.6 ms with PASSIVE, on a
# 2-vCPU VM). Set before torch loads libgomp; the yardstick keeps its own default.
_USER_OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402 (after the OpenMP setting above)

from offload_ema import ops  # noqa: E402

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


# Our rows and the yardstick's op measuring the same update (bench/yardstick.c).
YARDSTICK_OPS = {
    ("ema_update", "bfloat16", "offload_ema"): "ema_bf16",
    ("ema_update_multi x3", "bfloat16", "offload_ema"): "multi3_bf16",
    ("4 updates, 1 accumulator", "bfloat16", "offload_ema ema_fold_"): "fold4_bf16",
    ("4 updates, 3 accumulators", "bfloat16", "offload_ema ema_fold_multi_"): "fold4x3",
}
YARDSTICK_GOAL = 0.9  # yardstick time / ours, at every thread count


def build_yardstick():
    """(path of the built yardstick, None) or (None, why not)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return None, "no C compiler found ($CC, cc, gcc)"
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "yardstick.c")
    with open(source, "rb") as f:
        key = hashlib.sha256(f.read() + cc.encode() + platform.node().encode()).hexdigest()[:16]
    out = os.path.join(tempfile.gettempdir(), f"offload_ema_yardstick_{key}")
    if not os.path.exists(out):
        tmp = f"{out}.tmp-{os.getpid()}"
        try:
            r = subprocess.run([cc, "-O3", "-fopenmp", "-march=native", "-o", tmp, source],
                               capture_output=True, text=True)
        except OSError as exc:
            return None, f"{cc} could not be run: {exc}"
        if r.returncode != 0:
            return None, f"{cc} could not build bench/yardstick.c: {r.stderr.strip()[-300:]}"
        os.replace(tmp, out)  # never a half-written binary under the final name
    return out, None


def run_yardstick(binary, numel, threads, repeats, window):
    """{op: median seconds} of one yardstick run at one thread count."""
    env = dict(os.environ)
    if _USER_OMP_WAIT_POLICY is None:
        env.pop("OMP_WAIT_POLICY", None)  # plain C + OpenMP as it runs by default
    r = subprocess.run([binary, str(numel), str(repeats), str(window), str(threads)],
                       capture_output=True, text=True, check=True, env=env)
    return {rec["op"]: rec["seconds"] for rec in map(json.loads, r.stdout.splitlines())}


def run(numel, threads_list, repeats, window, rounds=1, yardstick=None):
    """Every row at every thread count; with ``yardstick`` (a built binary) its ops too, run
    between our rounds at the same thread count (same minutes, same drift)."""
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
        ys = {}
        for _ in range(rounds):
            if yardstick is not None:
                for op, sec in run_yardstick(yardstick, numel, threads, repeats, window).items():
                    ys.setdefault(op, []).append(sec)
            for _ in range(repeats):
                for i, fn in enumerate(fns):
                    t0 = time.perf_counter()
                    fn()
                    times[i].append(time.perf_counter() - t0)
        for (op, dt, impl, nbytes, _), ts in zip(cases, times):
            sec = statistics.median(ts)
            row = {"op": op, "src_dtype": dt, "impl": impl, "numel": numel, "threads": threads,
                   "seconds": sec, "gbps": nbytes / sec / 1e9, "gparams_per_s": numel / sec / 1e9}
            y_op = YARDSTICK_OPS.get((op, dt, impl)) or (
                "mean_bf16" if op.startswith("mean_") and impl == "offload_ema" else None)
            if y_op in ys:
                row["yardstick_seconds"] = statistics.median(ys[y_op])
                row["yardstick_ratio"] = row["yardstick_seconds"] / sec
            rows.append(row)
        del fns
    return rows


def yardstick_verdict(rows):
    """(lines, met): per row with a yardstick, the worst ratio over the thread counts, and
    whether ours ever got slower with more threads (beyond 5% noise)."""
    lines, met = [], True
    keys = sorted({(r["op"], r["src_dtype"], r["impl"]) for r in rows if "yardstick_ratio" in r})
    for op, dt, impl in keys:
        mine = sorted((r for r in rows if (r["op"], r["src_dtype"], r["impl"]) == (op, dt, impl)
                       and "yardstick_ratio" in r), key=lambda r: r["threads"])
        worst = min(mine, key=lambda r: r["yardstick_ratio"])
        slower = [(a["threads"], b["threads"]) for a, b in zip(mine, mine[1:])
                  if b["seconds"] > 1.05 * a["seconds"]]
        ok = worst["yardstick_ratio"] >= YARDSTICK_GOAL and not slower
        met &= ok
        ratios = " ".join(f"{r['threads']}:{r['yardstick_ratio']:.2f}" for r in mine)
        lines.append(f"[{'met' if ok else 'MISSED':>6}] {op} {dt} ({impl}): yardstick / ours by "
                     f"threads {ratios} (goal >= {YARDSTICK_GOAL} at each)"
                     + (f"; slower with more threads at {slower}" if slower else
                        "; never slower with more threads"))
    return lines, met


def sweep(threads_list, repeats=25):
    """ema_update_ (bf16 source) and ema_update_multi_ x3 from a few KiB to ~1 GiB moved, at each
    thread count, interleaved: (rows, lines). More threads must never be slower (10% noise
    allowance): below a size extra threads do not pay, a call stays on fewer."""
    rows, lines, ok = [], [], True
    for lg in range(10, 27, 2):
        n = 1 << lg
        src = torch.randn(n).to(torch.bfloat16)
        avgs = [torch.zeros(n) for _ in range(3)]
        calls = {"ema_update_": (lambda: ops.ema_update_(avgs[0], src, 1e-3), 10),
                 "ema_update_multi_ x3": (lambda: ops.ema_update_multi_(avgs, src,
                                                                        [1e-3, 1e-4, 1e-2]), 26)}
        reps = max(3, min(repeats * 40, (repeats << 22) // n))
        for name, (fn, per_elem) in calls.items():
            times = {t: [] for t in threads_list}
            for _ in range(3):  # rounds
                for t in threads_list:
                    ops.set_num_threads(t)
                    fn()
                    ts = []
                    for _ in range(reps):
                        t0 = time.perf_counter()
                        fn()
                        ts.append(time.perf_counter() - t0)
                    times[t].append(statistics.median(ts))
            med = {t: statistics.median(v) for t, v in times.items()}
            worse = [t for a, t in zip(threads_list, threads_list[1:]) if med[t] > 1.1 * med[a]]
            ok &= not worse
            rows.append({"op": name, "numel": n, "bytes": n * per_elem,
                         **{f"us_{t}": med[t] * 1e6 for t in threads_list}})
            cells = "".join(f"{med[t] * 1e6:>11.1f}" for t in threads_list)
            lines.append(f"{name:<22}{n * per_elem / 1024:>12,.0f}{cells}"
                         + (f"   slower at {worse} threads" if worse else ""))
    head = f"{'op':<22}{'KiB moved':>12}" + "".join(f"{f'{t} thr us':>11}" for t in threads_list)
    verdict = (f"verdict: {'never' if ok else 'SOMETIMES'} slower with more threads "
               f"(threads {threads_list}, 10 KiB to 640 MiB moved)")
    return rows, [head, "-" * len(head)] + lines + [verdict]


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
    p.add_argument("--threads", default="all",
                   help="comma-separated thread counts; 'max' = ops.get_num_threads(), 'all' = "
                        "1 to max (default all)")
    p.add_argument("--repeats", type=int, default=9, help="timed repeats per row (default 9)")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds per thread count, alternating with the yardstick (default 3)")
    p.add_argument("--sweep", action="store_true",
                   help="instead: time two kernels from 10 KiB to 640 MiB moved at each thread "
                        "count (where extra threads start to pay)")
    p.add_argument("--no-yardstick", action="store_true",
                   help="do not build and run bench/yardstick.c beside the kernels")
    p.add_argument("--window", type=int, default=10, help="slots averaged by the mean_ rows (default 10)")
    p.add_argument("--isa", default="best", help="instruction set for the C++ kernels (default best)")
    p.add_argument("--json", metavar="PATH", help="write one record per row to PATH")
    args = p.parse_args(argv)
    if args.numel < 1 or args.repeats < 1 or args.window < 1 or args.rounds < 1:
        p.error("--numel, --repeats, --rounds and --window must be >= 1")

    if ops.backend() == "cpp":
        ops.set_isa(args.isa)
    most = ops.get_num_threads()
    try:
        threads_list = sorted({n for t in args.threads.split(",") for n in (
            range(1, most + 1) if t.strip() == "all" else
            [most] if t.strip() == "max" else [int(t)])})
    except ValueError:
        p.error(f"--threads must be integers or 'max', got {args.threads!r}")
    if threads_list[0] < 1:
        p.error("--threads must be >= 1")

    print(f"offload_ema kernels: backend={ops.backend()} isa={ops.isa()} torch={torch.__version__} "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')} "
          f"cpu={platform.processor() or platform.machine()} cpus={os.cpu_count()} "
          f"numel={args.numel:,} repeats={args.repeats} rounds={args.rounds}")
    if args.sweep:
        rows, lines = sweep(threads_list)
        print("\n".join(lines))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return 0
    yardstick, why = (None, "--no-yardstick") if args.no_yardstick else build_yardstick()
    print(f"yardstick: {yardstick or 'none (' + why + ')'}")
    rows = run(args.numel, threads_list, args.repeats, args.window, args.rounds, yardstick)
    hdr = (f"{'op':<27}{'src':<10}{'impl':<34}{'thr':>4}{'ms':>10}{'GB/s':>9}{'Gparam/s':>10}"
           f"{'yardstick ms':>14}{'ratio':>7}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        ys = (f"{r['yardstick_seconds'] * 1e3:>14.2f}{r['yardstick_ratio']:>7.2f}"
              if "yardstick_ratio" in r else "")
        print(f"{r['op']:<27}{r['src_dtype']:<10}{r['impl']:<34}{r['threads']:>4}"
              f"{r['seconds'] * 1e3:>10.2f}{r['gbps']:>9.2f}{r['gparams_per_s']:>10.3f}{ys}")
    print()
    if yardstick is not None:
        lines, met = yardstick_verdict(rows)
        for line in lines:
            print(line)
        print(f"verdict: {'every' if met else 'NOT every'} kernel within {YARDSTICK_GOAL}x of "
              f"plain C + OpenMP at every thread count of {threads_list} and never slower with "
              "more threads" + ("" if met else " (see the MISSED lines)"))
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
