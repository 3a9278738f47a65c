"""Integrations with training frameworks. Each module imports its framework; importing
offload_ema itself never does."""
