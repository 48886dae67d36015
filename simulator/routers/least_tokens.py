"""Least tokens: the replica with the fewest prefill + decode tokens still to compute (work-aware routing, as
llm-d's and BLIS's load-aware scorers), so a replica holding one long prompt is not treated like one holding a short
one."""


def route(request, loads, seq: int) -> int:
    return min(loads, key=lambda x: (x.tokens_left, x.num_requests, x.index)).index
