"""The set-up commands: pip runs only for what is missing; optional extras are declared."""
import importlib.metadata
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dry_run(*args):
    if shutil.which("make") is None:
        pytest.skip("no make on PATH")
    r = subprocess.run(["make", "-n", "deps", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    # Lines that would run pip unconditionally (the torch / deepspeed lines run it only after a
    # failed lookup, "||").
    return [line for line in r.stdout.splitlines() if "pip install" in line and "||" not in line]


def test_make_deps_runs_pip_only_for_missing_packages():
    assert _dry_run() == []  # this machine has everything: no pip at all
    lines = _dry_run("PACKAGES=pytest:pytest no_such_module_xyz:no-such-dist-xyz "
                     "setuptools:setuptools>=64")
    assert len(lines) == 1 and "'no-such-dist-xyz'" in lines[0]
    assert "pytest" not in lines[0] and "setuptools" not in lines[0]
    assert not os.path.exists(os.path.join(ROOT, "=64"))  # the ">=" reached no shell redirect


def test_optional_extras_are_declared():
    extras = set(importlib.metadata.metadata("offload_ema").get_all("Provides-Extra") or [])
    assert {"lightning", "transformers", "diffusers", "bench", "test"} <= extras
