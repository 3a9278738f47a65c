"""Framework integrations stay optional: importing offload_ema imports none of them, and an
integration whose framework is missing says which package to install."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BLOCK = (
    "import sys, importlib.abc\n"
    "class Block(importlib.abc.MetaPathFinder):\n"
    "    def find_spec(self, name, path, target=None):\n"
    "        if name.split('.')[0] in {blocked!r}: raise ImportError('blocked ' + name)\n"
    "sys.meta_path.insert(0, Block())\n"
)


def run(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


def test_importing_offload_ema_imports_no_framework():
    r = run("import sys, offload_ema, offload_ema.integrations\n"
            "print([m for m in ('lightning', 'pytorch_lightning', 'transformers', 'accelerate') "
            "if m in sys.modules])")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_missing_frameworks_give_a_clear_error():
    for module, package in (("lightning", "lightning"), ("transformers", "transformers")):
        code = BLOCK.format(blocked={"lightning", "pytorch_lightning", "transformers"}) + (
            f"try:\n    import offload_ema.integrations.{module}\n"
            "except ImportError as e:\n    print(e)\n")
        r = run(code)
        assert r.returncode == 0, r.stderr
        assert f"pip install {package}" in r.stdout, r.stdout
