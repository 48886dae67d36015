"""Latency SLOs that decide whether a run "sustains" its load, and the deadline-based fluidity metric.

An SLO is a conjunction of quantile limits ``P_q(metric) <= max_value`` over one run (``QuantileLimit``).
Percentiles use numpy's default linear interpolation, exactly as ``simulator.metrics.distribution`` does, so
``P99 TBT`` here equals ``summary["tbt_s"]["p99"]``. Three SLOs are built in (``make_slo``):

``sarathi`` (default) — Sarathi-Serve (Agrawal et al., OSDI'24 §5, "Capacity"): P99 TBT <= the TBT SLO **and**
    median (P50) scheduling delay <= 2 s. The paper's TBT SLOs (``PAPER_TBT_SLO_S``): Mistral-7B 0.1 s strict /
    0.5 s relaxed, Yi-34B 0.2 / 1.0, Llama-2-70B and Falcon-180B 1 / 5; its capacity trials use 2048 requests.
    TBT gaps are pooled over all requests (``simulator.metrics.tbt_gaps``).
``vidur`` — Vidur (Agrawal et al., MLSys'24 §5): P99 scheduling delay <= 5 s.
``deadline`` — Etalon/Metron fluidity (Agrawal et al., "Etalon: Holistic Performance Evaluation Framework for LLM
    Inference Systems", arXiv:2407.07000, 2024, §4, and its ``metric_utils.get_request_level_deadline_miss_rate``):
    the P99 over requests of the per-request deadline-miss rate <= 0.1, i.e. 99% of requests miss at most 10% of
    their token deadlines (Etalon compares with ``<=``; we follow it). Deadlines: see ``deadline_misses``.
``distserve`` — DistServe (Zhong et al., OSDI'24 §2, §6) goodput: P90 TTFT <= ``ttft_slo_s`` and P90 TPOT <=
    ``tpot_slo_s`` (DistServe asks 90% of requests to meet both; this checks each at its 90th percentile, which
    a run meeting the joint target also meets). Capacity under it per GPU is DistServe's per-GPU goodput.

Errors: ``SLOError`` (a ``ValueError``) with a one-line message naming the bad field.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np

from cost_models.plan import BatchPlan

SLO_NAMES = ("sarathi", "vidur", "deadline", "distserve")
SLO_LEVELS = ("strict", "relaxed")
METRICS = ("tbt_s", "scheduling_delay_s", "deadline_miss_rate", "ttft_s", "tpot_s")
DISTSERVE_ATTAINMENT_PERCENTILE = 90.0       # DistServe (Zhong et al., OSDI'24) §6: 90% SLO attainment

#: Sarathi-Serve (OSDI'24 §5, evaluation setup): P99 TBT SLO in seconds, (strict, relaxed) per model.
PAPER_TBT_SLO_S = {
    "Mistral-7B": (0.1, 0.5),
    "Yi-34B": (0.2, 1.0),
    "Yi-34B-200K": (0.2, 1.0),
    "Llama-2-70B": (1.0, 5.0),
    "Falcon-180B": (1.0, 5.0),
}
SARATHI_MEDIAN_SCHEDULING_DELAY_S = 2.0      # Sarathi-Serve §5
VIDUR_P99_SCHEDULING_DELAY_S = 5.0           # Vidur §5
DEFAULT_DECODE_DEADLINE_S = 0.03             # Etalon's decode deadline D_d used for this SLO
DEFAULT_TTFT_SLACK_S = 0.3                   # Etalon: first-token deadline = predicted prefill time + slack
DEFAULT_DEADLINE_MISS_RATE = 0.1             # Etalon: at most 10% of a request's deadlines missed ...
DEFAULT_DEADLINE_PERCENTILE = 99.0           # ... for 99% of requests


class SLOError(ValueError):
    """An SLO name, level or threshold that is unknown or invalid."""


@dataclass(frozen=True)
class QuantileLimit:
    """``percentile``-th percentile of ``metric`` over one run must be ``<= max_value``.

    ``metric`` is ``tbt_s`` (seconds, one sample per gap between consecutive output tokens, pooled),
    ``scheduling_delay_s`` (seconds, one sample per request) or ``deadline_miss_rate`` (fraction, one per request).
    """

    metric: str
    percentile: float
    max_value: float

    def __post_init__(self):
        if self.metric not in METRICS:
            raise SLOError(f"metric: unknown {self.metric!r}; known: {', '.join(METRICS)}")
        if not 0 <= self.percentile <= 100:
            raise SLOError(f"percentile: must be in [0, 100], got {self.percentile!r}")
        if not (isinstance(self.max_value, (int, float)) and self.max_value > 0 and math.isfinite(self.max_value)):
            raise SLOError(f"{self.metric}: limit must be a positive number, got {self.max_value!r}")

    @property
    def label(self) -> str:
        """Column-friendly name, e.g. ``tbt_s_p99``."""
        return f"{self.metric}_p{self.percentile:g}"

    def describe(self) -> str:
        unit = "" if self.metric == "deadline_miss_rate" else " s"
        name = {"tbt_s": "TBT", "scheduling_delay_s": "scheduling delay", "deadline_miss_rate": "deadline-miss rate",
                "ttft_s": "TTFT", "tpot_s": "TPOT"}[self.metric]
        return f"P{self.percentile:g} {name} <= {self.max_value:g}{unit}"


@dataclass(frozen=True)
class SLO:
    """A named conjunction of quantile limits. ``decode_deadline_s``/``ttft_slack_s`` are set for ``deadline``."""

    name: str
    limits: tuple
    source: str
    decode_deadline_s: float | None = None
    ttft_slack_s: float | None = None

    @property
    def needs_fluidity(self) -> bool:
        return any(lim.metric == "deadline_miss_rate" for lim in self.limits)

    def describe(self) -> str:
        text = " and ".join(lim.describe() for lim in self.limits)
        if self.needs_fluidity:
            text += (f" (decode deadline {self.decode_deadline_s:g} s, first-token deadline = predicted prefill"
                     f" + {self.ttft_slack_s:g} s)")
        return text

    def to_dict(self) -> dict:
        d = asdict(self)
        d["limits"] = [asdict(lim) for lim in self.limits]
        d["description"] = self.describe()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SLO":
        return cls(d["name"], tuple(QuantileLimit(**lim) for lim in d["limits"]), d["source"],
                   d.get("decode_deadline_s"), d.get("ttft_slack_s"))


def paper_tbt_slo_s(model_name: str, level: str = "strict") -> float:
    """The Sarathi-Serve P99 TBT SLO (seconds) of ``model_name`` at ``level`` (``strict``/``relaxed``).

    Raises SLOError for an unknown level or a model the paper did not evaluate (pass an explicit TBT SLO then).
    """
    if level not in SLO_LEVELS:
        raise SLOError(f"slo_level: unknown {level!r}; known: {', '.join(SLO_LEVELS)}")
    for name, pair in PAPER_TBT_SLO_S.items():
        if name.lower() == str(model_name).lower():
            return pair[SLO_LEVELS.index(level)]
    raise SLOError(f"tbt_slo: Sarathi-Serve gives no TBT SLO for model {model_name!r} (it has "
                   f"{', '.join(PAPER_TBT_SLO_S)}); pass --tbt-slo SECONDS")


def make_slo(name: str = "sarathi", *, model: str = "Mistral-7B", level: str = "strict",
             tbt_slo_s: float | None = None, decode_deadline_s: float | None = None,
             ttft_slack_s: float | None = None, ttft_slo_s: float | None = None,
             tpot_slo_s: float | None = None) -> SLO:
    """Build a built-in SLO (see the module docstring for definitions and sources).

    Args:
        name: ``sarathi``, ``vidur`` or ``deadline``.
        model: model name, used to look up the paper's TBT SLO when ``tbt_slo_s`` is None (``sarathi`` only).
        level: ``strict`` or ``relaxed`` paper TBT SLO (``sarathi`` only).
        tbt_slo_s: explicit P99 TBT limit in seconds (``sarathi``), overriding the paper's.
        decode_deadline_s, ttft_slack_s: Etalon's decode deadline D_d and first-token slack (``deadline``);
            defaults 0.03 s and 0.3 s.
    Raises SLOError for an unknown name/level, a model without a paper SLO, or a non-positive threshold.
    """
    if name == "sarathi":
        tbt = tbt_slo_s if tbt_slo_s is not None else paper_tbt_slo_s(model, level)
        return SLO("sarathi", (QuantileLimit("tbt_s", 99, tbt),
                               QuantileLimit("scheduling_delay_s", 50, SARATHI_MEDIAN_SCHEDULING_DELAY_S)),
                   "Sarathi-Serve (Agrawal et al., OSDI'24) §5")
    if name == "vidur":
        return SLO("vidur", (QuantileLimit("scheduling_delay_s", 99, VIDUR_P99_SCHEDULING_DELAY_S),),
                   "Vidur (Agrawal et al., MLSys'24) §5")
    if name == "deadline":
        d = DEFAULT_DECODE_DEADLINE_S if decode_deadline_s is None else decode_deadline_s
        s = DEFAULT_TTFT_SLACK_S if ttft_slack_s is None else ttft_slack_s
        if not d > 0:
            raise SLOError(f"decode_deadline_s: must be positive, got {d!r}")
        if not s >= 0:
            raise SLOError(f"ttft_slack_s: must be non-negative, got {s!r}")
        return SLO("deadline", (QuantileLimit("deadline_miss_rate", DEFAULT_DEADLINE_PERCENTILE,
                                              DEFAULT_DEADLINE_MISS_RATE),),
                   "Etalon (Agrawal et al., arXiv:2407.07000, 2024) §4, fluidity-index", float(d), float(s))
    if name == "distserve":
        if ttft_slo_s is None or tpot_slo_s is None:
            raise SLOError("slo distserve: needs --ttft-slo and --tpot-slo (seconds)")
        p = DISTSERVE_ATTAINMENT_PERCENTILE
        return SLO("distserve", (QuantileLimit("ttft_s", p, float(ttft_slo_s)), QuantileLimit("tpot_s", p, float(tpot_slo_s))),
                   "DistServe (Zhong et al., OSDI'24) §6, per-GPU goodput")
    raise SLOError(f"slo: unknown {name!r}; known: {', '.join(SLO_NAMES)}")


# --- the fluidity metric --------------------------------------------------------------------------------------

def deadline_misses(ttft_s: float, tbt_gaps_s, ttft_deadline_s: float, decode_deadline_s: float) -> tuple[int, int]:
    """Etalon's deadline accounting of one request's token timeline: ``(missed, total)`` deadlines.

    The first token is due ``ttft_deadline_s`` after arrival, each later token ``decode_deadline_s`` after the
    previous one. A token that arrives early banks the unused time as *slack*, carried forward: token ``i`` meets
    its deadline if its gap ``<= D + slack`` (``D`` its own deadline), and then ``slack += D - gap``. A token that
    is late misses ``floor((gap - slack) / D_d)`` decode deadlines (for the first token ``1 + floor((ttft -
    slack - D_p) / D_d)``): one long stall counts as several misses, one per decode deadline that elapsed. After
    a miss the slack resets to 0 (deadlines restart from the late token). Each met token counts one deadline;
    ``total = met tokens + missed``. Source: Etalon (arXiv:2407.07000) §4.2 and
    ``etalon/metrics/metric_utils.py:get_request_level_deadline_miss_rate``.

    Args:
        ttft_s: time from arrival to the first output token (seconds).
        tbt_gaps_s: gaps between consecutive output tokens (seconds), length ``output_tokens - 1``.
        ttft_deadline_s: first-token deadline ``D_p`` (seconds).
        decode_deadline_s: decode deadline ``D_d`` (seconds, > 0).
    """
    d = decode_deadline_s
    if ttft_s <= ttft_deadline_s:
        slack, missed, total = ttft_deadline_s - ttft_s, 0, 1
    else:
        missed = 1 + math.floor((ttft_s - ttft_deadline_s) / d)
        slack, total = 0.0, missed
    for gap in tbt_gaps_s:
        if gap <= d + slack:
            slack += d - gap
            total += 1
        else:
            m = math.floor((gap - slack) / d)
            missed += m
            total += m
            slack = 0.0
    return missed, total


def predicted_prefill_s(cost_model, prompt_tokens: int) -> float:
    """Seconds to prefill ``prompt_tokens`` alone in one iteration on an idle replica (``cost_model`` prices a
    one-request prefill plan). Etalon's first-token deadline uses this prediction (its prefill profiler)."""
    return cost_model.iteration_time(BatchPlan((0,), (int(prompt_tokens),), (0,), 0))


FLUIDITY_COLUMNS = ["request_id", "ttft_deadline_s", "deadlines", "deadline_misses", "deadline_miss_rate",
                    "fluidity_index"]


def fluidity_of(request, ttft_deadline_s: float, decode_deadline_s: float) -> tuple[int, int]:
    """``(missed, total)`` deadlines of one ``Request`` from its token times; ``(0, 0)`` before its first token."""
    times = request.token_times_s
    if not times:
        return 0, 0
    gaps = np.diff(times).tolist() if len(times) > 1 else ()
    return deadline_misses(times[0] - request.arrival_s, gaps, ttft_deadline_s, decode_deadline_s)


def fluidity_per_request(requests, cost_model, *, decode_deadline_s: float = DEFAULT_DECODE_DEADLINE_S,
                         ttft_slack_s: float = DEFAULT_TTFT_SLACK_S):
    """Per-request fluidity (Etalon §4): one row per request with ``FLUIDITY_COLUMNS``.

    ``ttft_deadline_s`` = ``predicted_prefill_s`` + ``ttft_slack_s``; ``deadlines`` and ``deadline_misses`` come
    from ``deadline_misses`` over the tokens emitted so far; ``deadline_miss_rate = misses / deadlines`` and
    ``fluidity_index = 1 - deadline_miss_rate`` (the fraction of deadlines met). Both are NaN for a request
    without output tokens (rejected or never scheduled).
    """
    cache: dict[int, float] = {}
    rows = []
    for r in requests:
        deadline = cache.get(r.prompt_tokens)
        if deadline is None:
            deadline = cache[r.prompt_tokens] = predicted_prefill_s(cost_model, r.prompt_tokens) + ttft_slack_s
        missed, total = fluidity_of(r, deadline, decode_deadline_s)
        rate = missed / total if total else float("nan")
        rows.append((r.request_id, deadline, total, missed, rate, 1.0 - rate))
    import pandas as pd

    return pd.DataFrame.from_records(rows, columns=FLUIDITY_COLUMNS)


# --- evaluation -----------------------------------------------------------------------------------------------

def metric_samples(metric: str, requests, *, slo: SLO | None = None, cost_model=None) -> np.ndarray:
    """The samples of ``metric`` over a run's requests (NaN-free), as ``evaluate_slo`` uses them.

    ``deadline_miss_rate`` needs ``slo`` (its deadlines) and ``cost_model`` (predicted prefill times).
    """
    from simulator.metrics import tbt_gaps

    if metric == "tbt_s":
        return tbt_gaps(requests)
    if metric == "scheduling_delay_s":
        return np.array([r.scheduled_s - r.arrival_s for r in requests if r.scheduled_s is not None], dtype=float)
    if metric == "ttft_s":
        return np.array([r.first_token_s - r.arrival_s for r in requests if r.first_token_s is not None], dtype=float)
    if metric == "tpot_s":
        return np.array([(r.completion_s - r.first_token_s) / (r.output_tokens - 1) for r in requests
                         if r.completion_s is not None and r.output_tokens > 1], dtype=float)
    if metric == "deadline_miss_rate":
        if cost_model is None or slo is None or slo.decode_deadline_s is None:
            raise SLOError("deadline_miss_rate: needs the deadline SLO and a cost model")
        table = fluidity_per_request(requests, cost_model, decode_deadline_s=slo.decode_deadline_s,
                                     ttft_slack_s=slo.ttft_slack_s)
        rate = table["deadline_miss_rate"].to_numpy(dtype=float)
        return rate[~np.isnan(rate)]
    raise SLOError(f"metric: unknown {metric!r}; known: {', '.join(METRICS)}")


@dataclass(frozen=True)
class SLOCheck:
    """Outcome of one run against an SLO: ``met`` and the measured value of each limit (None without samples)."""

    met: bool
    values: dict

    def to_dict(self) -> dict:
        return {"met": self.met, **self.values}


def evaluate_slo(slo: SLO, requests, cost_model=None) -> SLOCheck:
    """Check a finished run's ``requests`` against ``slo``. A limit with no samples (nothing completed) fails."""
    values, met = {}, True
    for lim in slo.limits:
        a = metric_samples(lim.metric, requests, slo=slo, cost_model=cost_model)
        v = float(np.percentile(a, lim.percentile)) if a.size else None
        values[lim.label] = v
        met = met and v is not None and v <= lim.max_value
    return SLOCheck(met, values)


def certain_violation_count(n: int, percentile: float) -> int:
    """Smallest count of samples ``> x`` among ``n`` that forces the ``percentile``-th percentile above ``x``
    whatever the sample values are.

    numpy's linear percentile sits at index ``i = (n - 1) * (percentile / 100)`` (computed in this order, as numpy
    does) between sorted samples ``floor(i)`` and ``floor(i) + 1``; once ``n - floor(i)`` samples exceed ``x``,
    both of them do (with one fewer the result depends on the values). Non-decreasing in ``n``, so an upper
    bound on the final ``n`` gives a safe count.
    """
    return n - math.floor((n - 1) * (percentile / 100))


TOKEN_COLUMNS = ["request_id", "token_index", "time_s"]


def token_times_table(requests):
    """One row per emitted output token: ``request_id``, ``token_index`` (0 = first token), ``time_s`` (seconds
    of simulated time). TBT gaps are the per-request differences of ``time_s``; TTFT is ``time_s`` of token 0
    minus the request's arrival."""
    lens = np.fromiter((len(r.token_times_s) for r in requests), dtype=np.int64)
    ids = np.repeat(np.array([r.request_id for r in requests], dtype=np.int64), lens)
    idx = np.arange(int(lens.sum()), dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens)
    times = np.fromiter(itertools.chain.from_iterable(r.token_times_s for r in requests), dtype=float,
                        count=int(lens.sum()))
    import pandas as pd

    return pd.DataFrame({"request_id": ids, "token_index": idx, "time_s": times}, columns=TOKEN_COLUMNS)
