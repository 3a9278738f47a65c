"""Installing as a user would: the source distribution holds what the tests need, a
non-editable install into a fresh virtual environment builds and imports the C++ kernels, and
an isolated build (plain ``pip install .``) says what to run instead."""
import os
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd, timeout, **kw):
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONPATH="")
    env.pop("PYTHONPATH")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, **kw)
    return r


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    out = tmp_path_factory.mktemp("sdist")
    r = _run([sys.executable, "setup.py", "-q", "sdist", "-d", str(out)], 300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    (path,) = out.glob("offload_ema-*.tar.gz")
    return path


def test_the_sdist_holds_the_tests_helpers_and_the_kernels_sources(sdist):
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    tests = {n for n in os.listdir(os.path.join(ROOT, "tests")) if n.endswith(".py")}
    assert {f"tests/{n}" for n in tests} <= names, sorted({f"tests/{n}" for n in tests} - names)
    for n in ("tests/helpers.py", "tests/conftest.py", "csrc/kernels.h", "csrc/simd.h",
              "csrc/kernels_isa.inc", "csrc/host_copy.cpp", "bench/yardstick.c", "setup.py",
              "pyproject.toml", "README.md", "Makefile"):
        assert n in names, n


def test_a_non_editable_install_into_a_fresh_environment_builds_and_imports_the_kernels(
        sdist, tmp_path):
    """python -m venv; pip install torch; pip install --no-build-isolation <sdist>: the
    README's install line for users (not the repository's make)."""
    import torch
    venv = tmp_path / "venv"
    r = _run([sys.executable, "-m", "venv", str(venv)], 120)
    assert r.returncode == 0, r.stderr
    py = str(venv / "bin" / "python")
    torch_spec = f"torch=={torch.__version__.split('+')[0]}"  # this machine's (a local file here)
    r = _run([py, "-m", "pip", "install", "-q", torch_spec, "setuptools>=64", "wheel", "ninja"],
             900)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _run([py, "-m", "pip", "install", "-q", "--no-build-isolation", str(sdist)], 900,
             cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    check = ("import offload_ema as oe, torch\n"
             "from offload_ema import ops\n"
             "assert ops.backend() == 'cpp', ops.backend()\n"
             "assert oe.__file__.startswith(%r), oe.__file__\n"
             "m = torch.nn.Linear(4, 4)\n"
             "opt = torch.optim.SGD(m.parameters(), lr=0.1)\n"
             "with oe.Averager(m, {'ema': oe.EMA(0.5)}) as avg:\n"
             "    avg.attach(opt)\n"
             "    m(torch.ones(2, 4)).sum().backward(); opt.step()\n"
             "    sd = avg.averaged_state_dict('ema')\n"
             "    assert torch.equal(sd['weight'], m.weight.detach())\n"
             "print('ok', ops.isa())\n") % str(venv)
    r = _run([py, "-c", check], 300, cwd=str(tmp_path))
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stdout + r.stderr[-3000:]


def test_an_isolated_build_says_how_to_install(tmp_path):
    """Plain ``pip install .`` builds in an isolated environment without torch: refused with
    the command that works, rather than a traceback (or a multi-GB second torch)."""
    r = _run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps",
              "--target", str(tmp_path / "t"), ROOT], 600, cwd=str(tmp_path))
    assert r.returncode != 0
    assert "pip install --no-build-isolation ." in r.stdout + r.stderr, r.stderr[-3000:]
