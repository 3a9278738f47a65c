import sys

from offload_ema.cli import main

sys.exit(main())
