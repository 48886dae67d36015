"""The built-in ``conversation`` workload: multi-turn chat sessions sharing system prompts, with prefix-block
hashes, for studying prefix caching.

Model (every number is a keyword argument of ``generate_conversation``; defaults in brackets):

* ``num_system_prompts`` [16] shared system prompts; their lengths are drawn once per trace, lognormal with
  mean ``system_prompt_mean_tokens`` [1024] and log-sd ``system_prompt_sigma`` [0.5], rounded, capped at
  ``session_max_tokens // 2``. A session picks system prompt of rank ``r = 1..K`` with probability
  proportional to ``r ** -system_prompt_zipf`` [1.0] (Zipf-like popularity). These are assumptions: the
  public chat datasets do not publish system prompts.
* Turns per session ``T ~ Geometric(1 / mean_turns)`` on ``1, 2, ...`` with mean ``mean_turns`` [3.5]:
  ShareGPT has 330,239 turns in 94,145 conversations, 3.51 per conversation (Yan et al., "ShareChat: A
  Dataset of Chatbot Conversations in the Wild", arXiv 2512.17843, Table 1).
* Per turn, a new user message and an assistant output, each ``max(1, round(X))`` with ``X`` lognormal of
  mean ``user_mean_tokens`` [69.5] / ``output_mean_tokens`` [214.5] (the per-turn means of LMSYS-Chat-1M,
  Zheng et al., ICLR 2024, Table 1) and log-sd ``user_sigma`` [1.0] / ``output_sigma`` [0.8] (assumed).
  The lognormal ``mu`` is ``log(mean) - sigma**2 / 2`` so that the mean before rounding is the given one.
* Turn ``t``'s prompt is the session's token stream so far: system prompt + every earlier user message and
  assistant output + the new user message; its output is the turn's assistant output. A session ends early
  before the first turn whose ``prompt + output`` would exceed ``session_max_tokens`` [8192]; a session
  whose first turn does not fit is redrawn (as the sharegpt/arxiv generators redraw over-long requests).
* Arrivals, open loop: sessions start as a renewal process (``arrival``/``cv``, Poisson by default) at
  ``qps * num_sessions / num_requests`` sessions per second, so that the mean request rate over the period
  in which sessions start is ``qps``; turn ``t + 1`` arrives ``think + response`` seconds after turn ``t``,
  ``think ~ Exponential(mean think_time_mean_s)`` [30 s, assumed] and ``response = output_tokens(t) *
  response_s_per_token`` [0.02 s, i.e. 50 tokens/s, assumed], a fixed estimate of how long the previous
  answer took: the simplification is that the next turn does not wait for the simulated response (open
  loop), so under overload a turn can arrive before the previous one has finished. ``qps = inf`` starts
  every session at 0.0 (later turns still follow their gaps).
* Sessions are generated until ``num_requests`` requests exist; the last session is cut there. Requests are
  then sorted by arrival (ties in session order) and numbered 0..N-1. The last sessions' later turns arrive
  after the last session start, so the request rate falls off at the end of the trace.

Block hashes (``hash_block_tokens`` [16] tokens each; only FULL blocks of a prompt are hashed, so a request
has ``prompt_tokens // 16`` of them): block ``j`` of a session's token stream gets
``mix_hash(1, seed, system_prompt, j)`` when it lies wholly inside the system prompt, else
``mix_hash(2, seed, session, j)``. A hash thus identifies the whole prefix through its block: a session's
stream is fixed, every turn's prompt is a prefix of it, and only system prompts are shared between
sessions (user messages and outputs are unique). So two requests share block ``j`` iff their token streams
are identical through block ``j``: turn ``t + 1`` of a session repeats all hashes of turn ``t`` (and hashes
the block turn ``t`` left partial, and those of turn ``t``'s output); sessions with the same system prompt
share its full blocks. The simulator sees only prompt hashes: output tokens are never keyed.

Randomness: contents (system prompts, turns, lengths) come from the seed's length stream, start times and
think times from its arrival stream (``traces.synthetic.rng_streams``), so changing ``qps`` keeps the
sessions and changing nothing gives a byte-identical trace.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import numpy as np

from .limits import DROP_DRAW_FACTOR, changes_record, drop_examples, over_limit, shrink_requests
from .prefix import mix_hash
from .schema import HASH_COLUMN, MAX_TOKENS, TraceError, make_trace
from .synthetic import _check_count, arrival_times, check_arrival_options, rng_streams

if TYPE_CHECKING:
    import pandas as pd

_TAG_SYSTEM, _TAG_SESSION = 1, 2
_MAX_REJECTED = 1000       # redrawn sessions allowed beyond 10 per accepted one before giving up


@dataclass(frozen=True)
class ConversationParams:
    """The knobs of the conversation model (see the module docstring for meaning, units and sources)."""

    num_system_prompts: int = 16
    system_prompt_zipf: float = 1.0
    system_prompt_mean_tokens: float = 1024.0
    system_prompt_sigma: float = 0.5
    mean_turns: float = 3.5
    user_mean_tokens: float = 69.5
    user_sigma: float = 1.0
    output_mean_tokens: float = 214.5
    output_sigma: float = 0.8
    think_time_mean_s: float = 30.0
    response_s_per_token: float = 0.02
    session_max_tokens: int = 8192
    hash_block_tokens: int = 16

    def __post_init__(self):
        _check_count(self.num_system_prompts, "num_system_prompts", minimum=1)
        _check_count(self.session_max_tokens, "session_max_tokens", minimum=2, maximum=MAX_TOKENS)
        _check_count(self.hash_block_tokens, "hash_block_tokens", minimum=1)
        for name, low, strict in (("system_prompt_mean_tokens", 0, True), ("user_mean_tokens", 0, True),
                                  ("output_mean_tokens", 0, True), ("mean_turns", 1, False),
                                  ("system_prompt_zipf", 0, False), ("system_prompt_sigma", 0, False),
                                  ("user_sigma", 0, False), ("output_sigma", 0, False),
                                  ("think_time_mean_s", 0, False), ("response_s_per_token", 0, False)):
            value = getattr(self, name)
            ok = (isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
                  and math.isfinite(value) and (value > low if strict else value >= low))
            if not ok:
                raise TraceError(f"must be a finite number {'>' if strict else '>='} {low}, got {value!r}",
                                 "conversation", field=name)


OPTIONS: tuple[str, ...] = tuple(f.name for f in fields(ConversationParams))


def _lognormal_tokens(rng: np.random.Generator, mean: float, sigma: float, size: int) -> np.ndarray:
    """``max(1, round(X))``, ``X`` lognormal with mean ``mean`` (``mu = log(mean) - sigma**2 / 2``)."""
    mu = math.log(mean) - sigma ** 2 / 2
    return np.maximum(1, np.rint(rng.lognormal(mu, sigma, size))).astype(np.int64)


def sample_sessions(num_requests: int, seed: int, params: ConversationParams = ConversationParams()
                    ) -> pd.DataFrame:
    """The requests of the first sessions, in session order, exactly ``num_requests`` (no arrival times).

    Returns:
        DataFrame with one row per request: ``session`` (0, 1, ...), ``turn`` (0-based), ``system_prompt``
        (0..K-1, 0 the most popular), ``prompt_tokens``, ``output_tokens`` (int64) and ``block_hashes``
        (tuples of ``prompt_tokens // hash_block_tokens`` ints; see the module docstring);
        ``attrs["hash_block_tokens"]``, ``attrs["system_prompt_tokens"]`` (the K lengths) and
        ``attrs["redrawn_sessions"]`` (sessions whose first turn did not fit).

    Raises:
        TraceError: bad seed or parameters, or (almost) no session whose first turn fits.
    """
    import pandas as pd

    _check_count(num_requests, "num_requests", minimum=1)
    rng = rng_streams(seed).lengths
    p = params
    system_tokens = np.minimum(_lognormal_tokens(rng, p.system_prompt_mean_tokens, p.system_prompt_sigma,
                                                 p.num_system_prompts), p.session_max_tokens // 2)
    popularity = np.arange(1, p.num_system_prompts + 1, dtype=np.float64) ** -p.system_prompt_zipf
    popularity /= popularity.sum()
    rows: list[tuple] = []
    redrawn = 0
    session = 0
    while len(rows) < num_requests:
        system = int(rng.choice(p.num_system_prompts, p=popularity))
        turns = int(rng.geometric(1.0 / p.mean_turns))
        user = _lognormal_tokens(rng, p.user_mean_tokens, p.user_sigma, turns)
        output = _lognormal_tokens(rng, p.output_mean_tokens, p.output_sigma, turns)
        before = system_tokens[system] + np.concatenate([[0], np.cumsum(user + output)[:-1]])
        prompt = before + user
        fits = prompt + output <= p.session_max_tokens
        kept = turns if fits.all() else int(np.argmin(fits))
        if kept == 0:
            redrawn += 1
            if redrawn > _MAX_REJECTED + 10 * session:
                raise TraceError(f"session_max_tokens={p.session_max_tokens} is too small for the first turn of "
                                 f"almost every session", "conversation", field="session_max_tokens")
            continue
        kept = min(kept, num_requests - len(rows))
        keys = _stream_hashes(seed, session, system, int(system_tokens[system]), int(prompt[kept - 1]),
                              p.hash_block_tokens)
        for t in range(kept):
            rows.append((session, t, system, int(prompt[t]), int(output[t]),
                         tuple(keys[: int(prompt[t]) // p.hash_block_tokens])))
        session += 1
    df = pd.DataFrame(rows, columns=["session", "turn", "system_prompt", "prompt_tokens", "output_tokens",
                                     HASH_COLUMN])
    df = df.astype({c: np.int64 for c in ("session", "turn", "system_prompt", "prompt_tokens", "output_tokens")})
    df.attrs.update(hash_block_tokens=p.hash_block_tokens, system_prompt_tokens=tuple(system_tokens.tolist()),
                    redrawn_sessions=redrawn)
    return df


def _stream_hashes(seed: int, session: int, system: int, system_tokens: int, max_prompt: int,
                   block_tokens: int) -> list[int]:
    """Hashes of the full blocks of a session's stream up to ``max_prompt`` tokens (module docstring)."""
    j = np.arange(max_prompt // block_tokens, dtype=np.int64)
    in_system = (j + 1) * block_tokens <= system_tokens
    keys = np.where(in_system, mix_hash(_TAG_SYSTEM, seed, system, j), mix_hash(_TAG_SESSION, seed, session, j))
    return keys.tolist()


def _timed_sessions(num_requests: int, qps: float, seed: int, arrival: str, cv: float,
                    params: ConversationParams) -> pd.DataFrame:
    """``sample_sessions`` plus an ``arrival_s`` column, sorted by arrival (stable), index reset."""
    import pandas as pd

    sessions = sample_sessions(num_requests, seed, params)
    num_sessions = int(sessions["session"].iloc[-1]) + 1
    arrivals_rng = rng_streams(seed).arrivals
    session_rate = qps * num_sessions / num_requests
    starts = arrival_times(num_sessions, session_rate, arrivals_rng, arrival=arrival, cv=cv)
    think = arrivals_rng.exponential(params.think_time_mean_s, num_requests)
    previous_output = np.concatenate([[0], sessions["output_tokens"].to_numpy()[:-1]])
    first = sessions["turn"].to_numpy() == 0
    gap = np.where(first, 0.0, think + params.response_s_per_token * previous_output)
    offset = pd.Series(gap).groupby(sessions["session"].to_numpy()).cumsum().to_numpy()
    sessions["arrival_s"] = starts[sessions["session"].to_numpy()] + offset
    order = np.argsort(sessions["arrival_s"].to_numpy(), kind="stable")
    timed = sessions.iloc[order].reset_index(drop=True)
    timed.attrs = dict(sessions.attrs)
    return timed


def generate_conversation(num_requests: int, *, qps: float, seed: int, arrival: str = "poisson",
                          cv: float = 1.0, max_total_tokens: int | None = None, drop_long: bool = False,
                          num_system_prompts: int = 16, system_prompt_zipf: float = 1.0,
                          system_prompt_mean_tokens: float = 1024.0, system_prompt_sigma: float = 0.5,
                          mean_turns: float = 3.5, user_mean_tokens: float = 69.5, user_sigma: float = 1.0,
                          output_mean_tokens: float = 214.5, output_sigma: float = 0.8,
                          think_time_mean_s: float = 30.0, response_s_per_token: float = 0.02,
                          session_max_tokens: int = 8192, hash_block_tokens: int = 16) -> pd.DataFrame:
    """Generate the multi-turn ``conversation`` workload (model, defaults and sources: module docstring).

    Args:
        num_requests: number of requests (>= 1), exactly.
        qps: mean request rate in requests per second (> 0; ``math.inf``: every session starts at 0.0).
        seed: non-negative integer; the same arguments give a byte-identical DataFrame, hashes included.
        arrival, cv: the renewal process of session starts (``traces.synthetic.arrival_times``).
        max_total_tokens: the model's limit on ``prompt + output``, applied after generation like for a
            file (``traces.limits``): over-long requests are shrunk (prompt cut at the tail, hashes cut to
            the blocks still whole) or, with ``drop_long``, dropped; then more sessions are generated (twice
            as many requests each time, up to 64x) until ``num_requests`` remain, the first by arrival. A
            dropped turn's successors stay (open loop). Sessions themselves end at ``session_max_tokens``.
        num_system_prompts ... hash_block_tokens: the model's parameters (module docstring).

    Returns:
        A trace DataFrame (``traces.schema``) with the ``block_hashes`` column, ``attrs["hash_block_tokens"]``
        and ``attrs["workload_changes"]``.

    Raises:
        TraceError: invalid options (the field is named), no qps, or too few requests left after dropping.
    """
    params = ConversationParams(
        num_system_prompts=num_system_prompts, system_prompt_zipf=system_prompt_zipf,
        system_prompt_mean_tokens=system_prompt_mean_tokens, system_prompt_sigma=system_prompt_sigma,
        mean_turns=mean_turns, user_mean_tokens=user_mean_tokens, user_sigma=user_sigma,
        output_mean_tokens=output_mean_tokens, output_sigma=output_sigma, think_time_mean_s=think_time_mean_s,
        response_s_per_token=response_s_per_token, session_max_tokens=session_max_tokens,
        hash_block_tokens=hash_block_tokens)
    check_arrival_options(qps, arrival, cv)
    if qps is None:
        raise TraceError("qps is required for a built-in workload (it has no arrival times)", "conversation",
                         field="qps")
    _check_count(num_requests, "num_requests", minimum=1)
    if max_total_tokens is not None:
        _check_count(max_total_tokens, "max_total_tokens", minimum=2)
    rng_streams(seed)                                            # validate the seed first
    if drop_long and max_total_tokens is not None:
        timed, num_in, examples = _generate_fitting(num_requests, qps, seed, arrival, cv, params,
                                                    max_total_tokens)
        changes = changes_record(num_in, 0, num_in - num_requests, max_total_tokens, examples)
        prompt, output, hashes = (timed["prompt_tokens"].to_numpy(), timed["output_tokens"].to_numpy(),
                                  timed[HASH_COLUMN].tolist())
    else:
        timed = _timed_sessions(num_requests, qps, seed, arrival, cv, params)
        prompt, output, hashes, num_shrunk, examples = shrink_requests(
            timed["prompt_tokens"].to_numpy(), timed["output_tokens"].to_numpy(), timed[HASH_COLUMN].tolist(),
            params.hash_block_tokens, max_total_tokens, _labels(timed))
        changes = changes_record(num_requests, num_shrunk, 0, max_total_tokens, examples)
    df = make_trace(timed["arrival_s"].to_numpy(), prompt, output, hashes, params.hash_block_tokens)
    df.attrs["workload_changes"] = changes
    return df


def _labels(timed: pd.DataFrame) -> list[str]:
    return [f"session {s} turn {t}" for s, t in zip(timed["session"].tolist(), timed["turn"].tolist())]


def _generate_fitting(num_requests: int, qps: float, seed: int, arrival: str, cv: float,
                      params: ConversationParams, max_total_tokens: int):
    """The first ``num_requests`` requests by arrival that fit, the number considered, drop examples."""
    n = num_requests
    while True:
        timed = _timed_sessions(n, qps, seed, arrival, cv, params)
        over = over_limit(timed["prompt_tokens"].to_numpy(), timed["output_tokens"].to_numpy(), max_total_tokens)
        kept = np.flatnonzero(~over)
        if len(kept) >= num_requests:
            last = int(kept[num_requests - 1])
            examples = drop_examples(_labels(timed.iloc[: last + 1]), timed["prompt_tokens"].to_numpy(),
                                     timed["output_tokens"].to_numpy(), over[: last + 1], max_total_tokens)
            return timed.iloc[kept[:num_requests]].reset_index(drop=True), last + 1, examples
        if n >= DROP_DRAW_FACTOR * num_requests:
            raise TraceError(f"drop_long: only {len(kept)} of {n} generated requests fit max_total_tokens="
                             f"{max_total_tokens}; {num_requests} needed", "conversation", field="max_total_tokens")
        n = min(2 * n, DROP_DRAW_FACTOR * num_requests)
