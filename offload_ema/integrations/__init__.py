"""Integrations with training frameworks. Each module imports its framework; importing
offload_ema itself never does."""


def check_callback_args(averages, swap_name, swap_arg, save_every, save_path) -> None:
    """The argument checks both framework callbacks share."""
    if swap_name is not None and swap_name not in averages:
        raise ValueError(f"{swap_arg} must name one of the averages ({', '.join(averages)}), "
                         f"got {swap_name!r}")
    if (save_every is None) != (save_path is None):
        raise ValueError("save_every and save_path go together")
