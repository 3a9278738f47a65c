"""offload_ema: weight averages (EMA, LAWA) of a model under training, kept in host memory and
updated off the training step's critical path."""
from offload_ema._version import __version__
from offload_ema import ops
from offload_ema.averages import EMA, LAWA, SWA, PowerEMA
from offload_ema.averager import Averager
from offload_ema.posthoc import posthoc_ema
from offload_ema.snapshots import SnapshotFuture, apply_snapshot, load_snapshot

__all__ = ["__version__", "ops", "EMA", "PowerEMA", "SWA", "LAWA", "Averager", "posthoc_ema", "SnapshotFuture", "load_snapshot",
           "apply_snapshot"]
