"""Tests for traces/: synthetic workloads, arrival processes, file loaders, error messages, real data."""
from __future__ import annotations

import math
import pickle
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from traces import (BUILTIN_WORKLOADS, COLUMNS, TraceError, arrival_times, detect_format, generate, load_trace,
                    validate_trace)
from traces.synthetic import refit_builtin_workloads, truncated_quantiles

SHARED_TRACES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "traces"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


CHANGE_KEYS = {"num_requests_in", "num_shrunk", "num_dropped", "max_total_tokens", "examples"}


def assert_schema(df: pd.DataFrame) -> None:
    assert list(df.columns) in (list(COLUMNS), [*COLUMNS, "block_hashes"])
    assert ("block_hashes" in df.columns) == ("hash_block_tokens" in df.attrs)
    assert set(df.attrs["workload_changes"]) == CHANGE_KEYS
    assert df["request_id"].tolist() == list(range(len(df)))
    assert df["request_id"].dtype == np.int64
    assert df["arrival_s"].dtype == np.float64
    assert df["prompt_tokens"].dtype == np.int64 and df["output_tokens"].dtype == np.int64
    assert (df["prompt_tokens"] >= 1).all() and (df["output_tokens"] >= 1).all()
    assert df["arrival_s"].is_monotonic_increasing
    validate_trace(df)


# ------------------------------------------------------------------------------------------------------
# Built-in synthetic workloads
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(BUILTIN_WORKLOADS))
def test_builtin_quantiles_match_published_table(name):
    w = BUILTIN_WORKLOADS[name]
    df = generate(name, 20_000, qps=10.0, seed=1)
    assert_schema(df)
    assert len(df) == 20_000
    for col, median, p90 in (("prompt_tokens", w.prompt_median, w.prompt_p90),
                             ("output_tokens", w.output_median, w.output_p90)):
        assert np.median(df[col]) == pytest.approx(median, rel=0.03), col
        assert np.quantile(df[col], 0.9) == pytest.approx(p90, rel=0.03), col
    assert (df["prompt_tokens"] + df["output_tokens"]).max() <= w.max_total_tokens


def test_builtin_default_max_totals_and_custom_limit():
    assert BUILTIN_WORKLOADS["sharegpt"].max_total_tokens == 8192
    assert BUILTIN_WORKLOADS["arxiv"].max_total_tokens == 16384
    df = load_trace("arxiv", num_requests=5000, qps=1.0, seed=0, max_total_tokens=4096)
    assert (df["prompt_tokens"] + df["output_tokens"]).max() <= 4096
    # drawn at arxiv's own 16384 first, then shrunk (not redrawn): most arxiv prompts exceed 4096 tokens
    unlimited = load_trace("arxiv", num_requests=5000, qps=1.0, seed=0)
    over = (unlimited["prompt_tokens"] + unlimited["output_tokens"] > 4096).sum()
    assert over > 2500 and df.attrs["workload_changes"]["num_shrunk"] == over


def test_stored_constants_are_the_fit_of_the_published_targets():
    refit = refit_builtin_workloads()
    for name, w in BUILTIN_WORKLOADS.items():
        assert refit[name] == pytest.approx(w.params, rel=1e-6), name
        q = truncated_quantiles(w.params, w.max_total_tokens)
        assert q["prompt"] == pytest.approx([w.prompt_median, w.prompt_p90], abs=0.01)
        assert q["output"] == pytest.approx([w.output_median, w.output_p90], abs=0.01)


def test_truncation_is_taken_into_account_by_the_fit():
    # The naive (untruncated) lognormal fit would put the truncated sharegpt prompt P90 far below 5696.
    w = BUILTIN_WORKLOADS["sharegpt"]
    z90 = 1.2815515655446004
    naive = (math.log(w.prompt_median), math.log(w.prompt_p90 / w.prompt_median) / z90,
             math.log(w.output_median), math.log(w.output_p90 / w.output_median) / z90)
    assert truncated_quantiles(naive, w.max_total_tokens)["prompt"][1] < 0.9 * w.prompt_p90


def test_generate_is_deterministic_and_seed_sensitive():
    a = generate("sharegpt", 2048, qps=3.0, seed=7)
    b = generate("sharegpt", 2048, qps=3.0, seed=7)
    c = generate("sharegpt", 2048, qps=3.0, seed=8)
    assert a.to_csv(index=False) == b.to_csv(index=False)
    assert a.to_csv(index=False) != c.to_csv(index=False)
    assert not np.array_equal(a["prompt_tokens"], c["prompt_tokens"])
    assert load_trace("sharegpt", num_requests=2048, qps=3.0, seed=7).to_csv() == a.to_csv()


def test_lengths_do_not_depend_on_qps_and_prefix_is_stable():
    a = generate("arxiv", 3000, qps=1.0, seed=3)
    b = generate("arxiv", 3000, qps=9.0, seed=3, arrival="gamma", cv=3.0)
    assert np.array_equal(a["prompt_tokens"], b["prompt_tokens"])
    assert np.array_equal(a["output_tokens"], b["output_tokens"])
    small = generate("arxiv", 100, qps=1.0, seed=3)
    pd.testing.assert_frame_equal(small, a.iloc[:100])


def test_generate_2048_is_fast():
    start = time.perf_counter()
    generate("sharegpt", 2048, qps=1.0, seed=0)
    assert time.perf_counter() - start < 0.5


# ------------------------------------------------------------------------------------------------------
# Arrival processes
# ------------------------------------------------------------------------------------------------------

def test_poisson_mean_gap_and_cv():
    df = generate("sharegpt", 50_000, qps=4.0, seed=11)
    gaps = np.diff(np.concatenate([[0.0], df["arrival_s"].to_numpy()]))
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)
    assert df["arrival_s"].iloc[0] > 0  # first arrival is the first gap, not t=0


@pytest.mark.parametrize("cv", [0.5, 2.0, 4.0])
def test_gamma_cv(cv):
    t = arrival_times(50_000, 2.0, np.random.default_rng(5), arrival="gamma", cv=cv)
    gaps = np.diff(np.concatenate([[0.0], t]))
    assert gaps.mean() == pytest.approx(0.5, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.08)


def test_gamma_cv1_equals_poisson_and_infinite_qps():
    a = generate("sharegpt", 500, qps=2.0, seed=1, arrival="gamma", cv=1.0)
    b = generate("sharegpt", 500, qps=2.0, seed=1)
    assert a.to_csv() == b.to_csv()
    c = generate("sharegpt", 10, qps=math.inf, seed=1)
    assert (c["arrival_s"] == 0.0).all()


@pytest.mark.parametrize("kwargs, field", [
    (dict(qps=0.0), "qps"), (dict(qps=-1.0), "qps"), (dict(qps=1.0, arrival="weibull"), "arrival"),
    (dict(qps=1.0, arrival="gamma", cv=0.0), "cv"), (dict(qps=1.0, cv=2.0), "cv"),
    (dict(qps=None), "qps"), (dict(qps=1.0, seed=-1), "seed"), (dict(qps=1.0, num_requests=0), "num_requests"),
    (dict(qps=1.0, max_total_tokens=1), "max_total_tokens"), (dict(qps=1.0, num_requests=None), "num_requests"),
])
def test_bad_options(kwargs, field):
    kwargs = {"num_requests": 10, "seed": 0, **kwargs}
    with pytest.raises(TraceError, match=field):
        load_trace("sharegpt", **kwargs)


def test_unknown_builtin_lists_known():
    with pytest.raises(TraceError) as e:
        load_trace("sharegtp", num_requests=10, qps=1.0)
    assert "sharegtp" in str(e.value) and "known: arxiv, conversation, random, sharegpt" in str(e.value)
    with pytest.raises(TraceError, match="known: arxiv, sharegpt"):
        generate("lmsys", 10, qps=1.0, seed=0)


# ------------------------------------------------------------------------------------------------------
# Loaders
# ------------------------------------------------------------------------------------------------------

def test_plain_csv_with_and_without_arrivals(tmp_path):
    p = write(tmp_path, "plain.csv", "prompt_tokens,output_tokens,arrival_s\n10,5,0.5\n20,6,0.5\n30,7,2.25\n")
    assert detect_format(p) == "csv"
    df = load_trace(p)
    assert_schema(df)
    assert df["arrival_s"].tolist() == [0.5, 0.5, 2.25]
    assert df["prompt_tokens"].tolist() == [10, 20, 30] and df["output_tokens"].tolist() == [5, 6, 7]

    q = write(tmp_path, "lengths.csv", "prompt_tokens,output_tokens\n10,5\n\n20,6\n")  # blank line skipped
    df = load_trace(q, qps=2.0, seed=0)
    assert_schema(df)
    assert df["prompt_tokens"].tolist() == [10, 20]
    with pytest.raises(TraceError) as e:
        load_trace(q)
    assert "lengths.csv" in str(e.value) and "qps" in str(e.value)


def test_sarathi_csv(tmp_path):
    p = write(tmp_path, "s.csv", "num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio,arrived_at\n"
                                 "100,10,110,10.0,0.0\n200,20,220,10.0,1.5\n")
    assert detect_format(p) == "sarathi"
    df = load_trace(p)
    assert df["arrival_s"].tolist() == [0.0, 1.5] and df["prompt_tokens"].tolist() == [100, 200]
    q = write(tmp_path, "s2.csv", "num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio\n"
                                  "100,10,110,10.0\n200,20,220,10.0\n")
    df = load_trace(q, qps=5.0, seed=1)
    assert_schema(df)
    assert df["output_tokens"].tolist() == [10, 20]


def test_azure_csv_arrivals_relative_to_first(tmp_path):
    p = write(tmp_path, "azure.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n"
                                     "2023-11-16 18:15:46.6805900,374,44\n"
                                     "2023-11-16 18:15:50.9951690,396,109\n"
                                     "2023-11-16 18:16:46.6805901,879,55\n")
    assert detect_format(p) == "azure"
    df = load_trace(p)
    assert_schema(df)
    assert df["arrival_s"].tolist() == pytest.approx([0.0, 4.314579, 60.0000001], abs=1e-9)
    assert df["prompt_tokens"].tolist() == [374, 396, 879] and df["output_tokens"].tolist() == [44, 109, 55]
    # re-timed to a QPS only when asked
    df2 = load_trace(p, qps=100.0, retime=True, seed=0)
    assert df2["arrival_s"].iloc[-1] < 1.0 and df2["prompt_tokens"].tolist() == [374, 396, 879]
    assert load_trace(p, qps=100.0)["arrival_s"].tolist() == df["arrival_s"].tolist()


def test_mooncake_jsonl(tmp_path):
    # hash_ids: one per 512 prompt tokens, ceil(6758/512) = 14, ceil(7322/512) = 15, ceil(12/512) = 1
    p = write(tmp_path, "mc.jsonl",
              '{"timestamp": 0, "input_length": 6758, "output_length": 500, "hash_ids": %s}\n'
              '{"timestamp": 1500, "input_length": 7322, "output_length": 3, "hash_ids": %s}\n\n'
              '{"timestamp": 27000, "input_length": 12, "output_length": 1, "hash_ids": [0]}\n'
              % (list(range(14)), [0] + list(range(100, 114))))
    assert detect_format(p) == "mooncake"
    df = load_trace(p)
    assert_schema(df)
    assert list(df.columns) == [*COLUMNS, "block_hashes"]
    assert df["arrival_s"].tolist() == [0.0, 1.5, 27.0]
    assert df["prompt_tokens"].tolist() == [6758, 7322, 12] and df["output_tokens"].tolist() == [500, 3, 1]
    assert df["block_hashes"].tolist() == [tuple(range(14)), (0, *range(100, 114)), (0,)]
    assert df.attrs["hash_block_tokens"] == 512
    # a Mooncake file without any hash_ids has no block_hashes column
    q = write(tmp_path, "nohash.jsonl", '{"timestamp": 0, "input_length": 12, "output_length": 1}\n')
    assert_schema(load_trace(q))


def test_csv_with_bom_crlf_and_spaces(tmp_path):
    p = tmp_path / "win.csv"
    p.write_bytes(b"\xef\xbb\xbfprompt_tokens, output_tokens ,arrival_s\r\n 5 ,6,0.5\r\n7,8,1\r\n")
    df = load_trace(p)
    assert df["prompt_tokens"].tolist() == [5, 7] and df["arrival_s"].tolist() == [0.5, 1.0]


def test_jsonl_detected_by_content(tmp_path):
    p = write(tmp_path, "trace.txt", '{"timestamp": 5, "input_length": 3, "output_length": 2}\n')
    assert detect_format(p) == "mooncake"


def test_retime_false_without_arrivals(tmp_path):
    p = write(tmp_path, "n.csv", "prompt_tokens,output_tokens\n1,1\n")
    with pytest.raises(TraceError, match="retime"):
        load_trace(p, qps=1.0, retime=False)


def test_shrink_vs_drop_over_long(tmp_path):
    p = write(tmp_path, "long.csv", "prompt_tokens,output_tokens,arrival_s\n"
                                    "100,50,0\n9000,1000,1\n10000,1,2\n7000,1192,3\n")
    shrunk = load_trace(p, max_total_tokens=8192)
    assert_schema(shrunk)
    assert shrunk["prompt_tokens"].tolist() == [100, 7372, 8191, 7000]
    assert shrunk["output_tokens"].tolist() == [50, 819, 1, 1192]
    assert ((shrunk["prompt_tokens"] + shrunk["output_tokens"]) <= 8192).all()
    # Same as the Sarathi-Serve artifact's rule: x - ceil((total - max) * x / total), clipped at 1.
    for prompt, output in ((9000, 1000), (10000, 1)):
        total = prompt + output
        expect = [max(1, x - math.ceil((total - 8192) * x / total)) for x in (prompt, output)]
        row = shrunk[shrunk["arrival_s"] == (1.0 if prompt == 9000 else 2.0)].iloc[0]
        assert [row["prompt_tokens"], row["output_tokens"]] == expect

    dropped = load_trace(p, max_total_tokens=8192, drop_long=True)
    assert_schema(dropped)
    assert dropped["prompt_tokens"].tolist() == [100, 7000]
    assert dropped["arrival_s"].tolist() == [0.0, 3.0]
    assert dropped["request_id"].tolist() == [0, 1]
    assert load_trace(p)["prompt_tokens"].tolist() == [100, 9000, 10000, 7000]  # no limit by default
    with pytest.raises(TraceError, match="max_total_tokens"):
        load_trace(p, max_total_tokens=10, drop_long=True)


def test_shuffle_is_seeded_and_keeps_arrivals(tmp_path):
    rows = "\n".join(f"{i + 1},{100 - i},{i * 0.5}" for i in range(50))
    p = write(tmp_path, "many.csv", "prompt_tokens,output_tokens,arrival_s\n" + rows + "\n")
    a = load_trace(p, shuffle=True, seed=1)
    b = load_trace(p, shuffle=True, seed=1)
    c = load_trace(p, shuffle=True, seed=2)
    plain = load_trace(p)
    assert a.to_csv() == b.to_csv() and a.to_csv() != c.to_csv()
    assert a["prompt_tokens"].tolist() != plain["prompt_tokens"].tolist()
    assert sorted(a["prompt_tokens"]) == plain["prompt_tokens"].tolist()
    assert (a["prompt_tokens"] + a["output_tokens"] == 101).all()  # pairs stay together
    assert a["arrival_s"].tolist() == plain["arrival_s"].tolist()


def test_first_n_requests(tmp_path):
    p = write(tmp_path, "n.csv", "prompt_tokens,output_tokens,arrival_s\n1,1,0\n2,2,1\n3,3,2\n4,4,3\n")
    df = load_trace(p, num_requests=3)
    assert df["prompt_tokens"].tolist() == [1, 2, 3] and df["arrival_s"].tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(TraceError) as e:
        load_trace(p, num_requests=5)
    assert "n.csv" in str(e.value) and "num_requests" in str(e.value) and "4" in str(e.value)


# ------------------------------------------------------------------------------------------------------
# Bad input: one-line messages naming file, line and field
# ------------------------------------------------------------------------------------------------------

AZURE_HEAD = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
AZ1 = "2023-11-16 18:15:46.6805900,374,44\n"
AZ2 = "2023-11-16 18:15:50.9951690,396,109\n"


@pytest.mark.parametrize("name, text, line, field, words", [
    ("zero.csv", "prompt_tokens,output_tokens\n5,5\n7,0\n", 3, "output_tokens", ">= 1"),
    ("neg.csv", "prompt_tokens,output_tokens\n-5,5\n", 2, "prompt_tokens", ">= 1"),
    ("frac.csv", "prompt_tokens,output_tokens\n5,5\n6,6\n12.5,3\n", 4, "prompt_tokens", "integer"),
    ("nan.csv", "prompt_tokens,output_tokens\n5,5\n6,\n", 3, "output_tokens", "missing"),
    ("nan2.csv", "prompt_tokens,output_tokens\n5,NaN\n", 2, "output_tokens", "missing"),
    ("text.csv", "prompt_tokens,output_tokens\n5,five\n", 2, "output_tokens", "not a finite number"),
    ("inf.csv", "prompt_tokens,output_tokens\ninf,5\n", 2, "prompt_tokens", "not a finite number"),
    ("blank_then_bad.csv", "prompt_tokens,output_tokens\n5,5\n\n0,5\n", 4, "prompt_tokens", ">= 1"),
    ("az_zero.csv", AZURE_HEAD + AZ1 + "2023-11-16 18:15:50.9951690,0,109\n", 3, "ContextTokens", ">= 1"),
    ("az_unsorted.csv", AZURE_HEAD + AZ2 + AZ1, 3, "TIMESTAMP", "line 2"),
    ("az_bad_ts.csv", AZURE_HEAD + AZ1 + "2023-13-45 99:15:50.99,396,109\n", 3, "TIMESTAMP", "malformed"),
    ("az_no_ts.csv", AZURE_HEAD + AZ1 + ",396,109\n", 3, "TIMESTAMP", "missing"),
    ("unsorted.csv", "prompt_tokens,output_tokens,arrival_s\n1,1,0\n1,1,5\n1,1,4\n", 4, "arrival_s", "line 3"),
    ("negtime.csv", "prompt_tokens,output_tokens,arrival_s\n1,1,-1\n", 2, "arrival_s", ">= 0"),
    ("s.csv", "num_prefill_tokens,num_decode_tokens,arrived_at\n1,1,0\n1,x,1\n", 3, "num_decode_tokens", "number"),
    ("bad.jsonl", '{"timestamp": 0, "input_length": 5, "output_length": 5}\n{"timestamp": 1, "input_len',
     2, None, "malformed JSON"),
    ("key.jsonl", '{"timestamp": 0, "input_length": 5, "output_length": 5}\n\n{"timestamp": 1, "input_length": 5}\n',
     3, "output_length", "input_length"),
    ("list.jsonl", "[1, 2, 3]\n", 1, None, "JSON object"),
    ("mc_unsorted.jsonl", '{"timestamp": 10, "input_length": 5, "output_length": 5}\n'
                          '{"timestamp": 3, "input_length": 5, "output_length": 5}\n', 2, "timestamp", "line 1"),
    ("mc_zero.jsonl", '{"timestamp": 0, "input_length": 0, "output_length": 5}\n', 1, "input_length", ">= 1"),
    ("ragged.csv", "prompt_tokens,output_tokens\n1,1\n\n1,1,1,1\n", 4, None, "malformed CSV"),
    ("bool.jsonl", '{"timestamp": 0, "input_length": true, "output_length": 5}\n', 1, "input_length", "number"),
    ("null.jsonl", '{"timestamp": null, "input_length": 3, "output_length": 5}\n', 1, "timestamp", "missing"),
])
def test_bad_input_messages(tmp_path, name, text, line, field, words):
    path = write(tmp_path, name, text)
    with pytest.raises(TraceError) as e:
        load_trace(path, qps=1.0)
    msg = str(e.value)
    assert "\n" not in msg
    assert str(path) in msg
    assert f"line {line}" in msg
    assert e.value.line == line
    if field is not None:
        assert field in msg and e.value.field == field
    assert words in msg


def test_missing_column_lists_columns_found(tmp_path):
    p = write(tmp_path, "az.csv", "ContextTokens,GeneratedTokens\n5,5\n")  # azure without TIMESTAMP
    p2 = write(tmp_path, "other.csv", "tokens_in,tokens_out\n5,5\n")
    for path, needle in ((p, "TIMESTAMP"), (p2, "prompt_tokens")):
        with pytest.raises(TraceError) as e:
            load_trace(path, qps=1.0)
        msg = str(e.value)
        assert str(path) in msg and "line 1" in msg and needle in msg and "\n" not in msg
    with pytest.raises(TraceError) as e:
        load_trace(p2, qps=1.0)
    assert "tokens_in" in str(e.value) and "tokens_out" in str(e.value)


@pytest.mark.parametrize("name, text", [("empty.csv", ""), ("empty.jsonl", ""), ("ws.csv", "\n\n"),
                                        ("header_only.csv", "prompt_tokens,output_tokens\n"),
                                        ("blank.jsonl", "\n  \n")])
def test_empty_files(tmp_path, name, text):
    path = write(tmp_path, name, text)
    with pytest.raises(TraceError) as e:
        load_trace(path, qps=1.0)
    assert str(path) in str(e.value) and "empty" in str(e.value)


def test_file_not_found(tmp_path):
    path = tmp_path / "nope.csv"
    with pytest.raises(TraceError) as e:
        load_trace(path, qps=1.0)
    assert str(path) in str(e.value) and "not found" in str(e.value)


def test_trace_error_is_value_error_and_pickles():
    err = TraceError("bad", "f.csv", 3, "prompt_tokens")
    assert isinstance(err, ValueError)
    assert str(err) == "f.csv: line 3: prompt_tokens: bad"
    back = pickle.loads(pickle.dumps(err))
    assert str(back) == str(err) and back.line == 3 and back.field == "prompt_tokens"


def test_validate_trace_rejects_bad_frames():
    good = generate("sharegpt", 5, qps=1.0, seed=0)
    assert validate_trace(good, "x") is good
    with pytest.raises(TraceError, match="columns"):
        validate_trace(good[["request_id", "arrival_s", "prompt_tokens"]], "x")
    bad = good.copy()
    bad.loc[3, "output_tokens"] = 0
    with pytest.raises(TraceError) as e:
        validate_trace(bad, "mytrace")
    assert "mytrace" in str(e.value) and "row 3" in str(e.value) and "output_tokens" in str(e.value)
    bad = good.copy()
    bad.loc[2, "arrival_s"] = -1.0
    with pytest.raises(TraceError, match="row 2: arrival_s"):
        validate_trace(bad, "t")
    bad = good.copy()
    bad["request_id"] = bad["request_id"] + 1
    with pytest.raises(TraceError, match="row 0: request_id"):
        validate_trace(bad, "t")
    with pytest.raises(TraceError, match="dtype"):
        validate_trace(good.astype({"prompt_tokens": float}), "t")
    with pytest.raises(TraceError, match="no requests"):
        validate_trace(good.iloc[:0], "t")


# ------------------------------------------------------------------------------------------------------
# Real shared data (skipped when absent)
# ------------------------------------------------------------------------------------------------------

def shared(name: str) -> Path:
    path = SHARED_TRACES / name
    if not path.is_file():
        pytest.skip(f"shared trace {path} not present (needs ../shared/data/traces next to the repo)")
    return path


def test_real_azure_conv_trace():
    path = shared("azure_llm_inference_2023_conv.csv")
    start = time.perf_counter()
    df = load_trace(path)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0
    assert_schema(df)
    assert len(df) == 19_366
    assert df["arrival_s"].iloc[0] == 0.0
    assert df["arrival_s"].is_monotonic_increasing
    assert 3000 < df["arrival_s"].iloc[-1] < 4000  # about an hour
    assert df["prompt_tokens"].iloc[0] == 374 and df["output_tokens"].iloc[0] == 44


def test_real_azure_code_trace_and_retime():
    path = shared("azure_llm_inference_2023_code.csv")
    df = load_trace(path, num_requests=1000, qps=5.0, retime=True, seed=0)
    assert_schema(df)
    assert len(df) == 1000
    assert df["arrival_s"].iloc[-1] == pytest.approx(200, rel=0.15)


def test_real_mooncake_trace():
    path = shared("mooncake_conversation_trace.jsonl")
    df = load_trace(path)
    assert_schema(df)
    assert len(df) == 12_031
    assert df["prompt_tokens"].iloc[0] == 6758 and df["output_tokens"].iloc[0] == 500


def test_real_sharegpt_stats_csv_matches_published_table():
    path = shared("sharegpt_8k_filtered_stats_llama2_tokenizer.csv")
    with pytest.raises(TraceError, match="qps"):
        load_trace(path)
    df = load_trace(path, qps=2.0, seed=0, max_total_tokens=8192)
    assert_schema(df)
    assert len(df) == 30_731
    w = BUILTIN_WORKLOADS["sharegpt"]
    assert np.median(df["prompt_tokens"]) == w.prompt_median
    assert np.quantile(df["prompt_tokens"], 0.9) == w.prompt_p90
    assert np.median(df["output_tokens"]) == w.output_median
    assert np.quantile(df["output_tokens"], 0.9) == w.output_p90


@pytest.mark.parametrize("text,plain", [
    ("num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio\n3772,54,3826,69.85\n2015,156,2171,12.9\n",
     True),
    ("prompt_tokens,output_tokens\r\n12,3\r\n007,1\r\n", True),
    ("\ufeffprompt_tokens , output_tokens\n5,6\n", True),
    ("prompt_tokens,output_tokens\n5,6\n\n7,8\n", False),            # a blank line: pandas reads it
    ("prompt_tokens,output_tokens\n5, 6\n", False),                   # a space: pandas reads it
    ("prompt_tokens,output_tokens,arrival_s\n5,6,0.25\n", False),     # arrival times: pandas reads them
    ("prompt_tokens,output_tokens\n5,6\n2147483647,1\n", True),       # MAX_TOKENS
])
def test_plain_csv_reader_gives_the_pandas_readers_trace(tmp_path, monkeypatch, text, plain):
    # the standard-library reader of the common case (no pandas import) and the pandas reader agree
    from traces import loaders

    path = tmp_path / "t.csv"
    path.write_text(text, encoding="utf-8")
    fmt = loaders.detect_format(path)
    assert (loaders._read_plain_csv(path, str(path), fmt) is not None) == plain
    fast = loaders.read_csv(path, fmt)
    monkeypatch.setattr(loaders, "_read_plain_csv", lambda *a: None)
    slow = loaders.read_csv(path, fmt)
    for field in ("source", "format"):
        assert getattr(fast, field) == getattr(slow, field)
    for field in ("prompt_tokens", "output_tokens", "lines"):
        assert getattr(fast, field).tolist() == getattr(slow, field).tolist()
        assert getattr(fast, field).dtype == getattr(slow, field).dtype
    assert (fast.arrival_s is None) == (slow.arrival_s is None)


def test_a_plain_csv_trace_loads_without_pandas(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "t.csv"
    path.write_text("num_prefill_tokens,num_decode_tokens\n100,10\n200,20\n")
    code = ("import sys; from traces import load_columns; "
            f"t = load_columns({str(path)!r}, qps=1.0, retime=True); "
            "assert t.prompt_tokens.tolist() == [100, 200]; print('pandas' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
