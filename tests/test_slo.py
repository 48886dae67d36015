"""SLO definitions, Etalon's deadline accounting (fluidity) on hand-built token timelines, and SLO evaluation."""
import math

import numpy as np
import pytest

from cost_models.base import ConstantCostModel
from simulator.request import Request
from simulator.slo import (SLOError, certain_violation_count, deadline_misses, evaluate_slo, fluidity_per_request,
                           make_slo, paper_tbt_slo_s, token_times_table)

# Times below are multiples of 1/8 s, exact in binary floating point, so floor() sees exact quotients.


def test_all_tokens_on_time_miss_nothing():
    # first token at 0.5 s against a 1 s deadline, then 0.25 s gaps against 0.5 s decode deadlines
    assert deadline_misses(0.5, [0.25, 0.25, 0.25], ttft_deadline_s=1.0, decode_deadline_s=0.5) == (0, 4)


def test_one_long_stall_counts_as_several_misses():
    # gap 1 (0.25) banks 0.25 s of slack; the 2 s stall then misses floor((2 - 0.25) / 0.5) = 3 deadlines
    assert deadline_misses(1.0, [0.25, 2.0], ttft_deadline_s=1.0, decode_deadline_s=0.5) == (3, 2 + 3)


def test_slack_is_carried_forward():
    # the first token is 0.5 s early; that slack lets the next 0.75 s gap (> 0.5 s deadline) still meet it
    assert deadline_misses(0.5, [0.75], ttft_deadline_s=1.0, decode_deadline_s=0.5) == (0, 2)
    # without the early first token the same gap misses one deadline
    assert deadline_misses(1.0, [0.75], ttft_deadline_s=1.0, decode_deadline_s=0.5) == (1, 2)
    # slack accumulates over several early tokens: 4 x 0.125 s early, then a 0.875 s gap still meets its deadline
    assert deadline_misses(1.0, [0.375] * 4 + [0.875], ttft_deadline_s=1.0, decode_deadline_s=0.5) == (0, 6)


def test_slack_resets_after_a_miss():
    # 0.25 s slack, then a 1 s gap misses floor((1 - 0.25) / 0.5) = 1 and resets the slack to 0,
    # so the following 0.625 s gap misses too (with the old slack it would have met its deadline)
    assert deadline_misses(1.0, [0.25, 1.0, 0.625], ttft_deadline_s=1.0, decode_deadline_s=0.5) == (2, 4)


def test_late_first_token_misses_one_plus_elapsed_decode_deadlines():
    # TTFT 2.25 s against 1 s: 1 + floor(1.25 / 0.5) = 3 misses, then on-time tokens from a fresh start
    assert deadline_misses(2.25, [0.5, 0.5], ttft_deadline_s=1.0, decode_deadline_s=0.5) == (3, 5)
    assert deadline_misses(1.125, [], ttft_deadline_s=1.0, decode_deadline_s=0.5) == (1, 1)


def _request(rid, arrival, times, prompt=100, output=None):
    r = Request(rid, arrival, prompt, output or max(1, len(times)))
    r.token_times_s = list(times)
    r.scheduled_s = arrival if times else None
    return r


def test_fluidity_per_request_uses_predicted_prefill_plus_slack():
    cost = ConstantCostModel(fixed_s=0.25)             # predicted prefill 0.25 s -> first-token deadline 0.75 s
    on_time = _request(0, 10.0, [10.5, 10.75, 11.0])   # TTFT 0.5, gaps 0.25 against D_d 0.5
    stalled = _request(1, 0.0, [0.5, 2.5])             # gap 2 s after 0.25 s slack: floor(1.75 / 0.5) = 3 misses
    never = _request(2, 0.0, [], output=5)
    table = fluidity_per_request([on_time, stalled, never], cost, decode_deadline_s=0.5, ttft_slack_s=0.5)
    assert list(table["ttft_deadline_s"]) == [0.75, 0.75, 0.75]
    assert list(table["deadlines"][:2]) == [3, 4] and list(table["deadline_misses"][:2]) == [0, 3]
    assert table["fluidity_index"][0] == 1.0 and table["fluidity_index"][1] == pytest.approx(0.25)
    assert math.isnan(table["deadline_miss_rate"][2]) and table["deadlines"][2] == 0


def test_paper_slos_and_overrides():
    assert paper_tbt_slo_s("Mistral-7B") == 0.1 and paper_tbt_slo_s("mistral-7b", "relaxed") == 0.5
    assert paper_tbt_slo_s("Yi-34B", "strict") == 0.2 and paper_tbt_slo_s("Yi-34B", "relaxed") == 1.0
    assert paper_tbt_slo_s("Llama-2-70B") == 1.0 and paper_tbt_slo_s("Falcon-180B", "relaxed") == 5.0
    slo = make_slo("sarathi", model="Mistral-7B")
    assert [(lim.metric, lim.percentile, lim.max_value) for lim in slo.limits] == [
        ("tbt_s", 99, 0.1), ("scheduling_delay_s", 50, 2.0)]
    assert make_slo("sarathi", model="tiny", tbt_slo_s=0.05).limits[0].max_value == 0.05
    vidur = make_slo("vidur")
    assert [(lim.metric, lim.percentile, lim.max_value) for lim in vidur.limits] == [("scheduling_delay_s", 99, 5.0)]
    deadline = make_slo("deadline")
    assert (deadline.decode_deadline_s, deadline.ttft_slack_s) == (0.03, 0.3)
    assert deadline.limits[0].label == "deadline_miss_rate_p99" and deadline.limits[0].max_value == 0.1


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="sarathi", model="tiny"), "no TBT SLO for model 'tiny' .*; pass --tbt-slo"),
    (dict(name="fastest"), "slo: unknown 'fastest'"),
    (dict(name="sarathi", level="lenient"), "slo_level: unknown 'lenient'"),
    (dict(name="sarathi", tbt_slo_s=-1.0), "tbt_s: limit must be a positive number"),
    (dict(name="deadline", decode_deadline_s=0), "decode_deadline_s: must be positive"),
])
def test_bad_slo_settings_raise_one_line_errors(kwargs, message):
    with pytest.raises(SLOError, match=message) as info:
        make_slo(**kwargs)
    assert "\n" not in str(info.value)


def test_evaluate_slo_pools_gaps_and_uses_numpy_percentiles():
    reqs = [_request(0, 0.0, [0.5, 0.5625, 0.625]), _request(1, 1.0, [1.5, 2.0])]
    reqs[1].scheduled_s = 4.0                                   # scheduling delays 0 and 3 s -> median 1.5 s
    check = evaluate_slo(make_slo("sarathi", tbt_slo_s=0.5), reqs)
    gaps = [0.0625, 0.0625, 0.5]
    assert check.values["tbt_s_p99"] == pytest.approx(np.percentile(gaps, 99))
    assert check.values["scheduling_delay_s_p50"] == 1.5
    assert check.met is True
    assert evaluate_slo(make_slo("sarathi", tbt_slo_s=0.25), reqs).met is False
    assert evaluate_slo(make_slo("vidur"), reqs).values == {"scheduling_delay_s_p99": pytest.approx(2.97)}


def test_certain_violation_count_is_exact_for_numpy_percentiles():
    assert certain_violation_count(2048, 50) == 1025
    assert certain_violation_count(2048, 99) == 22
    for n in range(1, 120):
        for p in (0, 50, 90, 99, 99.9, 100):
            need = certain_violation_count(n, p)
            # need samples above 1.0 (however little) force the percentile above 1.0 ...
            a = np.array([0.0] * (n - need) + [1.0 + 1e-12] * need)
            assert np.percentile(a, p) > 1.0, (n, p)
            # ... and one fewer does not, for some values
            if need > 0:
                b = np.array([0.0] * (n - need + 1) + [1.0 + 1e-12] * (need - 1))
                assert np.percentile(b, p) <= 1.0, (n, p)


def test_token_times_table_lists_every_token():
    table = token_times_table([_request(3, 0.0, [1.0, 1.5]), _request(4, 0.0, [])])
    assert table.to_dict("list") == {"request_id": [3, 3], "token_index": [0, 1], "time_s": [1.0, 1.5]}


def test_vectorized_deadline_accounting_equals_the_loop():
    # the recorder's accounting (vectorized over blocks of requests of neighbouring lengths, padded) against
    # Etalon's loop, on dyadic timelines (exact sums); 300 requests of 1 to 200 tokens: several blocks, and
    # single-token requests (TTFT only) among them
    from simulator.recorder import deadline_misses_batch

    rng = np.random.default_rng(11)
    ttfts, deadlines, times, lengths, expected = [], [], [], [], []
    for j in range(300):
        gaps = (rng.integers(0, 64, int(rng.integers(0, 200)) if j % 50 else 0) / 32).tolist()
        ttft, ttft_deadline = int(rng.integers(0, 64)) / 16, int(rng.integers(0, 64)) / 16
        ttfts.append(ttft)
        deadlines.append(ttft_deadline)
        times.extend(np.concatenate(([ttft], ttft + np.cumsum(gaps))).tolist())
        lengths.append(len(gaps) + 1)
        expected.append(deadline_misses(ttft, gaps, ttft_deadline_s=ttft_deadline, decode_deadline_s=0.5))
    missed, total = deadline_misses_batch(ttfts, deadlines, times, lengths, 0.5)
    assert list(zip(missed.tolist(), total.tolist())) == expected
    assert sum(m for m, _ in expected) > 300 and min(lengths) == 1
