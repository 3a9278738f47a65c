"""The early-stopping experiment end to end in its --quick form: tables, JSON, plots."""
import json
import math

from helpers import load_bench_script


def load_script():
    return load_bench_script("early_stopping")


def test_steps_to_target_and_schedules():
    es = load_script()
    assert es.steps_to([(10, 3.0), (20, 2.0), (30, 1.5)], 2.0) == 20
    assert es.steps_to([(10, 3.0)], 2.0) is None
    T = 100
    assert es.lr_at(1, T, 1.0, "cosine") < es.lr_at(5, T, 1.0, "cosine") == 1.0  # warm-up
    assert abs(es.lr_at(T, T, 1.0, "cosine")) < 1e-12                           # decayed to 0
    assert es.lr_at(T, T, 1.0, "constant") == 1.0


def test_quick_run_writes_tables_json_and_plots(tmp_path, capsys):
    es = load_script()
    js = tmp_path / "es.json"
    assert es.main(["--quick", "--workloads", "teacher-mlp", "--json", str(js),
                    "--plot-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| weights | steps to target (mean ± std) |" in out
    assert "| weights | constant LR | cosine decay |" in out
    data = json.loads(js.read_text())
    s = data["summary"]["teacher-mlp"]
    assert len(s["targets"]) == 2
    # The raw model reaches its own final loss by the last step at the latest.
    assert all(x is not None and x <= s["T"] for x in s["rows"]["raw"]["steps_to_target"])
    assert {"ema", "lawa"} <= set(s["rows"])
    # Post-hoc EMAs from the two stored profiles stand beside the tracked ones.
    assert "| sigma_rel | post-hoc | tracked | fit residual (max) |" in out
    assert set(s["posthoc"]) == {str(x) for x in es.POSTHOC_SIGMAS}
    for r in s["posthoc"].values():
        assert math.isfinite(r["posthoc"]) and math.isfinite(r["tracked"])
        assert abs(r["posthoc"] - r["tracked"]) < 0.05 * r["tracked"]
    for name in ("teacher-mlp-curves.png", "steps-to-target.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
