"""``simulate --plans``: plans.jsonl has one line per iteration row, with the same times (issue 9's plans output).

The iteration rows are streamed to disk in chunks and dropped from memory; the plans keep their own times, so
the file is complete whether or not the rows were flushed.
"""
import json

import pandas as pd
import pytest
from click.testing import CliRunner

from simulator.cli import main


@pytest.mark.parametrize("extra", [[], ["--replicas", "2"], ["--pp", "2"]])
def test_plans_jsonl_matches_iterations(tmp_path, extra):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["simulate", "--num-requests", "40", "--qps", "4", "--plans",
                                       "--out", str(out), *extra])
    assert result.exit_code == 0, result.output
    iterations = pd.read_csv(out / "iterations.csv")
    lines = [json.loads(line) for line in (out / "plans.jsonl").read_text().splitlines()]
    assert len(lines) == len(iterations) > 0
    assert [line["step"] for line in lines] == list(range(len(lines)))
    assert [line["start_s"] for line in lines] == pytest.approx(iterations["start_s"].tolist(), rel=1e-12)
    assert [line["duration_s"] for line in lines] == pytest.approx(iterations["duration_s"].tolist(), rel=1e-12)
    tokens = [sum(line["num_new_tokens"].values()) for line in lines]
    assert tokens == (iterations["num_prefill_tokens"] + iterations["num_decode_tokens"]).tolist()
    if "--replicas" in extra:
        assert [line["replica_id"] for line in lines] == iterations["replica_id"].tolist()
    requests = pd.read_csv(out / "requests.csv")
    # every request's prompt and output tokens appear in the plans: prompt + output - 1 new tokens in all
    per_request = {}
    for line in lines:
        for rid, n in line["num_new_tokens"].items():
            per_request[int(rid)] = per_request.get(int(rid), 0) + n
    expected = (requests["prompt_tokens"] + requests["output_tokens"] - 1).tolist()
    assert [per_request[r] for r in requests["request_id"]] == expected
