"""The C++ kernel tables built without torch: every vector path must match the scalar path bit for
bit. Natively (the host's best instruction set) and for aarch64 under qemu (the NEON path), so
that both architectures the library supports are compiled and checked on an x86-64 CI host."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = [os.path.join(ROOT, "tests", "native", "kernel_selftest.cpp"),
           os.path.join(ROOT, "csrc", "kernels.cpp")]


def _build_and_run(compiler, out, runner=(), extra=()):
    cmd = [compiler, "-O3", "-std=c++17", "-I", os.path.join(ROOT, "csrc"), *extra, *SOURCES,
           "-o", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    r = subprocess.run([*runner, str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().endswith("OK"), r.stdout
    return r.stdout


def test_native_kernels_match_scalar(tmp_path):
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    _build_and_run(cxx, tmp_path / "selftest")


def test_neon_kernels_match_scalar_under_qemu(tmp_path):
    cxx, qemu = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")
    if cxx is None or qemu is None:
        # .ci/run installs both (Debian: g++-aarch64-linux-gnu qemu-user), so CI always runs this.
        pytest.skip("needs aarch64-linux-gnu-g++ and qemu-aarch64")
    out = _build_and_run(cxx, tmp_path / "selftest-aarch64", runner=[qemu], extra=["-static"])
    assert "best isa: neon" in out
