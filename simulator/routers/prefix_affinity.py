"""Prefix affinity: the replica whose prefix cache holds the longest prefix of the request's prompt (SGLang's
cache-aware router; llm-d's prefix-cache scorer), falling back to the fewest tokens left when no replica holds any
of it (or on ties)."""


def route(request, loads, seq: int) -> int:
    return min(loads, key=lambda x: (-x.cached_tokens, x.tokens_left, x.num_requests, x.index)).index
