"""Overload detection (``simulator.metrics.load_report``) on hand-built arrival/completion times."""
import numpy as np

from simulator.metrics import load_report


def test_a_short_stable_run_is_not_overloaded_although_its_drain_is_long():
    # 40 requests one second apart, each taking 15 s: the whole-run served rate (40 / 54 s) is 74% of the
    # offered rate, but requests complete exactly as fast as they arrive.
    arrivals = np.arange(40.0)
    completions = arrivals + 15.0
    report = load_report(arrivals, completions, makespan=float(completions[-1]))
    assert report["served_qps"] < 0.8 * report["offered_qps"]
    assert not report["overloaded"] and report["reason"] is None


def test_completions_slower_than_arrivals_are_overloaded():
    # arrivals at 4 req/s, one completion every 0.5 s (2 req/s) starting after the first second
    arrivals = np.arange(40) * 0.25
    completions = 1.0 + np.arange(40) * 0.5
    report = load_report(arrivals, completions, makespan=float(completions[-1]))
    assert report["overloaded"]
    assert "the middle half of the requests completed at 2 requests/s, arriving at 4" in report["reason"]


def test_rejected_requests_are_left_out_not_counted_as_waiting_forever():
    # every other request was rejected (it can never fit): the served ones complete 2 s after arriving
    arrivals = np.arange(400.0)
    completions = arrivals + 2.0
    completions[::2] = np.nan
    report = load_report(arrivals, completions, makespan=401.0)
    assert not report["overloaded"], report
    assert report["offered_qps"] == 199 / 398
