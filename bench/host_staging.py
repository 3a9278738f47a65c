"""The CPU-only staging copy of a model with many small tensors (``--preset many``'s 10,023):
the worker's copy time per snapshot with the native multi-tensor copy planned once
(``ops.host_copy_plan``) against torch's per-tensor ``_foreach_copy_``, interleaved in one run.

    python bench/host_staging.py [--preset many] [--snapshots 30] [--rounds 5]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys

import torch

import offload_ema as oe
from offload_ema import gpt, ops


def copy_ms(model, native: bool, snapshots: int) -> float:
    """Median worker copy time per snapshot (ms), one Averager, manual steps (no training)."""
    saved = ops.host_copy_plan
    if not native:
        ops.host_copy_plan = lambda dsts, srcs: None  # the plan keeps every copy in the foreach
    try:
        avg = oe.Averager(model, {"ema": oe.EMA(0.999)}, staging_bytes=None)
    finally:
        ops.host_copy_plan = saved
    per = []
    try:
        for _ in range(snapshots):
            before = avg.stats()["copy_seconds"]
            avg.step()
            avg.flush()
            per.append((avg.stats()["copy_seconds"] - before) * 1e3)
        plan = avg._engine.staging.plans[(0, 0)]
        assert (plan.native is not None) == native, "the plan is not the one measured"
    finally:
        avg.close()
    return statistics.median(per[1:])  # the first snapshot initialises (a copy, no update)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="many", choices=sorted(gpt.PRESETS))
    p.add_argument("--snapshots", type=int, default=30)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    if ops.backend() != "cpp":
        print("the C++ extension is not built: nothing to compare")
        return 1
    torch.manual_seed(0)
    model = gpt.GPT(gpt.PRESETS[args.preset])
    n = sum(1 for p in model.parameters() if p.requires_grad)
    nbytes = sum(p.nbytes for p in model.parameters() if p.requires_grad)
    print(f"host staging copy: preset={args.preset} tensors={n:,} bytes={nbytes / 1e6:.1f} MB "
          f"cpu={platform.processor() or platform.machine()} threads={ops.get_num_threads()}")
    rows = {True: [], False: []}
    for _ in range(args.rounds):  # interleaved: drift hits both alike
        for native in (True, False):
            rows[native].append(copy_ms(model, native, args.snapshots))
    nat, fe = statistics.median(rows[True]), statistics.median(rows[False])
    print(f"  native host_copy_plan : {nat:7.3f} ms per snapshot  ({nbytes / nat / 1e6:.2f} GB/s)")
    print(f"  torch _foreach_copy_  : {fe:7.3f} ms per snapshot  ({nbytes / fe / 1e6:.2f} GB/s)")
    print(f"  speed-up {fe / nat:.1f}x (median of {args.rounds} interleaved rounds of "
          f"{args.snapshots} snapshots)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
