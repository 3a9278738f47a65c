"""The budget sweep end to end in its --quick form (tables, JSON, plots), and its pieces."""
import json

import pytest

from helpers import load_bench_script


def load_script():
    return load_bench_script("budget_sweep")


def test_horizons_scale_with_the_budget():
    bs = load_script()
    for T in (400, 6400):
        specs = bs.averages(T)
        h = {f: 1 / (1 - specs[f"ema_{f:g}"].beta) for f in bs.SPANS}
        for f in bs.SPANS:
            assert h[f] == pytest.approx(f * T, rel=0.02)
            lawa = specs[f"lawa_{f:g}"]
            # (at least one snapshot per step: 5 steps is the shortest 5-snapshot window)
            assert abs(lawa.window * lawa.every - f * T) <= max(0.1 * f * T, 5)


def test_summary_counts_a_run_that_never_reaches_the_target_as_the_budget():
    bs = load_script()
    curve = lambda *ys: [(10 * (i + 1), y) for i, y in enumerate(ys)]  # noqa: E731
    res = {"T": 40, "runs": [
        {"decay": {"raw": curve(3, 2, 1.5, 1.0), "ema_0.01": curve(3, 1.0, 0.9, 0.9),
                   "lawa_0.01": curve(3, 3, 3, 3)}},
        {"decay": {"raw": curve(3, 2, 1.5, 1.2), "ema_0.01": curve(3, 2, 1.1, 1.1),
                   "lawa_0.01": curve(3, 3, 1.2, 1.2)}}]}
    s = bs.summarise(res)
    assert s["rows"]["ema_0.01"]["steps"] == [20, 30]
    assert s["rows"]["lawa_0.01"]["steps"] == [None, 30]
    assert s["raw_steps"] == [40, 40]
    assert s["saved"]["ema"] == pytest.approx(1 - 25 / 40)  # vs the raw model's 40 steps
    assert s["saved"]["lawa"] == pytest.approx(1 - (40 + 30) / 2 / 40)


def test_quick_run_writes_tables_json_and_plots(tmp_path, capsys):
    bs = load_script()
    js = tmp_path / "bs.json"
    assert bs.main(["--quick", "--json", str(js), "--plot-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for head in ("| budget T | raw | best EMA", "| weights | constant LR | cosine decay |",
                 "| sigma_rel | post-hoc | tracked |", "| batch | peak LR | raw final loss |"):
        assert head in out
    data = json.loads(js.read_text())
    assert set(data["budgets"]) == {"100", "200"} and len(data["noise"]) == 4
    for res in data["budgets"].values():  # the raw model reaches its own target by the budget
        assert all(x is not None and x <= res["T"] for x in res["summary"]["raw_steps"])
    for name in ("saved-vs-budget", "curves", "noise-sweep"):
        assert (tmp_path / f"teacher-fresh-{name}.png").stat().st_size > 1000


def test_digits_is_real_data_without_download():
    pytest.importorskip("sklearn")
    bs = load_script()
    work = bs.Digits(quick=True)
    assert len(work.train[0]) + len(work.val[0]) == 1797
    assert work.evaluate(work.model()) > 0
