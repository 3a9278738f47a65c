"""The ``offload-ema`` command."""
from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.command == "posthoc":
        return posthoc(args.snapshots, args.sigma_rel, args.step, args.out, args.verbose)
    if args.command == "consolidate":
        return consolidate(args.src, args.out, args.key)
    if args.command == "bench":
        from offload_ema import benchmark
        return benchmark.main(args)
    if args.command == "inspect":
        return inspect(args.path, args.verbose)
    return 2


def parser() -> argparse.ArgumentParser:
    """The command line: bench, inspect, consolidate, posthoc."""
    p = argparse.ArgumentParser(prog="offload-ema", description="offload_ema tools")
    sub = p.add_subparsers(dest="command", required=True)
    from offload_ema import benchmark
    b = sub.add_parser("bench", help="step-overhead benchmark (the main job)",
                       description=benchmark.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    benchmark.add_arguments(b)
    i = sub.add_parser("inspect", help="print a snapshot file's metadata and tensors")
    i.add_argument("path", help="a snapshot file (.safetensors), a sharded snapshot's index or "
                                "the name it was saved under, or a DCP checkpoint directory")
    i.add_argument("--verbose", action="store_true",
                   help="print long metadata in full (a synthesised snapshot's every source "
                        "and weight) instead of a summary")
    c = sub.add_parser(
        "consolidate", help="merge a sharded snapshot (per-rank files + index, or a "
                            "torch.distributed.checkpoint directory) into one file",
        description="Merges a sharded snapshot into one safetensors file. A "
                    "torch.distributed.checkpoint directory's .metadata is a pickle by design: "
                    "it is read with an allow list (DCP's metadata classes, sizes, dtypes), so a "
                    "crafted one is refused and runs nothing; safetensors files and indexes run "
                    "no code either way.")
    c.add_argument("src", help="the index (NAME.safetensors.index.json), the name saved under, "
                               "a DCP snapshot directory, or a DCP training checkpoint holding an "
                               "Averager (dcp.save({..., 'averager': avg}))")
    c.add_argument("out", help="the single safetensors file to write; for a training checkpoint "
                               "a directory, where each average goes to AVERAGE.safetensors")
    c.add_argument("--key", default=None,
                   help="a training checkpoint's entry holding the Averager (default: the only "
                        "one)")
    h = sub.add_parser("posthoc", help="synthesise a power EMA of another length from stored "
                                       "power-EMA snapshots (EDM2's post-hoc EMA)")
    h.add_argument("--sigma-rel", type=float, required=True, help="the target's relative width")
    h.add_argument("--step", type=int, default=None, help="default: the latest stored step")
    h.add_argument("out", help="the snapshot file to write")
    h.add_argument("snapshots", nargs="+", help="power-EMA snapshot files (or indexes)")
    h.add_argument("--verbose", action="store_true",
                   help="print every source snapshot's weight (default: the largest)")
    return p


def _weights_summary(sources, weights, verbose: bool, indent: str = "  ") -> str:
    """A post-hoc fit's weights: the largest few by magnitude (all with ``verbose``)."""
    pairs = sorted(zip(sources, weights), key=lambda p: -abs(p[1]))
    shown = pairs if verbose else pairs[:5]
    lines = [f"{indent}{w:+.4f}  {os.path.basename(str(src))}" for src, w in shown]
    if len(pairs) > len(shown):
        lines.append(f"{indent}... {len(pairs) - len(shown)} more (--verbose for all)")
    return "\n".join(lines)


def inspect(path: str, verbose: bool = False) -> int:
    from offload_ema.snapshots import load_snapshot

    try:
        tensors, meta = load_snapshot(path)
    except (OSError, ValueError) as exc:
        if os.path.isdir(path):  # not a checkpoint directory (format="dcp") either
            found = sorted(f for f in os.listdir(path)
                           if f.endswith((".safetensors", ".index.json", ".dcp")))
            print(f"offload-ema inspect: {path} is a directory, not a snapshot; " + (
                f"it holds {len(found)} snapshot file(s): {', '.join(found[:10])}"
                f"{' ...' if len(found) > 10 else ''}: give one of them (or an index)"
                if found else "it holds no snapshot files (*.safetensors, *.index.json, *.dcp)"),
                file=sys.stderr)
            return 1
        print(f"offload-ema inspect: {exc}", file=sys.stderr)
        return 1
    print(path)
    avg = meta.get("average") if isinstance(meta.get("average"), dict) else {}
    synthesised = avg.get("kind") == "posthoc_power_ema"
    for k in sorted(meta):
        value = meta[k]
        if synthesised and k == "average" and not verbose:
            value = {x: v for x, v in avg.items() if x not in ("sources", "weights")}
            value["sources"] = f"{len(avg.get('sources', []))} snapshots"
        elif synthesised and k == "applied":
            value = "- (synthesised after training from the sources' averages)"
        elif k == "passthrough" and not verbose:
            import json
            names = json.loads(value) if isinstance(value, str) else value
            value = (f"{len(names)} entries not averaged (buffers, frozen parameters): taken "
                     f"as they were{', e.g. ' + ', '.join(names[:3]) if names else ''}")
        print(f"  {k}: {value}")
    if synthesised:
        print(f"  fit ({len(avg.get('sources', []))} sources; weights sum to "
              f"{sum(avg.get('weights', [])):.4f}):")
        print(_weights_summary(avg.get("sources", []), avg.get("weights", []), verbose, "    "))
    total = sum(t.numel() for t in tensors.values())
    print(f"{len(tensors)} tensors, {total:,} elements")
    width = max((len(k) for k in tensors), default=4)
    print(f"  {'name':<{width}}  {'shape':<20} {'dtype':<9} {'norm':>12}")
    for k, t in tensors.items():
        norm = t.double().norm().item() if t.is_floating_point() else float("nan")
        print(f"  {k:<{width}}  {str(list(t.shape)):<20} {str(t.dtype).replace('torch.', ''):<9} "
              f"{norm:>12.6g}")
    return 0



def consolidate(src: str, out: str, key=None) -> int:
    from offload_ema.snapshots import DCP_META, load_snapshot, write_atomic

    if os.path.isdir(src) and not os.path.exists(os.path.join(src, DCP_META)) and \
            os.path.exists(os.path.join(src, ".metadata")):
        return _consolidate_averager(src, out, key)
    try:
        tensors, meta = load_snapshot(src)
    except (OSError, ValueError) as exc:
        print(f"offload-ema consolidate: {exc}", file=sys.stderr)
        return 1
    import json
    flat = {k: (json.dumps(v, sort_keys=True) if isinstance(v, dict) else str(v))
            for k, v in meta.items() if k not in ("rank", "world", "shards")}
    flat["consolidated_from_world"] = str(meta.get("world", 1))
    write_atomic(out, tensors, flat)
    print(f"wrote {out}: {len(tensors)} tensors from {src}")
    return 0


def _consolidate_averager(src: str, out: str, key) -> int:
    """A training checkpoint (torch.distributed.checkpoint) holding an Averager's state: each
    average to ``out/AVERAGE.safetensors``, whole, in this process."""
    import torch

    from offload_ema import resume
    from offload_ema.snapshots import metadata, read_dcp_metadata, read_dcp_tensors, write_atomic

    try:  # only the Averager's tensors are read (not the model's, nor the optimizer's)
        key = resume.averager_key(read_dcp_metadata(src).state_dict_metadata, key)
        prefix = f"{key}." if key else ""
        averages = resume.averages_from_checkpoint(
            read_dcp_tensors(src, lambda k: k.startswith(prefix)), key)
    except (OSError, ValueError) as exc:
        print(f"offload-ema consolidate: {src}: {exc}", file=sys.stderr)
        return 1
    os.makedirs(out, exist_ok=True)
    for name, (m, tensors) in averages.items():
        path = os.path.join(out, f"{name}.safetensors")
        meta = metadata(name, m.get("config", {}), m["step"], m.get("applied", 0),
                        torch.float32)
        meta["consolidated_from"] = "torch.distributed.checkpoint"
        write_atomic(path, tensors, meta)
        print(f"wrote {path}: {len(tensors)} tensors, average {name!r} at step {m['step']} "
              f"({m.get('applied', 0)} snapshots applied)")
    return 0


def posthoc(paths, sigma_rel: float, step, out: str, verbose: bool = False) -> int:
    from offload_ema.posthoc import posthoc_ema
    from offload_ema.snapshots import metadata, write_atomic

    try:
        tensors, info = posthoc_ema(paths, sigma_rel, step, return_info=True)
    except (OSError, ValueError) as exc:
        print(f"offload-ema posthoc: {exc}", file=sys.stderr)
        return 1
    import torch
    config = {"kind": "posthoc_power_ema", "sigma_rel": sigma_rel, "gamma": info["gamma"],
              "sources": [str(p) for p in paths], "weights": info["weights"]}
    meta = metadata("posthoc", config, info["step"], 0, torch.float32)
    import json
    meta["passthrough"] = json.dumps(info["passthrough"])
    write_atomic(out, tensors, meta)
    print(f"wrote {out}")
    print(f"  sigma_rel {sigma_rel} (gamma {info['gamma']:.4g}) at step {info['step']} from "
          f"{len(paths)} snapshots; residual {info['residual']:.3g} (relative misfit of the "
          f"profile)")
    print(f"  weights (sum {sum(info['weights']):.4f}), largest first:")
    print(_weights_summary(paths, info["weights"], verbose, "    "))
    return 0


if __name__ == "__main__":
    sys.exit(main())
