"""The offload-ema command: every argument explained, summaries a reader can take in."""
import argparse
import os
import subprocess
import sys

import pytest

import offload_ema as oe
from offload_ema import cli
from helpers import make, train_step


def test_every_argument_of_every_command_has_help_text():
    missing = []
    for action in cli.parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                missing += [(name, a.dest) for a in sub._actions
                            if not isinstance(a, argparse._HelpAction) and not a.help]
    assert not missing, missing


@pytest.fixture(scope="module")
def profiles(tmp_path_factory):
    """40 power-EMA snapshots (two profiles, saved every 10 of 200 steps)."""
    tmp = tmp_path_factory.mktemp("profiles")
    model, opt = make()
    paths = []
    with oe.Averager(model, {"a": oe.PowerEMA(0.05), "b": oe.PowerEMA(0.15)}) as avg:
        avg.attach(opt)
        for s in range(1, 201):
            train_step(model, opt, s)
            if s % 10 == 0:
                paths += [avg.save(tmp / f"{n}-{s:04d}.safetensors", n) for n in ("a", "b")]
        [p.result(timeout=60) for p in paths]
    return tmp, [p.path for p in paths]


def test_posthoc_prints_a_summary_not_every_weight(profiles, capsys):
    tmp, paths = profiles
    out = tmp / "synth.safetensors"
    assert cli.main(["posthoc", "--sigma-rel", "0.1", str(out), *paths]) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert max(len(line) for line in lines[1:]) <= 120, printed
    assert "residual" in printed and "weights (sum 1.0000)" in printed
    assert "... 35 more (--verbose for all)" in printed
    assert sum(".safetensors" in line for line in lines) == 1 + 5  # the file written, 5 weights
    assert cli.main(["posthoc", "--sigma-rel", "0.1", "--verbose", str(out), *paths]) == 0
    assert sum(".safetensors" in line for line in
               capsys.readouterr().out.splitlines()) == 1 + 40


def test_inspect_of_a_synthesised_snapshot_summarises_its_sources(profiles, capsys):
    tmp, paths = profiles
    out = tmp / "synth2.safetensors"
    assert cli.main(["posthoc", "--sigma-rel", "0.1", str(out), *paths]) == 0
    capsys.readouterr()
    assert cli.main(["inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "40 snapshots" in printed and "applied: 0" not in printed
    assert "synthesised after training" in printed
    assert printed.count("a-0010.safetensors") <= 1  # not every source path
    assert "entries not averaged" in printed  # passthrough, explained
    assert cli.main(["inspect", "--verbose", str(out)]) == 0
    assert capsys.readouterr().out.count(".safetensors") >= 40


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_consolidate_runs_as_a_module(tmp_path):
    model, opt = make()
    with oe.Averager(model, {"ema": oe.EMA(0.9)}) as avg:
        avg.attach(opt)
        train_step(model, opt, 1)
        avg.save(tmp_path / "ema.safetensors", "ema").result(timeout=60)
    r = subprocess.run([sys.executable, "-m", "offload_ema.cli", "consolidate",
                        str(tmp_path / "ema.safetensors"), str(tmp_path / "one.safetensors")],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    one, meta = oe.load_snapshot(tmp_path / "one.safetensors")
    assert set(one) == set(model.state_dict()) and meta["name"] == "ema"
