"""bench/targets.py judges each speed target from a run's results: the committed results of the last
`make bench`, and the same results with one value moved across its limit (a target it cannot see move
would print "met" whatever the run measured)."""

import json
import shutil

from bench.targets import main as print_targets
from tests.conftest import ROOT

RESULTS = ROOT / "bench" / "results"


def targets_of(results, capsys, monkeypatch) -> dict[str, str]:
    """Each printed target's text (up to its value) -> its verdict."""
    monkeypatch.setattr("sys.argv", ["targets.py", "--results", str(results)])
    print_targets()
    lines = [line[2:] for line in capsys.readouterr().out.splitlines() if line.startswith("- ")]
    return {line.split(":")[0]: line.rsplit("-> ", 1)[1] for line in lines}


def copied(tmp_path):
    for name in ("bench.json", "stack_cost.json"):
        shutil.copy(RESULTS / name, tmp_path / name)
    return tmp_path


def test_every_target_is_judged_from_the_committed_run(capsys, monkeypatch):
    verdicts = targets_of(RESULTS, capsys, monkeypatch)
    assert len(verdicts) >= 14, verdicts
    assert set(verdicts.values()) <= {"met", "MISSED"}


def test_a_value_across_its_limit_changes_the_verdict(tmp_path, capsys, monkeypatch):
    results = copied(tmp_path)
    stack = json.loads((results / "stack_cost.json").read_text())
    refusal = next(r for r in stack["rows"] if r["kind"] == "refusal-401")
    bench = json.loads((results / "bench.json").read_text())
    c32 = next(r for r in bench["servers"]["predictor"] if r["concurrency"] == 32)
    for refusal_ms, p99_ms, expected in ((0.04, 99.0, "met"), (0.06, 101.0, "MISSED")):
        refusal["server_core_ms_per_request"], c32["p99_ms"] = refusal_ms, p99_ms
        (results / "stack_cost.json").write_text(json.dumps(stack))
        (results / "bench.json").write_text(json.dumps(bench))
        verdicts = targets_of(results, capsys, monkeypatch)
        assert verdicts["stack cost <= 0.05 core-ms per refusal"] == expected
        assert verdicts["p99 <= 100 ms at 32 clients"] == expected


def test_a_missing_result_is_said(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["targets.py", "--results", str(tmp_path)])
    print_targets()
    assert "bench.json: not measured in this run" in capsys.readouterr().out
