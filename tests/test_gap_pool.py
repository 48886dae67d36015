"""The pooled TBT sample past its memory bound (``recorder.GapPool``): spilled to a file, its percentiles and maximum
are the same numbers as the in-memory summary of the same pairs, its mean is the correctly rounded one and does not
depend on the order the pairs came in, and taking pairs back (a stretch rolled back) works across the spill."""
import math

import numpy as np
import pytest

from simulator.recorder import GapPool, weighted_distribution


def _sample(rng, m, *, negative=False):
    values = np.round(rng.exponential(0.03, m), int(rng.integers(2, 9)))    # many ties
    if negative:
        values = 0.01 - values
    counts = rng.integers(0, 5, m).astype(float)                            # zero counts are ignored
    return values, counts


def _pool(values, counts, spill_pairs, step=97):
    pool = GapPool(spill_pairs=spill_pairs)
    for i in range(0, len(values), step):       # the three ways pairs come in
        v, c = values[i:i + step], counts[i:i + step]
        if i % 3 == 0:
            pool.add_pairs(np.stack([v, c], axis=1))
        elif i % 3 == 1:
            pool.add_arrays(v.tolist(), c.tolist())
        else:                                   # one micro-batch's {gap: count}
            step_gaps: dict = {}
            for value, count in zip(v.tolist(), c.tolist()):
                step_gaps[value] = step_gaps.get(value, 0) + count
            pool.add(step_gaps)
    return pool


@pytest.mark.parametrize("seed", range(12))
def test_spilled_percentiles_equal_the_in_memory_ones(seed):
    rng = np.random.default_rng(seed)
    values, counts = _sample(rng, int(rng.integers(1, 4000)), negative=seed % 4 == 3)
    pool = _pool(values, counts, spill_pairs=int(rng.integers(1, 300)))
    expected = weighted_distribution(values, counts)
    assert pool.spilled or len(values) < 300
    got = pool.distribution()
    assert {k: got[k] for k in ("p50", "p90", "p99", "max")} == \
        {k: expected[k] for k in ("p50", "p90", "p99", "max")}
    assert got["mean"] == pytest.approx(expected["mean"], rel=1e-12)
    exact = math.fsum((values * counts).tolist()) / counts.sum()
    if pool.spilled:
        assert got["mean"] == exact


def test_spilled_mean_does_not_depend_on_the_order_of_the_pairs():
    rng = np.random.default_rng(7)
    values, counts = _sample(rng, 5000)
    means = set()
    for _ in range(4):
        order = rng.permutation(len(values))
        means.add(_pool(values[order], counts[order], spill_pairs=256).distribution()["mean"])
    assert len(means) == 1


def test_empty_and_all_zero_counts():
    assert GapPool(spill_pairs=4).distribution() == {"mean": None, "p50": None, "p90": None, "p99": None,
                                                      "max": None}
    pool = GapPool(spill_pairs=4)
    pool.add_arrays([0.1] * 10, [0] * 10)
    assert pool.spilled
    assert pool.distribution()["p50"] is None


@pytest.mark.parametrize("keep", [0, 3, 40, 99, 150])
def test_truncate_across_the_spill(keep):
    rng = np.random.default_rng(keep)
    values, counts = _sample(rng, 150)
    counts[counts == 0] = 1
    pool = GapPool(spill_pairs=32)
    for v, c in zip(values.tolist(), counts.tolist()):
        pool.add_arrays([v], [c])
    assert len(pool) == 150 and pool.spilled
    pool.truncate(keep)
    assert len(pool) == keep
    pool.add_arrays([1.5, 2.5], [2, 1])     # pairs after a rollback follow the kept ones
    v = np.append(values[:keep], [1.5, 2.5])
    c = np.append(counts[:keep], [2, 1])
    expected = weighted_distribution(v, c)
    got = pool.distribution()
    assert got["p50"] == expected["p50"] and got["p99"] == expected["p99"] and got["max"] == expected["max"]


@pytest.mark.parametrize("scale", [0, 3, 12, 40])
def test_the_exact_sum_is_fsums(scale):
    # a spilled pool's mean: the correctly rounded sum of value x count, as math.fsum gives it, from arrays
    from simulator.recorder import ExactSum

    rng = np.random.default_rng(scale)
    for _ in range(200):
        n = int(rng.integers(1, 400))
        v = rng.normal(size=n) * 10.0 ** rng.integers(-scale, scale + 1, n)
        if rng.random() < 0.3:
            v = np.r_[1e16, v, -1e16, 1.0]                      # cancellation: naive sums lose the small ones
        exact = ExactSum()
        for lo in range(0, len(v), 37):
            exact.add(v[lo:lo + 37])
        assert exact.value() == math.fsum(v.tolist())
