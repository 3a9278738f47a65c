"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", section 3): the average of any power-EMA length, synthesised after training from stored
snapshots of power EMAs, by least squares over their averaging profiles.

A power EMA with exponent ``gamma`` stored ``t`` steps after its start weighs the weights of
training time ``tau`` in ``[0, t]`` by ``p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)``. The
target profile (``sigma_rel`` at step ``t``) is approached by a combination ``sum_i x_i p_i``
minimising ``||sum_i x_i p_i - p_target||^2`` (inner products in closed form); the synthesised
average is ``sum_i x_i theta_i`` of the stored averages.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from offload_ema.averages import sigma_rel_to_gamma
from offload_ema.snapshots import load_snapshot

__all__ = ["posthoc_ema", "solve_weights"]


def _dot(t_a, g_a, t_b, g_b):
    """Inner product of two power profiles (broadcasting over arrays)."""
    t_min = np.minimum(t_a, t_b)
    return ((g_a + 1) * (g_b + 1) * t_min ** (g_a + g_b + 1)
            / ((g_a + g_b + 1) * t_a ** (g_a + 1) * t_b ** (g_b + 1)))


def solve_weights(times: Sequence[float], gammas: Sequence[float], target_time: float,
                  target_gamma: float) -> Tuple[np.ndarray, float]:
    """Least-squares weights of the stored profiles (``times`` since start, ``gammas``) for the
    target profile, normalised to sum to 1 as EDM2 does (every profile and the target integrate
    to 1: a combination whose weights do not sum to 1 scales the synthesised weights), and the
    fit's relative residual ``||fit - target|| / ||target||`` with those weights."""
    t = np.asarray(times, dtype=np.float64)[:, None]
    g = np.asarray(gammas, dtype=np.float64)[:, None]
    a = _dot(t, g, t.T, g.T)
    b = _dot(t[:, 0], g[:, 0], target_time, target_gamma)
    x = np.linalg.lstsq(a, b, rcond=None)[0]
    x = x / x.sum()
    target_norm2 = _dot(target_time, target_gamma, target_time, target_gamma)
    err2 = max(float(x @ a @ x - 2 * x @ b + target_norm2), 0.0)
    return x, (err2 / target_norm2) ** 0.5


def posthoc_ema(paths: Sequence[str], sigma_rel: float, step: Optional[int] = None, *,
                return_info: bool = False):
    """The power EMA of relative width ``sigma_rel`` at ``step`` (default: the latest stored),
    synthesised from snapshot files of power EMAs (``oe.PowerEMA``; any mix of gammas and
    steps; sharded snapshots by their index).

    Returns:
        ``{name: float32 tensor}`` of the averaged entries (entries that are not averaged, e.g.
        integer buffers, from the latest snapshot), or ``(state_dict, info)`` with
        ``return_info``: ``info`` has ``weights``, ``residual`` (relative), ``gamma``, ``step``,
        ``passthrough`` (the entries taken from the latest snapshot).

    Raises:
        ValueError: a file that is not a power-EMA snapshot, files of different models (names,
            shapes) or schedules (``start``), a ``step`` at which no snapshot is stored (the
            profiles end at their own steps: a profile ending in between is not spanned by
            them, as in EDM2), or ``sigma_rel`` out of range.
    """
    if not paths:
        raise ValueError("paths must name at least one power-EMA snapshot")
    target_gamma = sigma_rel_to_gamma(_check_sigma(sigma_rel))
    loaded = []
    for p in paths:
        tensors, meta = load_snapshot(p)
        avg = meta["average"]
        if avg.get("kind") != "power_ema":
            raise ValueError(f"{os.fspath(p)} holds a {avg.get('kind')!r} average; post-hoc "
                             "synthesis needs power-EMA snapshots (oe.PowerEMA)")
        loaded.append((os.fspath(p), tensors, meta))
    first_path, first, first_meta = loaded[0]
    start = first_meta["average"]["start"]
    for p, tensors, meta in loaded[1:]:
        if meta["average"]["start"] != start:
            raise ValueError(f"{p} starts at step {meta['average']['start']}, {first_path} at "
                             f"{start}: the profiles must share their start")
        if set(tensors) != set(first) or any(tensors[k].shape != first[k].shape for k in first):
            raise ValueError(f"{p} and {first_path} hold different tensors (names or shapes)")
    stored = sorted({meta["step"] for _, _, meta in loaded})
    step = stored[-1] if step is None else step
    if step not in stored or not step > start:
        shown = ", ".join(map(str, stored[:8])) + (", ..." if len(stored) > 8 else "")
        raise ValueError(f"step must be a step with a stored snapshot, after the start "
                         f"({start}): one of {shown}; got {step}")
    times = [meta["step"] - start for _, _, meta in loaded]
    gammas = [meta["average"]["gamma"] for _, _, meta in loaded]
    x, residual = solve_weights(times, gammas, step - start, target_gamma)
    latest_meta = max(loaded, key=lambda item: item[2]["step"])[2]
    latest = max(loaded, key=lambda item: item[2]["step"])[1]
    passthrough = set(json.loads(latest_meta.get("passthrough", "[]")))
    out: Dict[str, torch.Tensor] = {}
    for k, t in latest.items():
        if k in passthrough or not t.is_floating_point():  # not averaged: as last stored
            out[k] = t.clone()
            continue
        acc = torch.zeros(t.shape, dtype=torch.float64)
        for w, (_, tensors, _) in zip(x, loaded):
            acc += float(w) * tensors[k].double()
        out[k] = acc.float()
    if return_info:
        return out, {"weights": x.tolist(), "residual": residual, "gamma": target_gamma,
                     "step": step, "sigma_rel": sigma_rel, "passthrough": sorted(passthrough)}
    return out


def _check_sigma(sigma_rel) -> float:
    if isinstance(sigma_rel, bool) or not isinstance(sigma_rel, (int, float)) or not (
            0.0 < float(sigma_rel) < 12 ** -0.5):
        raise ValueError(f"sigma_rel must be in (0, {12 ** -0.5:.4f}), got {sigma_rel!r}")
    return float(sigma_rel)
