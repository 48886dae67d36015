"""Capacity regression: the shipped baseline holds, a perturbed cost constant is caught, --update rewrites it."""
import json
import shutil
from dataclasses import replace

import pytest
from click.testing import CliRunner

import cost_models.roofline as roofline
from simulator.cli import main
from simulator.cli_experiments import DEFAULT_BASELINE, compare, read_baseline

FAST = "mistral7b-a100-sharegpt-sarathi512-strict"


def test_compare_flags_moves_beyond_the_tolerance():
    entries = [{"name": "a", "capacity_qps": 2.0}, {"name": "b", "capacity_qps": 2.0},
               {"name": "c", "capacity_qps": 1.0}, {"name": "d"}]
    lines, failed = compare(entries, [2.09, 1.80, 1.0, 3.0], tolerance=0.05)
    assert failed == ["b", "d"]
    assert lines[1].split()[-2:] == ["+4.5%", "ok"] and lines[2].split()[-2:] == ["-10.0%", "MOVED"]
    assert lines[4].split()[1] == "-"


def test_shipped_baseline_is_well_formed():
    data = read_baseline(DEFAULT_BASELINE)
    assert 0 < data["tolerance"] <= 0.1 and data["search"]["rel_tol"] < data["tolerance"]
    names = [e["name"] for e in data["entries"]]
    assert len(names) == len(set(names)) >= 5 and FAST in names
    assert all(e["capacity_qps"] > 0 for e in data["entries"])


def test_regress_passes_on_main():
    out = CliRunner().invoke(main, ["regress", "--only", FAST, "--jobs", "1"])
    assert out.exit_code == 0, out.output
    assert "all 1 capacities within 5% of the baseline" in out.output


def test_regress_fails_on_a_perturbed_cost_constant(monkeypatch):
    slower = replace(roofline.RooflineConstants(), matmul_compute_eff=0.35)   # GEMMs at half the efficiency
    monkeypatch.setattr(roofline, "default_constants", lambda device_name=None: slower)
    out = CliRunner().invoke(main, ["regress", "--only", FAST, "--jobs", "1"])
    assert out.exit_code == 1
    row = next(line for line in out.output.splitlines() if line.startswith(FAST))
    assert row.endswith("MOVED") and row.split()[3].startswith("-")
    assert f"capacity regression: 1 of 1 configurations moved by more than 5% ({FAST})" in out.output
    assert "servesim regress --update" in out.output


def test_update_rewrites_only_the_numbers(tmp_path):
    path = tmp_path / "capacity.json"
    shutil.copy(DEFAULT_BASELINE, path)
    data = json.loads(path.read_text())
    true_value = next(e["capacity_qps"] for e in data["entries"] if e["name"] == FAST)
    for e in data["entries"]:
        if e["name"] == FAST:
            e["capacity_qps"] = 99.0
    path.write_text(json.dumps(data))
    bad = CliRunner().invoke(main, ["regress", "--baseline", str(path), "--only", FAST, "--jobs", "1"])
    assert bad.exit_code == 1
    ok = CliRunner().invoke(main, ["regress", "--baseline", str(path), "--only", FAST, "--jobs", "1", "--update"])
    assert ok.exit_code == 0 and "updated 1 capacities" in ok.output
    after = json.loads(path.read_text())
    assert path.read_text() == json.dumps(after, indent=2) + "\n"              # the format of the shipped file
    assert not (tmp_path / ".capacity.json.tmp").exists()                     # written atomically, no leftovers
    assert next(e["capacity_qps"] for e in after["entries"] if e["name"] == FAST) == true_value
    assert [e["point"] for e in after["entries"]] == [e["point"] for e in data["entries"]]


@pytest.mark.parametrize("content, message", [
    ("{", "not valid JSON"),
    ('{"tolerance": 0.05, "search": {}}', "missing field 'entries'"),
    ('{"tolerance": 0.05, "search": {}, "entries": [{"name": "x"}]}', r"entries\[0\]: missing field 'point'"),
])
def test_bad_baseline_is_a_one_line_error(tmp_path, content, message):
    path = tmp_path / "b.json"
    path.write_text(content)
    out = CliRunner().invoke(main, ["regress", "--baseline", str(path)])
    assert out.exit_code == 2 and out.output.startswith("error: ")
    with pytest.raises(ValueError, match=message):
        read_baseline(path)
