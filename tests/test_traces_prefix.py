"""Tests for prefix-block hashes: the mapping onto simulator KV blocks, the reference hit rate, and hashes
carried through the loaders (Mooncake ``hash_ids``, plain-CSV ``block_hashes``), shrinking and shuffling."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from traces import (COLUMNS, TraceError, block_hashes_for, direct_hit_tokens, hit_rate, load_trace, mix_hash,
                    validate_trace)
from traces.prefix import _splitmix64

SHARED_TRACES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "traces"
MASK = (1 << 64) - 1


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def py_splitmix64(x: int) -> int:
    """Pure-Python splitmix64 output function (Vigna, splitmix64.c), independent of the numpy version."""
    z = (x + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def key(trace_hash: int, j: int) -> int:
    """The documented key of simulator block j whose last token lies in the trace block of ``trace_hash``."""
    return py_splitmix64(py_splitmix64(py_splitmix64(trace_hash)) ^ py_splitmix64(j))


# ------------------------------------------------------------------------------------------------------
# The stable hash
# ------------------------------------------------------------------------------------------------------

def test_mix_hash_is_splitmix64_and_stable_across_processes():
    assert int(_splitmix64(np.array([0], dtype=np.uint64))[0]) == 0xE220A8397B1DCDAF  # splitmix64(seed 0)
    assert int(mix_hash(7, 0)[0]) == 14602521892564604090 == key(7, 0)
    assert int(mix_hash(0, 7)[0]) != int(mix_hash(7, 0)[0])                             # order matters
    assert int(mix_hash(-1, 3)[0]) == int(mix_hash(MASK, 3)[0])                          # modulo 2**64
    code = "from traces import mix_hash; print(int(mix_hash(123456789, 42)[0]))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1], env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert out.stdout == f"{key(123456789, 42)}\n" == f"{int(mix_hash(123456789, 42)[0])}\n"


# ------------------------------------------------------------------------------------------------------
# block_hashes_for: hand-computed cases
# ------------------------------------------------------------------------------------------------------

def test_block16_on_trace_blocks_of_512():
    # prompt 1100 tokens: 68 full blocks of 16 (1088 tokens); block j's last token 16j+15 lies in trace
    # block j // 32; blocks 64..67 (tokens 1024..1087) lie in the partial trace block 2.
    keys = block_hashes_for((7, 8, 9), 512, 1100, 16)
    assert len(keys) == 68
    assert keys == tuple(key(7, j) for j in range(32)) + tuple(key(8, j) for j in range(32, 64)) \
        + tuple(key(9, j) for j in range(64, 68))
    assert len(set(keys)) == 68                                   # j tells apart blocks of one trace block
    assert block_hashes_for((7, 8), 512, 1100, 16) == keys[:64]   # no hash for trace block 2: no key
    assert block_hashes_for((), 512, 1100, 16) == ()


def test_block32_on_trace_blocks_of_512():
    keys = block_hashes_for((7, 8, 9), 512, 1100, 32)            # 34 full blocks; trace block j // 16
    assert keys == tuple(key(7, j) for j in range(16)) + tuple(key(8, j) for j in range(16, 32)) \
        + (key(9, 32), key(9, 33))


def test_block16_and_32_on_trace_blocks_of_16():
    # H = b = 16: block j uses trace hash j; the partial trace block 3 (tokens 48..49) gives no full block
    assert block_hashes_for((1, 2, 3, 4), 16, 50, 16) == (key(1, 0), key(2, 1), key(3, 2))
    # b = 32, H = 16, prompt 100: 3 full blocks; block j ends at token 32j+31, in trace block 2j+1
    hashes = (10, 11, 12, 13, 14, 15, 16)                         # ceil(100 / 16) = 7
    assert block_hashes_for(hashes, 16, 100, 32) == (key(11, 0), key(13, 1), key(15, 2))
    assert block_hashes_for(hashes[:5], 16, 100, 32) == (key(11, 0), key(13, 1))   # trace block 5 missing
    # b = 8 < H = 16, prompt 40: block 4 (tokens 32..39) is full and lies in the partial trace block 2
    assert block_hashes_for((5, 6, 7), 16, 40, 8) == (key(5, 0), key(5, 1), key(6, 2), key(6, 3), key(7, 4))


def test_keys_are_shared_exactly_through_the_common_prefix():
    a = block_hashes_for((1, 2, 3), 512, 1536, 16)
    b = block_hashes_for((1, 2, 99), 512, 1536, 16)
    assert len(a) == len(b) == 96
    assert a[:64] == b[:64]                                       # trace blocks 0-1 equal: 1024 tokens shared
    assert not set(a[64:]) & set(b[64:])                          # block 2 differs, so do all its blocks


@pytest.mark.parametrize("args, field", [(((1,), 0, 16, 16), "hash_block_tokens"),
                                         (((1,), 16, 16, 0), "block_size"),
                                         (((1,), 16, 0, 16), "prompt_tokens"),
                                         (((1,), 16, 16, True), "block_size")])
def test_block_hashes_for_rejects_bad_sizes(args, field):
    with pytest.raises(TraceError) as e:
        block_hashes_for(*args)
    assert e.value.field == field


# ------------------------------------------------------------------------------------------------------
# direct_hit_tokens / hit_rate: hand-computed cases
# ------------------------------------------------------------------------------------------------------

def test_direct_hit_tokens_by_hand():
    h = 4
    requests = [
        ((1, 2, 3), 12),      # nothing seen yet -> 0
        ((1, 2, 5), 11),      # 1, 2 seen -> 2 blocks = 8; cap (11-1)//4*4 = 8 -> 8
        ((1, 2, 3), 12),      # all 3 seen -> 12, but cap (12-1)//4*4 = 8: the last block is recomputed -> 8
        ((1, 2, 3, 7), 13),   # 3 seen -> 12; cap 12 -> 12
        ((9, 2, 3), 12),      # first block new -> 0, although 2 and 3 were seen (prefix chain)
        ((), 5),              # no hashes -> 0
        ((1,), 1),            # seen, but a 1-token prompt computes its only token -> 0
    ]
    hashes, prompts = zip(*requests)
    hits = direct_hit_tokens(hashes, h, prompts)
    assert hits.dtype == np.int64
    assert hits.tolist() == [0, 8, 8, 12, 0, 0, 0]
    assert hit_rate(hashes, h, prompts) == pytest.approx(28 / 66)
    # a request's own hashes are visible only to later requests
    assert direct_hit_tokens([(1, 1)], 4, [8]).tolist() == [0]


def test_direct_hit_tokens_errors():
    with pytest.raises(TraceError, match="prompt_lens"):
        direct_hit_tokens([(1,)], 4, [4, 4])
    with pytest.raises(TraceError, match="prompt_lens"):
        direct_hit_tokens([(1,)], 4, [0])
    with pytest.raises(TraceError, match="hash_block_tokens"):
        direct_hit_tokens([(1,)], 0, [4])


# ------------------------------------------------------------------------------------------------------
# Mooncake hash_ids
# ------------------------------------------------------------------------------------------------------

def mc_line(ts: int, prompt: int, output: int, hashes) -> str:
    record = {"timestamp": ts, "input_length": prompt, "output_length": output}
    if hashes is not None:
        record["hash_ids"] = hashes
    return json.dumps(record) + "\n"


def test_mooncake_hash_ids_kept(tmp_path):
    p = write(tmp_path, "mc.jsonl", mc_line(0, 1024, 5, [1, 2]) + mc_line(10, 1025, 5, [1, 2, 3])
              + mc_line(20, 100, 5, [4]))
    df = load_trace(p)
    validate_trace(df)
    assert df["block_hashes"].tolist() == [(1, 2), (1, 2, 3), (4,)]
    assert all(type(x) is int for t in df["block_hashes"] for x in t)
    assert df.attrs["hash_block_tokens"] == 512
    # the second request hits the 1024 tokens of the first one (cap (1025-1)//512*512 = 1024)
    assert direct_hit_tokens(df["block_hashes"], 512, df["prompt_tokens"]).tolist() == [0, 1024, 0]
    with pytest.raises(TraceError, match="512"):
        load_trace(p, hash_block_tokens=16)


@pytest.mark.parametrize("name, text, line, words", [
    ("bool.jsonl", mc_line(0, 600, 5, [1, 2]) + mc_line(1, 600, 5, [1, True]), 2, "list of integers"),
    ("float.jsonl", mc_line(0, 600, 5, [1, 2.5]), 1, "list of integers"),
    ("notlist.jsonl", mc_line(0, 100, 5, 3), 1, "list of integers"),
    ("string.jsonl", mc_line(0, 100, 5, "1 2"), 1, "list of integers"),
    ("short.jsonl", mc_line(0, 512, 5, [1]) + mc_line(1, 600, 5, [1]), 2, "ceil(600 / 512) = 2"),
    ("long.jsonl", mc_line(0, 512, 5, [1, 2]), 1, "has 2 ids"),
    ("mixed.jsonl", mc_line(0, 100, 5, [1]) + "\n" + mc_line(1, 100, 5, None), 3, "missing field 'hash_ids'"),
])
def test_mooncake_bad_hash_ids(tmp_path, name, text, line, words):
    path = write(tmp_path, name, text)
    with pytest.raises(TraceError) as e:
        load_trace(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and f"line {line}" in msg and words in msg
    assert e.value.field == "hash_ids" and e.value.line == line


def test_real_mooncake_hashes_and_direct_hit_rate():
    path = SHARED_TRACES / "mooncake_conversation_trace.jsonl"
    if not path.is_file():
        pytest.skip(f"shared trace {path} not present (needs ../shared/data/traces next to the repo)")
    df = load_trace(path, num_requests=1000)
    assert list(df.columns) == [*COLUMNS, "block_hashes"] and df.attrs["hash_block_tokens"] == 512
    assert (df["block_hashes"].map(len) == -(-df["prompt_tokens"] // 512)).all()
    rate = hit_rate(df["block_hashes"], 512, df["prompt_tokens"])
    print(f"\nMooncake conversation trace, first 1000 requests: direct prefix-cache hit rate at H=512 = {rate:.4f}")
    assert 0 < rate < 1


# ------------------------------------------------------------------------------------------------------
# Plain-CSV block_hashes
# ------------------------------------------------------------------------------------------------------

CSV_HEAD = "prompt_tokens,output_tokens,arrival_s,block_hashes\n"


def test_csv_block_hashes_values(tmp_path):
    p = write(tmp_path, "h.csv", CSV_HEAD + "40,5,0,1 2 3\n20,5,1,1;9\n10,1,2,\n33,1,3, 4 ;5  6\n")
    df = load_trace(p)
    assert df["block_hashes"].tolist() == [(1, 2, 3), (1, 9), (), (4, 5, 6)]
    assert df.attrs["hash_block_tokens"] == 16                   # the default for CSV
    assert load_trace(p, hash_block_tokens=8).attrs["hash_block_tokens"] == 8
    with pytest.raises(TraceError) as e:                         # 40 tokens are ceil(40/32) = 2 blocks of 32
        load_trace(p, hash_block_tokens=32)
    assert "line 2" in str(e.value) and e.value.field == "block_hashes" and "ceil(40 / 32) = 2" in str(e.value)
    # no block_hashes column: no hashes, whatever hash_block_tokens says
    q = write(tmp_path, "plain.csv", "prompt_tokens,output_tokens,arrival_s\n40,5,0\n")
    assert list(load_trace(q, hash_block_tokens=16).columns) == list(COLUMNS)


@pytest.mark.parametrize("row, words", [("40,5,0,1 x 3", "not an integer: 'x'"), ("40,5,0,1.5", "'1.5'"),
                                        ("40,5,0,1 2 3 4", "4 hashes")])
def test_csv_bad_block_hashes(tmp_path, row, words):
    path = write(tmp_path, "bad.csv", CSV_HEAD + "16,1,0,1\n" + row + "\n")
    with pytest.raises(TraceError) as e:
        load_trace(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "line 3" in msg and words in msg
    assert e.value.field == "block_hashes"


# ------------------------------------------------------------------------------------------------------
# Hashes through shrinking, dropping, shuffling and num_requests
# ------------------------------------------------------------------------------------------------------

def test_shrinking_cuts_hashes_to_the_blocks_still_whole(tmp_path):
    # 100 + 50 > 90: prompt 100*90//150 = 60, output 50*90//150 = 30; 60 // 16 = 3 blocks remain whole
    p = write(tmp_path, "s.csv", CSV_HEAD + "100,50,0,1 2 3 4 5 6 7\n40,10,1,1 2 8\n")
    df = load_trace(p, max_total_tokens=90)
    assert df["prompt_tokens"].tolist() == [60, 40] and df["output_tokens"].tolist() == [30, 10]
    assert df["block_hashes"].tolist() == [(1, 2, 3), (1, 2, 8)]  # the unchanged request keeps its partial block
    changes = df.attrs["workload_changes"]
    assert changes == {"num_requests_in": 2, "num_shrunk": 1, "num_dropped": 0, "max_total_tokens": 90,
                       "examples": ["line 2: prompt 100 -> 60, output 50 -> 30 tokens"]}
    dropped = load_trace(p, max_total_tokens=90, drop_long=True)
    assert dropped["block_hashes"].tolist() == [(1, 2, 8)]
    assert dropped.attrs["workload_changes"]["examples"] == [
        "line 2: dropped (prompt 100 + output 50 = 150 > 90 tokens)"]


def test_shuffle_and_num_requests_carry_hashes(tmp_path):
    # each request's hashes encode its prompt length, so a mismatch after shuffling would show
    rows = "".join(f"{16 * (i + 1)},{i + 1},{i},{' '.join([str(i)] * (i + 1))}\n" for i in range(30))
    p = write(tmp_path, "many.csv", CSV_HEAD + rows)
    df = load_trace(p, shuffle=True, seed=3, num_requests=10)
    assert len(df) == 10
    assert df["prompt_tokens"].tolist() != [16 * (i + 1) for i in range(10)]       # really shuffled
    for prompt, hashes in zip(df["prompt_tokens"], df["block_hashes"]):
        i = prompt // 16 - 1
        assert hashes == (i,) * (i + 1)
    assert df["arrival_s"].tolist() == [float(i) for i in range(10)]               # arrivals stay in order


def test_validate_trace_checks_block_hashes():
    df = pd.DataFrame({"request_id": [0, 1], "arrival_s": [0.0, 1.0], "prompt_tokens": [32, 16],
                       "output_tokens": [1, 1]})
    df["block_hashes"] = pd.Series([(1, 2), ()], dtype=object)
    with pytest.raises(TraceError, match="hash_block_tokens"):
        validate_trace(df, "t")
    df.attrs["hash_block_tokens"] = 16
    assert validate_trace(df, "t") is df
    for bad, words in (([1, 2], "tuple of Python ints"), ((1, True), "tuple of Python ints"),
                       ((np.int64(1),), "tuple of Python ints"), ((1, 2, 3), "ceil(32 / 16) = 2")):
        broken = df.copy()
        broken["block_hashes"] = pd.Series([bad, ()], dtype=object)
        with pytest.raises(TraceError) as e:
            validate_trace(broken, "t")
        assert "row 0: block_hashes" in str(e.value) and words in str(e.value)
    with pytest.raises(TraceError, match="columns"):
        validate_trace(df[["request_id", "arrival_s", "prompt_tokens", "output_tokens", "block_hashes",
                           "request_id"]].set_axis([*COLUMNS, "block_hashes", "x"], axis=1), "t")
