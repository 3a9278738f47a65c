"""The ``offload-ema`` command."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="offload-ema", description="offload_ema tools")
    sub = p.add_subparsers(dest="command", required=True)
    from offload_ema import benchmark
    b = sub.add_parser("bench", help="step-overhead benchmark (the main job)",
                       description=benchmark.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    benchmark.add_arguments(b)
    args = p.parse_args(argv)
    if args.command == "bench":
        return benchmark.main(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
