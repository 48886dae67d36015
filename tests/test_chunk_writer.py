"""Tables written chunk by chunk (``simulator.output.ChunkWriter``): a background thread encodes the chunks, in the
order they came, into the same bytes one write of the whole table gives; its errors reach the caller."""
import struct

import numpy as np
import pytest

from simulator.output import ChunkWriter, unboxed, write_table


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_chunks_make_the_table_one_write_makes(tmp_path, fmt):
    rng = np.random.default_rng(0)
    cols = {"start_s": np.cumsum(rng.random(5000)), "batch_size": rng.integers(1, 300, 5000)}
    writer = ChunkWriter(tmp_path / f"chunked.{fmt}", fmt)
    for lo in range(0, 5000, 700):                  # more chunks than may wait for the thread
        writer.write({k: v[lo:lo + 700] for k, v in cols.items()})
    assert not (tmp_path / f"chunked.{fmt}").exists()      # renamed into place only when closed
    writer.close()
    assert writer.rows == 5000
    if fmt == "csv":
        write_table(cols, tmp_path / "whole.csv")
        assert (tmp_path / "chunked.csv").read_bytes() == (tmp_path / "whole.csv").read_bytes()
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(tmp_path / "chunked.parquet")
        assert table.column("start_s").to_pylist() == cols["start_s"].tolist()


def test_an_error_in_the_writer_thread_reaches_the_caller(tmp_path, monkeypatch):
    calls = []
    append = ChunkWriter._append

    def failing(self, table):                       # a full disk at the second chunk
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        append(self, table)

    monkeypatch.setattr(ChunkWriter, "_append", failing)
    writer = ChunkWriter(tmp_path / "t.csv")
    with pytest.raises(OSError, match="No space left"):
        for _ in range(5):
            writer.write({"a": np.arange(3)})
        writer.close()
    assert not (tmp_path / "t.csv").exists()


def test_an_empty_writer_leaves_the_header(tmp_path):
    path = ChunkWriter(tmp_path / "e.csv").close(empty_columns={"x": [], "y": []})
    assert path.read_text() == "x,y\n"


def test_unboxed_lists_are_numpys_arrays():
    # the iteration log's lists reach the writer through struct.pack: the values numpy's own conversion gives
    rng = np.random.default_rng(3)
    floats = [*rng.random(1000).tolist(), 0, 7, 2 ** 53 + 1, -0.0, float("nan"), float("inf"), np.float64(0.1)]
    got, want = unboxed(floats), np.array(floats, dtype=float)
    assert got.dtype == np.float64 and got.tobytes() == want.tobytes()
    ints = [0, -5, 2 ** 62, *rng.integers(0, 10 ** 6, 100).tolist(), np.int64(9)]
    assert unboxed(ints, np.int64).tolist() == ints
    assert unboxed([], np.int64).shape == (0,)
    with pytest.raises(struct.error):              # a float where an integer column is expected is an error
        unboxed([1, 2.5], np.int64)
