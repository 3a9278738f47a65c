"""bench/gpu_check.sh, dry: every step of the GPU check runs here in a reduced form, so the
script is known to work the day a GPU is lent: at most 4 files come back, and the steps' limits
fit the 5-minute plan."""
import os
import re
import subprocess
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_gpu_check_runs_dry_within_its_budget_and_returns_at_most_four_files(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, GPU_CHECK_DRY="1", OUT=str(out))
    r = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    files = sorted(os.listdir(out))
    assert 1 <= len(files) <= 4 and set(files) <= {"summary.txt", "results.json", "overhead.png",
                                                   "logs.tar.gz"}, files
    summary = (out / "summary.txt").read_text()
    budget = re.search(r"budget: step limits and kill grace (\d+) s of (\d+) s", summary)
    assert budget and int(budget.group(1)) <= int(budget.group(2)) <= 300, summary
    for name in ("env", "build", "tests", "overhead", "many"):
        assert re.search(rf"^{name} rc=0 ", summary, re.M), (name, summary)
    total = int(re.search(r"^total (\d+)s", summary, re.M).group(1))
    assert total < 300, total
    import json
    results = json.loads((out / "results.json").read_text())
    assert {"overhead", "many", "many_unpacked", "cuda_tests"} <= set(results)
    assert results["cuda_tests"]["tests"] > 0
    assert results["cuda_tests"]["failures"] == results["cuda_tests"]["errors"] == 0
    modes = {row["mode"] for row in results["overhead"]}
    assert {"none", "offload", "offload_fold", "offload_multi"} <= modes
    with tarfile.open(out / "logs.tar.gz") as tar:
        logs = {os.path.basename(n) for n in tar.getnames()}
    assert {"steps.txt", "env.txt", "build.txt", "tests.txt", "overhead.txt", "many.txt"} <= logs
