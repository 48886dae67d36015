"""Synthetic workloads: request-length distributions fitted to published statistics, and arrival processes.

(The ``random`` and ``conversation`` built-ins live in ``traces.random_dataset`` and ``traces.conversation``;
``traces.workloads.WORKLOADS`` lists every built-in name.)

Built-in workloads (``BUILTIN_WORKLOADS``) reproduce the request-length statistics of the two datasets used
by Sarathi-Serve: Agrawal et al., "Taming Throughput-Latency Tradeoff in LLM Inference with Sarathi-Serve",
OSDI 2024, Table 2 (token counts with the Llama-2 tokenizer):

==================  ============  ==========  ============  ==========  ===============
workload            prompt med.   prompt P90  output med.   output P90  max total tokens
==================  ============  ==========  ============  ==========  ===============
openchat_sharegpt4  1730          5696        415           834         8192
arxiv_summarization 7059          12985       208           371         16384
==================  ============  ==========  ============  ==========  ===============

Length model. Prompt and output lengths are independent, each ``max(1, round(X))`` with ``X`` lognormal
(the table gives no correlation, so none is modelled). A request whose total ``prompt + output`` exceeds the
workload's max total is **rejected and resampled** (rejection sampling, never clipped), so the published
median and P90 must hold for the distribution *conditioned on* ``prompt + output <= max_total``. The lognormal
parameters are therefore fitted to the truncated distribution: ``fit_lognormal_params`` computes the exact
conditional quantiles on the integer grid (``truncated_quantiles``) and adjusts ``mu``/``sigma`` by a
deterministic fixed-point iteration until they match. The fitted constants are stored in
``BUILTIN_WORKLOADS``; recompute them with ``python -m traces.synthetic`` (tests check they agree).

A model's own limit (``max_total_tokens`` of ``generate``/``load_trace``, e.g. its max_model_len) is applied
only AFTER drawing at the workload's own max total, exactly as for a trace file (``traces.limits``): shrunk
like the Sarathi-Serve artifact, or dropped and replaced by further draws (``iid_trace``). So a limit at or
above the workload's own max changes nothing, and a smaller one shrinks some of the same requests.

Arrival processes (``arrival_times``): ``"poisson"`` draws exponential inter-arrival gaps with mean ``1/qps``;
``"gamma"`` draws gamma gaps with mean ``1/qps`` and coefficient of variation ``cv`` (shape ``1/cv**2``);
``cv == 1`` *is* the Poisson process and uses the exponential draw, so it gives byte-identical arrivals.
The first request arrives after the first gap (not at t=0). ``qps=math.inf`` puts every arrival at 0.0.

Randomness: everything derives from one integer ``seed`` through ``numpy.random.SeedSequence(seed)``,
split into independent streams for lengths, arrivals and shuffling (``rng_streams``), so e.g. changing the
QPS leaves the request lengths unchanged. Lengths are drawn in fixed-size chunks, so the first ``n``
requests of a larger trace equal the trace generated with ``num_requests=n``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

from typing import TYPE_CHECKING

import numpy as np

from .limits import DROP_DRAW_FACTOR, changes_record, drop_examples, over_limit, shrink_requests
from .schema import MAX_ARRIVAL_S, TraceColumns, TraceError, make_columns

if TYPE_CHECKING:
    import pandas as pd

ARRIVAL_PROCESSES = ("poisson", "gamma")
_CHUNK = 4096          # lengths are drawn this many at a time (fixed, for prefix stability)
_MAX_CHUNKS = 1000     # give up if rejection sampling accepts almost nothing


@dataclass(frozen=True)
class BuiltinWorkload:
    """A synthetic workload: published length statistics (tokens) and the fitted lognormal parameters.

    ``*_mu``/``*_sigma`` are the mean and standard deviation of ``log(tokens)`` *before* rounding and
    before rejecting requests with ``prompt + output > max_total_tokens``.
    """

    name: str
    dataset: str
    source: str
    prompt_median: int
    prompt_p90: int
    output_median: int
    output_p90: int
    max_total_tokens: int
    prompt_mu: float
    prompt_sigma: float
    output_mu: float
    output_sigma: float

    @property
    def targets(self) -> tuple[int, int, int, int]:
        return (self.prompt_median, self.prompt_p90, self.output_median, self.output_p90)

    @property
    def params(self) -> tuple[float, float, float, float]:
        return (self.prompt_mu, self.prompt_sigma, self.output_mu, self.output_sigma)


_SOURCE = "Agrawal et al., Sarathi-Serve, OSDI 2024, Table 2 (Llama-2 tokenizer)"

# Fitted constants: output of ``python -m traces.synthetic`` (fit_lognormal_params on the targets below).
BUILTIN_WORKLOADS: dict[str, BuiltinWorkload] = {
    "sharegpt": BuiltinWorkload(
        name="sharegpt", dataset="openchat_sharegpt4", source=_SOURCE,
        prompt_median=1730, prompt_p90=5696, output_median=415, output_p90=834, max_total_tokens=8192,
        prompt_mu=8.298171296658879, prompt_sigma=1.8052205802777228,
        output_mu=6.034138874842001, output_sigma=0.5469285973789667,
    ),
    "arxiv": BuiltinWorkload(
        name="arxiv", dataset="arxiv_summarization", source=_SOURCE,
        prompt_median=7059, prompt_p90=12985, output_median=208, output_p90=371, max_total_tokens=16384,
        prompt_mu=8.972917273553866, prompt_sigma=0.650706046576641,
        output_mu=5.338628539895723, output_sigma=0.4518495523282334,
    ),
}


# --------------------------------------------------------------------------------------------------------
# Fitting the lengths to the published quantiles, truncation included
# --------------------------------------------------------------------------------------------------------

_erf = np.frompyfunc(math.erf, 1, 1)


def _normal_cdf(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + _erf(np.asarray(z, dtype=np.float64) / math.sqrt(2.0)).astype(np.float64))


def _rounded_lognormal_pmf(mu: float, sigma: float, n_max: int) -> np.ndarray:
    """P(max(1, round(X)) = k) for k = 1..n_max (array index k-1), X ~ lognormal(mu, sigma)."""
    edges = np.arange(1, n_max + 1, dtype=np.float64) + 0.5           # upper edges 1.5 .. n_max+0.5
    cdf = _normal_cdf((np.log(edges) - mu) / sigma)
    return np.diff(np.concatenate([[0.0], cdf]))                       # k=1 absorbs everything below 1.5


def _interp_quantile(weights: np.ndarray, q: float) -> float:
    """Quantile of an integer distribution on 1..n (weights normalised here), token k spread over [k-.5, k+.5]."""
    cum = np.cumsum(weights) / weights.sum()
    k = int(np.searchsorted(cum, q))                                   # first index with cum >= q
    below = cum[k - 1] if k > 0 else 0.0
    return (k + 1 - 0.5) + (q - below) / (cum[k] - below)


def truncated_quantiles(params, max_total_tokens: int, qs=(0.5, 0.9)) -> dict[str, list[float]]:
    """Exact quantiles of prompt and output lengths (tokens) conditioned on ``prompt + output <= max_total``.

    ``params`` is ``(prompt_mu, prompt_sigma, output_mu, output_sigma)``. Computed on the integer grid
    (rounding and the ``>= 1`` clip included) with linear interpolation inside each integer, so a value
    such as 1730.2 means a large sample's median is 1730. Returns ``{"prompt": [...], "output": [...]}``.
    """
    mu_p, s_p, mu_o, s_o = params
    m = int(max_total_tokens)
    p = _rounded_lognormal_pmf(mu_p, s_p, m - 1)                        # prompt 1..m-1 (output >= 1)
    o = _rounded_lognormal_pmf(mu_o, s_o, m - 1)
    p_cdf, o_cdf = np.cumsum(p), np.cumsum(o)
    # P(prompt = i, accepted) = p_i * P(output <= m - i); index i-1 -> o_cdf[m - i - 1]
    prompt_w = p * o_cdf[::-1]
    output_w = o * p_cdf[::-1]
    return {"prompt": [_interp_quantile(prompt_w, q) for q in qs],
            "output": [_interp_quantile(output_w, q) for q in qs]}


def fit_lognormal_params(prompt_median: float, prompt_p90: float, output_median: float, output_p90: float,
                         max_total_tokens: int, *, tol: float = 1e-10, max_iter: int = 100):
    """Fit ``(prompt_mu, prompt_sigma, output_mu, output_sigma)`` so that the *truncated* medians and P90s
    (``truncated_quantiles``) equal the targets.

    Deterministic damped Newton iteration on the four residuals ``log(achieved / target)`` over the
    parameters ``(prompt_mu, log prompt_sigma, output_mu, log output_sigma)``, with a forward-difference
    Jacobian, starting from the untruncated lognormal fit ``mu = log(median)``,
    ``sigma = log(p90 / median) / z_0.9``. Truncation matters: for sharegpt about a third of the untruncated
    prompt mass lies above the limit, so the fitted ``sigma`` is much wider than the untruncated one.
    """
    z90 = 1.2815515655446004                                          # standard normal 0.9 quantile
    targets = np.log([prompt_median, prompt_p90, output_median, output_p90])

    def residual(x: np.ndarray) -> np.ndarray:
        q = truncated_quantiles((x[0], math.exp(x[1]), x[2], math.exp(x[3])), max_total_tokens)
        return np.log(q["prompt"] + q["output"]) - targets

    x = np.array([math.log(prompt_median), math.log(math.log(prompt_p90 / prompt_median) / z90),
                  math.log(output_median), math.log(math.log(output_p90 / output_median) / z90)])
    r = residual(x)
    for _ in range(max_iter):
        if np.max(np.abs(r)) < tol:
            return (float(x[0]), math.exp(x[1]), float(x[2]), math.exp(x[3]))
        h = 1e-6
        jac = np.column_stack([(residual(x + h * e) - r) / h for e in np.eye(4)])
        step = np.linalg.solve(jac, -r)
        for _ in range(30):                                            # backtrack until the residual shrinks
            x_new = x + step
            r_new = residual(x_new)
            if np.max(np.abs(r_new)) < np.max(np.abs(r)):
                break
            step = step / 2
        x, r = x_new, r_new
    raise RuntimeError("fit_lognormal_params did not converge")


def refit_builtin_workloads() -> dict[str, tuple[float, float, float, float]]:
    """Recompute the fitted constants of every built-in workload from its published targets."""
    return {name: fit_lognormal_params(*w.targets, w.max_total_tokens) for name, w in BUILTIN_WORKLOADS.items()}


# --------------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------------

class RngStreams(NamedTuple):
    lengths: np.random.Generator
    arrivals: np.random.Generator
    shuffle: np.random.Generator


def rng_streams(seed: int) -> RngStreams:
    """Independent generators for lengths, arrivals and shuffling, all derived from ``seed``."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise TraceError(f"seed must be a non-negative integer, got {seed!r}")
    return RngStreams(*(np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(3)))


def sample_lengths(workload: BuiltinWorkload, num_requests: int, rng: np.random.Generator,
                   max_total_tokens: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``num_requests`` (prompt_tokens, output_tokens) pairs; pairs with a total above
    ``max_total_tokens`` (default: the workload's) are rejected and redrawn. Returns two int64 arrays."""
    m = workload.max_total_tokens if max_total_tokens is None else int(max_total_tokens)
    prompts, outputs, have = [], [], 0
    for _ in range(_MAX_CHUNKS):
        if have >= num_requests:
            break
        p = np.maximum(1.0, np.rint(rng.lognormal(workload.prompt_mu, workload.prompt_sigma, _CHUNK)))
        o = np.maximum(1.0, np.rint(rng.lognormal(workload.output_mu, workload.output_sigma, _CHUNK)))
        keep = p + o <= m
        prompts.append(p[keep])
        outputs.append(o[keep])
        have += int(keep.sum())
    else:
        if have < num_requests:
            raise TraceError(f"max_total_tokens={m} rejects almost every request of workload "
                             f"'{workload.name}'", workload.name, field="max_total_tokens")
    prompt = np.concatenate(prompts)[:num_requests].astype(np.int64)
    output = np.concatenate(outputs)[:num_requests].astype(np.int64)
    return prompt, output


def check_arrival_options(qps: float | None, arrival: str, cv: float) -> None:
    """Raise TraceError for an unknown process, a non-positive QPS or CV, or a CV other than 1 with Poisson."""
    if arrival not in ARRIVAL_PROCESSES:
        raise TraceError(f"unknown arrival process {arrival!r}; known: {', '.join(ARRIVAL_PROCESSES)}",
                         field="arrival")
    if qps is not None and not (isinstance(qps, (int, float, np.number)) and qps > 0):
        raise TraceError(f"qps must be > 0 (requests per second), got {qps!r}", field="qps")
    if not (isinstance(cv, (int, float, np.number)) and math.isfinite(cv) and cv > 0):
        raise TraceError(f"cv must be a finite number > 0, got {cv!r}", field="cv")
    if arrival == "poisson" and cv != 1:
        raise TraceError(f"cv={cv!r} needs arrival='gamma' (a Poisson process has cv=1)", field="cv")


def arrival_times(num_requests: int, qps: float, rng: np.random.Generator, *,
                  arrival: str = "poisson", cv: float = 1.0) -> np.ndarray:
    """Arrival times in seconds (float64, non-decreasing) of a renewal process with mean rate ``qps``.

    Gaps are exponential (``"poisson"``, or ``"gamma"`` with ``cv == 1``) or gamma with shape ``1/cv**2`` and
    scale ``cv**2/qps``. The first arrival is at the first gap; ``qps=math.inf`` gives all zeros. Raises
    TraceError when the expected span ``num_requests / qps`` exceeds ``MAX_ARRIVAL_S`` (e.g. ``qps=1e-300``).
    """
    check_arrival_options(qps, arrival, cv)
    if qps is None:
        raise TraceError("qps is required to generate arrivals", field="qps")
    if math.isinf(qps):
        return np.zeros(num_requests, dtype=np.float64)
    span = num_requests / qps if qps > 0 else math.inf
    if not span <= MAX_ARRIVAL_S:
        raise TraceError(f"{qps:g} requests/s: {num_requests} arrivals would span about {span:.3g} s, beyond "
                         f"{MAX_ARRIVAL_S:g} s (about 31.7 years); at such times float64 seconds lose the "
                         f"resolution of a latency (raise qps)", field="qps")
    if arrival == "poisson" or cv == 1:
        gaps = rng.exponential(1.0 / qps, num_requests)
    else:
        shape = 1.0 / cv ** 2
        gaps = rng.gamma(shape, 1.0 / (qps * shape), num_requests)
    return np.cumsum(gaps)


def get_workload(name: str) -> BuiltinWorkload:
    """The built-in workload ``name``; TraceError listing the known names otherwise."""
    try:
        return BUILTIN_WORKLOADS[name]
    except (KeyError, TypeError):
        raise TraceError(f"unknown built-in workload {name!r}; known: {', '.join(sorted(BUILTIN_WORKLOADS))}"
                         ) from None


def generate(name: str, num_requests: int, *, qps: float, seed: int, arrival: str = "poisson",
             cv: float = 1.0, max_total_tokens: int | None = None, drop_long: bool = False) -> pd.DataFrame:
    """Generate a synthetic trace of the built-in workload ``name`` (``"sharegpt"`` or ``"arxiv"``).

    Lengths are drawn exactly as the published statistics say (rejection at the workload's own max total:
    8192 sharegpt, 16384 arxiv); a smaller ``max_total_tokens`` is applied AFTERWARDS, like for a file:
    the over-long requests are shrunk (Sarathi-Serve rule, ``traces.limits``) or, with ``drop_long``,
    dropped and replaced by further draws. So the same seed gives the same requests, some shrunk.

    Args:
        name: a key of ``BUILTIN_WORKLOADS``.
        num_requests: number of requests (>= 1).
        qps: mean arrival rate in requests per second (> 0; ``math.inf``: all arrive at 0.0).
        seed: non-negative integer; same arguments and seed give a byte-identical DataFrame.
        arrival: ``"poisson"`` (exponential gaps) or ``"gamma"`` (gamma gaps with coefficient of variation cv).
        cv: coefficient of variation of the gaps for ``"gamma"``; must be 1 for ``"poisson"``.
        max_total_tokens: limit on ``prompt + output`` (>= 2); None or >= the workload's own max changes
            nothing (byte-identical to no limit).
        drop_long: drop over-long requests instead of shrinking them (see ``iid_trace``).

    Returns:
        A trace DataFrame (``traces.schema``) with ``attrs["workload_changes"]``; the first arrival is at the
        first inter-arrival gap.

    Raises:
        TraceError: unknown name (the message lists the known ones) or invalid options.
    """
    return generate_columns(name, num_requests, qps=qps, seed=seed, arrival=arrival, cv=cv,
                            max_total_tokens=max_total_tokens, drop_long=drop_long).frame()


def generate_columns(name: str, num_requests: int, *, qps: float, seed: int, arrival: str = "poisson",
                     cv: float = 1.0, max_total_tokens: int | None = None, drop_long: bool = False
                     ) -> TraceColumns:
    """``generate`` as ``TraceColumns`` (same arguments, same trace, no pandas)."""
    workload = get_workload(name)

    def draw(n: int):
        return sample_lengths(workload, n, rng_streams(seed).lengths)

    return iid_columns(draw, num_requests, qps=qps, seed=seed, arrival=arrival, cv=cv,
                       max_total_tokens=max_total_tokens, drop_long=drop_long, source=name)


def iid_trace(draw, num_requests: int, *, qps: float, seed: int, arrival: str, cv: float,
              max_total_tokens: int | None, drop_long: bool, source: str) -> pd.DataFrame:
    """``iid_columns`` as a trace DataFrame (same arguments)."""
    return iid_columns(draw, num_requests, qps=qps, seed=seed, arrival=arrival, cv=cv,
                       max_total_tokens=max_total_tokens, drop_long=drop_long, source=source).frame()


def iid_columns(draw, num_requests: int, *, qps: float, seed: int, arrival: str, cv: float,
                max_total_tokens: int | None, drop_long: bool, source: str) -> TraceColumns:
    """A trace of i.i.d. requests: lengths from ``draw``, arrivals from the seed's arrival stream.

    ``draw(n)`` must return ``n`` (prompt, output) int64 pairs deterministically (the same ``n`` gives the
    same pairs). Without ``drop_long`` the first ``num_requests`` draws are kept and over-long ones shrunk.
    With ``drop_long`` over-long draws are skipped and the first ``num_requests`` that fit are kept (draw
    sizes double from ``num_requests`` up to 64 times it, so ``num_requests_in`` counts the draws up to the
    last one kept); arrivals are generated for the kept requests, so the arrival times equal those of the
    shrinking variant. ``attrs["workload_changes"]`` records it (``traces.limits``).

    Returns:
        ``TraceColumns`` (``traces.schema``) with ``attrs["workload_changes"]``.

    Raises:
        TraceError: no qps, invalid options, or (``drop_long``) fewer than ``num_requests`` fitting requests
            in 64 * ``num_requests`` draws.
    """
    check_arrival_options(qps, arrival, cv)
    if qps is None:
        raise TraceError("qps is required for a built-in workload (it has no arrival times)", source, field="qps")
    _check_count(num_requests, "num_requests", minimum=1)
    if max_total_tokens is not None:
        _check_count(max_total_tokens, "max_total_tokens", minimum=2)
    streams = rng_streams(seed)                                  # validates the seed before drawing
    if drop_long and max_total_tokens is not None:
        prompt, output, num_in, examples = _draw_fitting(draw, num_requests, max_total_tokens, source)
        changes = changes_record(num_in, 0, num_in - num_requests, max_total_tokens, examples)
    else:
        prompt, output = draw(num_requests)
        labels = LazyLabels("request")
        prompt, output, _, num_shrunk, examples = shrink_requests(prompt, output, None, None, max_total_tokens,
                                                                  labels)
        changes = changes_record(num_requests, num_shrunk, 0, max_total_tokens, examples)
    arrivals = arrival_times(num_requests, qps, streams.arrivals, arrival=arrival, cv=cv)
    columns = make_columns(arrivals, prompt, output)
    columns.attrs["workload_changes"] = changes
    return columns


class LazyLabels:
    """``labels[i] == f"{prefix} {i}"`` without building a list (for the change examples)."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def __getitem__(self, i) -> str:
        return f"{self.prefix} {int(i)}"


def _draw_fitting(draw, num_requests: int, max_total_tokens: int, source: str):
    """The first ``num_requests`` draws with ``prompt + output <= max_total_tokens``: prompt, output, the
    number of draws up to the last one kept, and examples of the skipped ones."""
    n = num_requests
    while True:
        prompt, output = draw(n)
        over = over_limit(prompt, output, max_total_tokens)
        kept = np.flatnonzero(~over)
        if len(kept) >= num_requests:
            last = int(kept[num_requests - 1])
            examples = drop_examples(LazyLabels("draw"), prompt, output, over[: last + 1], max_total_tokens)
            keep = kept[:num_requests]
            return prompt[keep], output[keep], last + 1, examples
        if n >= DROP_DRAW_FACTOR * num_requests:
            raise TraceError(f"drop_long: only {len(kept)} of {n} drawn requests fit max_total_tokens="
                             f"{max_total_tokens}; {num_requests} needed", source, field="max_total_tokens")
        n = min(2 * n, DROP_DRAW_FACTOR * num_requests)


def _check_count(value, field: str, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise TraceError(f"must be an integer >= {minimum}, got {value!r}", field=field)
    if maximum is not None and value > maximum:
        raise TraceError(f"must be an integer <= {maximum}, got {value!r}", field=field)


if __name__ == "__main__":  # python -m traces.synthetic : recompute the fitted constants
    for _name, _params in refit_builtin_workloads().items():
        _w = BUILTIN_WORKLOADS[_name]
        _q = truncated_quantiles(_params, _w.max_total_tokens)
        print(f"{_name}: prompt_mu={_params[0]!r}, prompt_sigma={_params[1]!r}, "
              f"output_mu={_params[2]!r}, output_sigma={_params[3]!r}")
        print(f"    truncated prompt median/P90 {_q['prompt'][0]:.2f}/{_q['prompt'][1]:.2f} "
              f"(target {_w.prompt_median}/{_w.prompt_p90}), output {_q['output'][0]:.2f}/{_q['output'][1]:.2f} "
              f"(target {_w.output_median}/{_w.output_p90})")
