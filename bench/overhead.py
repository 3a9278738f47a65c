"""The step-overhead benchmark; the same as ``offload-ema bench`` (see offload_ema/benchmark.py)."""
import sys

from offload_ema.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
