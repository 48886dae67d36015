"""The console table printer (``simulator.output.text_table``), by hand."""
from simulator.output import text_table


def test_text_table_aligns_and_rules_the_header():
    assert text_table([("metric", "p50"), ("TTFT", "1.5 s"), ("TBT", "20 ms")]).split("\n") == [
        "metric    p50", "-------------", "TTFT    1.5 s", "TBT     20 ms"]


def test_text_table_left_columns_and_no_rule():
    assert text_table([("a", "bb", "c"), ("ddd", "e", "ffff")], left=(0, -1), rule=False).split("\n") == [
        "a    bb  c", "ddd   e  ffff"]
