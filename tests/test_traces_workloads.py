"""Tests for the built-in workloads added next to sharegpt/arxiv (``conversation``, ``random``), the
``max_total_tokens`` limit on built-ins, the ``workload_changes`` record and ``qps_explicit``."""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from traces import (COLUMNS, WORKLOADS, TraceError, direct_hit_tokens, generate, load_trace, sample_sessions,
                    validate_trace)
from traces.conversation import ConversationParams


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def csv_digest(df: pd.DataFrame) -> str:
    return hashlib.sha256(df.to_csv(index=False).encode()).hexdigest()


def common_prefix(a: tuple, b: tuple) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# ------------------------------------------------------------------------------------------------------
# sharegpt / arxiv: unchanged output, limit applied afterwards
# ------------------------------------------------------------------------------------------------------

# sha256 of to_csv(index=False) of the output before max_total_tokens was applied after generation
# (commit 7a9f53b): the defaults must keep producing exactly these traces.
BEFORE = {("sharegpt", 2048, 2.0, 42): "a735eacde7b76218ad12790d4f2b98793fe70a0cc2a2aa81be3a0b970b3551f8",
          ("arxiv", 1000, 1.0, 3): "f2e404a9a0ffd57757784da2b7cf63373301793a5d3bd0a285f3fd40ca26376c"}


@pytest.mark.parametrize("spec", sorted(BEFORE))
def test_builtin_output_is_byte_identical_to_before(spec):
    name, n, qps, seed = spec
    own = {"sharegpt": 8192, "arxiv": 16384}[name]
    for limit in (None, own, 10 ** 6):
        df = load_trace(name, num_requests=n, qps=qps, seed=seed, max_total_tokens=limit)
        assert csv_digest(df) == BEFORE[spec], limit
        assert df.attrs["workload_changes"] == {"num_requests_in": n, "num_shrunk": 0, "num_dropped": 0,
                                                "max_total_tokens": limit, "examples": []}


def test_builtin_shrinks_the_same_requests():
    full = load_trace("sharegpt", num_requests=2000, qps=1.0, seed=0)
    shrunk = load_trace("sharegpt", num_requests=2000, qps=1.0, seed=0, max_total_tokens=4096)
    p, o = full["prompt_tokens"].to_numpy(), full["output_tokens"].to_numpy()
    over = p + o > 4096
    assert 100 < over.sum() < 1000
    assert np.array_equal(shrunk["prompt_tokens"][~over], p[~over])
    assert np.array_equal(shrunk["prompt_tokens"][over], np.maximum(1, p[over] * 4096 // (p[over] + o[over])))
    assert np.array_equal(shrunk["output_tokens"][over], np.maximum(1, o[over] * 4096 // (p[over] + o[over])))
    assert shrunk["arrival_s"].tolist() == full["arrival_s"].tolist()
    changes = shrunk.attrs["workload_changes"]
    assert changes["num_requests_in"] == 2000 and changes["num_shrunk"] == over.sum()
    assert changes["num_dropped"] == 0 and changes["max_total_tokens"] == 4096
    i = int(np.flatnonzero(over)[0])
    assert changes["examples"][0] == (f"request {i}: prompt {p[i]} -> {shrunk['prompt_tokens'][i]}, "
                                      f"output {o[i]} -> {shrunk['output_tokens'][i]} tokens")
    assert len(changes["examples"]) == 3


def test_builtin_drop_draws_more_and_returns_exactly_n():
    stream = generate("sharegpt", 4000, qps=1.0, seed=0)          # the same length stream, longer
    p, o = stream["prompt_tokens"].to_numpy(), stream["output_tokens"].to_numpy()
    fits = np.flatnonzero(p + o <= 4096)
    dropped = load_trace("sharegpt", num_requests=2000, qps=1.0, seed=0, max_total_tokens=4096, drop_long=True)
    assert len(dropped) == 2000
    assert np.array_equal(dropped["prompt_tokens"], p[fits[:2000]])
    assert np.array_equal(dropped["output_tokens"], o[fits[:2000]])
    full = load_trace("sharegpt", num_requests=2000, qps=1.0, seed=0)
    assert dropped["arrival_s"].tolist() == full["arrival_s"].tolist()       # arrivals for the kept N
    changes = dropped.attrs["workload_changes"]
    assert changes["num_requests_in"] == fits[1999] + 1
    assert changes["num_dropped"] == fits[1999] + 1 - 2000 > 0 and changes["num_shrunk"] == 0
    first = int(np.flatnonzero(p + o > 4096)[0])
    assert changes["examples"][0] == (f"draw {first}: dropped (prompt {p[first]} + output {o[first]} = "
                                      f"{p[first] + o[first]} > 4096 tokens)")
    with pytest.raises(TraceError) as e:
        load_trace("sharegpt", num_requests=100, qps=1.0, seed=0, max_total_tokens=3, drop_long=True)
    assert e.value.field == "max_total_tokens" and "100 needed" in str(e.value)


# ------------------------------------------------------------------------------------------------------
# random (vLLM's RandomDataset)
# ------------------------------------------------------------------------------------------------------

def test_random_default_is_fixed_length():
    df = load_trace("random", num_requests=50, qps=math.inf, seed=0)
    validate_trace(df)
    assert list(df.columns) == list(COLUMNS)
    assert (df["prompt_tokens"] == 1024).all() and (df["output_tokens"] == 128).all()
    assert (df["arrival_s"] == 0.0).all()


def test_random_lengths_within_range_as_vllm_draws_them():
    df = load_trace("random", num_requests=5000, qps=10.0, seed=3, input_len=100, output_len=10, range_ratio=0.25)
    # input [floor(75.0), ceil(125.0)] = [75, 125]; output [floor(7.5), ceil(12.5)] = [7, 13]
    assert df["prompt_tokens"].min() == 75 and df["prompt_tokens"].max() == 125
    assert df["output_tokens"].min() == 7 and df["output_tokens"].max() == 13
    rng = np.random.default_rng(3)                                # vLLM: default_rng(seed), inputs first
    assert np.array_equal(df["prompt_tokens"], rng.integers(75, 126, size=5000))
    assert np.array_equal(df["output_tokens"], rng.integers(7, 14, size=5000))
    assert df["arrival_s"].iloc[-1] == pytest.approx(500, rel=0.1)


def test_random_limit_and_errors():
    df = load_trace("random", num_requests=10, qps=1.0, seed=0, max_total_tokens=1000)
    # 1024 + 128 = 1152 > 1000: 1024*1000//1152 = 888, 128*1000//1152 = 111
    assert set(df["prompt_tokens"]) == {888} and set(df["output_tokens"]) == {111}
    assert df.attrs["workload_changes"]["num_shrunk"] == 10
    with pytest.raises(TraceError, match="max_total_tokens"):
        load_trace("random", num_requests=10, qps=1.0, seed=0, max_total_tokens=1000, drop_long=True)
    for kwargs, field in ((dict(range_ratio=1.0), "range_ratio"), (dict(range_ratio=-0.1), "range_ratio"),
                          (dict(input_len=0), "input_len"), (dict(input_len=1, range_ratio=0.5), "input_len"),
                          (dict(output_len=2.5), "output_len"), (dict(prefix_len=4), "prefix_len")):
        with pytest.raises(TraceError) as e:
            load_trace("random", num_requests=10, qps=1.0, **kwargs)
        assert e.value.field == field, kwargs


# ------------------------------------------------------------------------------------------------------
# conversation
# ------------------------------------------------------------------------------------------------------

def test_conversation_schema_and_determinism():
    a = load_trace("conversation", num_requests=600, qps=2.0, seed=5)
    b = load_trace("conversation", num_requests=600, qps=2.0, seed=5)
    c = load_trace("conversation", num_requests=600, qps=2.0, seed=6)
    validate_trace(a)
    assert list(a.columns) == [*COLUMNS, "block_hashes"] and len(a) == 600
    assert a["request_id"].tolist() == list(range(600)) and a["arrival_s"].is_monotonic_increasing
    assert a.attrs["hash_block_tokens"] == 16
    assert (a["block_hashes"].map(len) == a["prompt_tokens"] // 16).all()        # full blocks only
    assert ((a["prompt_tokens"] + a["output_tokens"]) <= 8192).all()
    assert a.to_csv(index=False) == b.to_csv(index=False) and a.attrs == b.attrs
    assert a["block_hashes"].tolist() == b["block_hashes"].tolist()
    assert a.to_csv(index=False) != c.to_csv(index=False)
    assert not set(a["block_hashes"].iloc[0]) & set(h for t in c["block_hashes"] for h in t)


def test_conversation_contents_do_not_depend_on_qps():
    rows = [sorted(zip(df["prompt_tokens"], df["output_tokens"], df["block_hashes"]))
            for df in (load_trace("conversation", num_requests=300, qps=q, seed=1) for q in (1.0, 50.0))]
    assert rows[0] == rows[1]


def test_conversation_turns_extend_the_previous_prompt():
    s = sample_sessions(3000, seed=2)
    assert len(s) == 3000 and s["session"].is_monotonic_increasing
    system_tokens = s.attrs["system_prompt_tokens"]
    for _, turns in s.groupby("session"):
        prompts, outputs, hashes = (turns["prompt_tokens"].tolist(), turns["output_tokens"].tolist(),
                                    turns["block_hashes"].tolist())
        assert turns["turn"].tolist() == list(range(len(turns)))
        assert prompts[0] > system_tokens[turns["system_prompt"].iloc[0]]
        for t in range(len(turns) - 1):
            assert prompts[t + 1] > prompts[t] + outputs[t]                      # + a new user message
            assert hashes[t + 1][: len(hashes[t])] == hashes[t]                  # turn t's blocks reused
            assert len(hashes[t + 1]) >= (prompts[t] + outputs[t]) // 16         # ...and its output's
    assert s.groupby("session").size().iloc[:-1].mean() == pytest.approx(3.5, rel=0.1)


def test_conversation_sessions_share_exactly_their_system_prompt():
    s = sample_sessions(2000, seed=4)
    system_tokens = s.attrs["system_prompt_tokens"]
    firsts = s[s["turn"] == 0].head(60)
    checked_same = checked_other = 0
    for i in range(len(firsts)):
        for j in range(i + 1, len(firsts)):
            a, b = firsts.iloc[i], firsts.iloc[j]
            shared = common_prefix(a["block_hashes"], b["block_hashes"])
            if a["system_prompt"] == b["system_prompt"]:
                assert shared == system_tokens[a["system_prompt"]] // 16
                checked_same += 1
            else:
                assert not set(a["block_hashes"]) & set(b["block_hashes"])
                checked_other += 1
    assert checked_same > 20 and checked_other > 20
    counts = s.drop_duplicates("session")["system_prompt"].value_counts()
    assert counts.idxmax() == 0                                   # rank 1 is the most popular


def test_conversation_arrivals_follow_the_previous_output():
    # qps = inf starts every session at 0; with no think time turn t+1 comes 0.02 s per output token later
    opts = dict(think_time_mean_s=0.0, response_s_per_token=0.02)
    df = load_trace("conversation", num_requests=400, qps=math.inf, seed=7, **opts)
    s = sample_sessions(400, 7, ConversationParams(**opts))
    previous = s.groupby("session")["output_tokens"].shift(fill_value=0)
    expected = (0.02 * previous).groupby(s["session"]).cumsum()
    assert np.sort(df["arrival_s"].to_numpy()) == pytest.approx(np.sort(expected.to_numpy()))
    assert (df["arrival_s"] == 0.0).sum() == s["session"].nunique()


def test_conversation_request_rate_is_qps():
    df = load_trace("conversation", num_requests=8000, qps=5.0, seed=0, think_time_mean_s=10.0)
    t = df["arrival_s"].to_numpy()
    # sessions start over about N / qps = 1600 s; count requests in the middle 800 s
    assert ((t > 400) & (t <= 1200)).sum() / 800 == pytest.approx(5.0, rel=0.06)


def test_conversation_hit_rate_reference_by_session_structure():
    df = load_trace("conversation", num_requests=500, qps=1.0, seed=9)
    hits = direct_hit_tokens(df["block_hashes"], 16, df["prompt_tokens"])
    assert (hits <= df["prompt_tokens"] - 1).all() and (hits % 16 == 0).all()
    assert 0.5 < hits.sum() / df["prompt_tokens"].sum() < 1.0


def test_conversation_limit_shrinks_or_drops():
    full = load_trace("conversation", num_requests=1000, qps=1.0, seed=3)
    over = (full["prompt_tokens"] + full["output_tokens"] > 2048).to_numpy()
    assert over.sum() > 20
    shrunk = load_trace("conversation", num_requests=1000, qps=1.0, seed=3, max_total_tokens=2048)
    assert shrunk.attrs["workload_changes"]["num_shrunk"] == over.sum()
    assert ((shrunk["prompt_tokens"] + shrunk["output_tokens"]) <= 2048).all()
    for f, h in zip(full["block_hashes"][over], shrunk["block_hashes"][over]):
        assert f[: len(h)] == h                                   # cut at the tail
    assert (shrunk["block_hashes"].map(len) == shrunk["prompt_tokens"] // 16).all()
    assert shrunk["block_hashes"][~over].tolist() == full["block_hashes"][~over].tolist()
    dropped = load_trace("conversation", num_requests=1000, qps=1.0, seed=3, max_total_tokens=2048,
                         drop_long=True)
    changes = dropped.attrs["workload_changes"]
    assert len(dropped) == 1000 and ((dropped["prompt_tokens"] + dropped["output_tokens"]) <= 2048).all()
    assert changes["num_dropped"] == changes["num_requests_in"] - 1000 > 0
    assert changes["examples"][0].startswith("session ") and "dropped" in changes["examples"][0]
    # ending sessions at the limit instead changes nothing afterwards
    short = load_trace("conversation", num_requests=500, qps=1.0, seed=3, session_max_tokens=2048,
                       max_total_tokens=2048)
    assert short.attrs["workload_changes"]["num_shrunk"] == 0


def test_conversation_bad_options():
    with pytest.raises(TraceError) as e:
        load_trace("conversation", num_requests=10, qps=1.0, mean_turns=0.5)
    assert e.value.field == "mean_turns"
    with pytest.raises(TraceError) as e:
        load_trace("conversation", num_requests=10, qps=1.0, turns=3)
    assert e.value.field == "turns" and "mean_turns" in str(e.value)
    with pytest.raises(TraceError, match="hash_block_tokens"):
        load_trace("conversation", num_requests=10, qps=1.0, hash_block_tokens=0)
    assert load_trace("conversation", num_requests=10, qps=1.0, hash_block_tokens=32).attrs["hash_block_tokens"] == 32


def test_builtin_names_and_options_for_files(tmp_path):
    assert sorted(WORKLOADS) == ["arxiv", "conversation", "random", "sharegpt"]
    with pytest.raises(TraceError) as e:
        load_trace("sharegpt", num_requests=10, qps=1.0, input_len=5)
    assert "input_len" in str(e.value) and "none" in str(e.value)
    p = write(tmp_path, "t.csv", "prompt_tokens,output_tokens\n1,1\n")
    with pytest.raises(TraceError) as e:
        load_trace(p, qps=1.0, input_len=5)
    assert str(p) in str(e.value) and e.value.field == "input_len"


# ------------------------------------------------------------------------------------------------------
# workload_changes for files, qps_explicit
# ------------------------------------------------------------------------------------------------------

def test_file_changes_are_recorded(tmp_path):
    p = write(tmp_path, "long.csv", "prompt_tokens,output_tokens,arrival_s\n"
                                    "100,50,0\n9000,1000,1\n10000,1,2\n7000,1192,3\n")
    assert load_trace(p).attrs["workload_changes"] == {"num_requests_in": 4, "num_shrunk": 0, "num_dropped": 0,
                                                       "max_total_tokens": None, "examples": []}
    assert load_trace(p, max_total_tokens=8192).attrs["workload_changes"] == {
        "num_requests_in": 4, "num_shrunk": 2, "num_dropped": 0, "max_total_tokens": 8192,
        "examples": ["line 3: prompt 9000 -> 7372, output 1000 -> 819 tokens",
                     "line 4: prompt 10000 -> 8191, output 1 -> 1 tokens"]}
    assert load_trace(p, max_total_tokens=8192, drop_long=True).attrs["workload_changes"] == {
        "num_requests_in": 4, "num_shrunk": 0, "num_dropped": 2, "max_total_tokens": 8192,
        "examples": ["line 3: dropped (prompt 9000 + output 1000 = 10000 > 8192 tokens)",
                     "line 4: dropped (prompt 10000 + output 1 = 10001 > 8192 tokens)"]}
    # only the requests returned count as shrunk
    assert load_trace(p, max_total_tokens=8192, num_requests=2).attrs["workload_changes"]["num_shrunk"] == 1


def test_qps_explicit_with_own_arrivals_is_an_error(tmp_path):
    p = write(tmp_path, "timed.csv", "prompt_tokens,output_tokens,arrival_s\n10,5,0\n20,6,1\n")
    with pytest.raises(TraceError) as e:
        load_trace(p, qps=3, qps_explicit=True)
    assert str(e.value) == (f"{p}: --qps 3 is ignored because the trace has its own arrival times; pass --retime "
                            "to re-time it to --qps, or drop --qps")
    with pytest.raises(TraceError, match="--retime"):
        load_trace(p, qps=2.5, qps_explicit=True, retime=False)
    assert load_trace(p, qps=3.0)["arrival_s"].tolist() == [0.0, 1.0]                  # not explicit: kept
    assert load_trace(p, qps=3.0, qps_explicit=True, retime=True, seed=0)["arrival_s"].iloc[0] > 0
    assert load_trace(p, qps_explicit=True)["arrival_s"].tolist() == [0.0, 1.0]        # no qps given
    q = write(tmp_path, "untimed.csv", "prompt_tokens,output_tokens\n10,5\n")
    assert len(load_trace(q, qps=3.0, qps_explicit=True, seed=0)) == 1                 # qps is used
    assert len(load_trace("sharegpt", num_requests=3, qps=3.0, qps_explicit=True)) == 3


# ------------------------------------------------------------------------------------------------------
# load_columns / TraceColumns: the same trace as numpy columns
# ------------------------------------------------------------------------------------------------------

def assert_same_trace(df: pd.DataFrame, expected: pd.DataFrame):
    pd.testing.assert_frame_equal(df, expected, check_exact=True)
    assert df.attrs == expected.attrs and list(df.attrs) == list(expected.attrs)


@pytest.mark.parametrize("spec, kwargs", [
    ("sharegpt", dict(num_requests=300, qps=2.0)),
    ("sharegpt", dict(num_requests=300, qps=2.0, max_total_tokens=2048)),
    ("arxiv", dict(num_requests=200, qps=1.0, max_total_tokens=4096, drop_long=True)),
    ("random", dict(num_requests=200, qps=math.inf, input_len=300, output_len=20, range_ratio=0.5)),
    ("conversation", dict(num_requests=200, qps=2.0, max_total_tokens=2000)),
])
def test_load_columns_is_load_trace_as_columns(spec, kwargs):
    from traces import TraceColumns, load_columns

    cols = load_columns(spec, seed=3, **kwargs)
    df = load_trace(spec, seed=3, **kwargs)
    assert isinstance(cols, TraceColumns) and len(cols) == len(df)
    assert cols.arrival_s.dtype == np.float64 and cols.prompt_tokens.dtype == cols.output_tokens.dtype == np.int64
    assert_same_trace(cols.frame(), df)
    assert_same_trace(TraceColumns.from_frame(df).frame(), df)
    assert (cols.block_hashes is not None) == (spec == "conversation")
    assert cols.hash_block_tokens == df.attrs.get("hash_block_tokens")
    assert cols.attrs["workload_changes"] == df.attrs["workload_changes"]


def test_load_columns_reads_files_like_load_trace(tmp_path):
    from traces import load_columns

    path = write(tmp_path, "t.csv", "arrival_s,prompt_tokens,output_tokens,block_hashes\n"
                                    "0.5,40,3,1 2 3\n1.0,9000,10,\n1.0,17,2,7;8\n")
    for kwargs in (dict(), dict(max_total_tokens=4096), dict(max_total_tokens=4096, drop_long=True)):
        assert_same_trace(load_columns(path, **kwargs).frame(), load_trace(path, **kwargs))
    with pytest.raises(TraceError, match="num_requests=5 but the trace has only 3"):
        load_columns(path, num_requests=5)


def test_load_columns_takes_the_arguments_of_load_trace():
    import inspect

    from traces import load_columns

    ours, theirs = inspect.signature(load_columns), inspect.signature(load_trace)
    assert list(ours.parameters.values()) == list(theirs.parameters.values())


def test_make_trace_is_make_columns_as_a_frame():
    from traces.schema import make_columns, make_trace

    arrivals, prompt, output = [2.0, 1.0, 1.0], [5, 6, 7], [1, 2, 3]
    hashes = [[1], (2, 3), []]
    df = make_trace(arrivals, prompt, output, hashes, 4)
    cols = make_columns(arrivals, prompt, output, hashes, 4)
    assert df["prompt_tokens"].tolist() == cols.prompt_tokens.tolist() == [6, 7, 5]
    assert df["block_hashes"].tolist() == cols.block_hashes == [(2, 3), (), (1,)]
    assert_same_trace(cols.frame(), df)
    assert list(df.columns) == [*COLUMNS, "block_hashes"] and df.attrs == {"hash_block_tokens": 4}
    assert make_trace([1.0], [2], [3]).dtypes.tolist() == [np.int64, np.float64, np.int64, np.int64]


def test_trace_columns_validate_like_validate_trace():
    from traces import TraceColumns
    from traces.schema import make_columns

    good = make_columns([0.0, 1.0, 2.0], [4, 5, 6], [1, 1, 1])
    assert good.validate("x") is good

    def messages(**change):
        import dataclasses

        cols = dataclasses.replace(good, **change)
        errors = []
        for check in (lambda: cols.validate("t"), lambda: validate_trace(cols.frame(), "t")):
            with pytest.raises(TraceError) as e:
                check()
            errors.append(str(e.value))
        return errors

    for change in (dict(arrival_s=np.array([0.0, -1.0, 2.0])), dict(arrival_s=np.array([0.0, 2.0, 1.0])),
                   dict(arrival_s=np.array([0.0, np.nan, 1.0])), dict(prompt_tokens=np.array([4, 0, 6])),
                   dict(output_tokens=np.array([1, 1, 2**31])),
                   dict(block_hashes=[(1,), (True,), ()], attrs={"hash_block_tokens": 4}),
                   dict(block_hashes=[(1, 2, 3), (), ()], attrs={"hash_block_tokens": 2}),
                   dict(block_hashes=[(), (), ()], attrs={"hash_block_tokens": 0})):
        ours, theirs = messages(**change)
        assert ours == theirs, change
    assert messages(prompt_tokens=np.array([4, 0, 6]))[0] == "t: row 1: prompt_tokens: must be >= 1, got np.int64(0)"
    with pytest.raises(TraceError, match="no requests"):
        make_columns([], [], []).validate("t")
    with pytest.raises(TraceError, match="prompt_tokens: must be a numpy array of shape"):
        TraceColumns(np.zeros(2), np.ones(3, dtype=np.int64), np.ones(2, dtype=np.int64)).validate("t")
    with pytest.raises(TraceError, match="arrival_s: dtype must be float"):
        TraceColumns(np.zeros(2, dtype=np.int64), np.ones(2, dtype=np.int64), np.ones(2, dtype=np.int64)).validate()
