"""The load snapshot a router reads: one ``ReplicaLoad`` per replica, taken when a request arrives."""
from __future__ import annotations


class ReplicaLoad:
    """One replica's load when ``request`` arrives. Units: requests, tokens, KV blocks.

    - ``num_requests``: requests queued or running there;
    - ``tokens_left``: prefill tokens plus decode tokens its requests still have to compute;
    - ``free_kv_blocks`` / ``total_kv_blocks``: its KV cache;
    - ``cached_tokens``: prompt tokens of the arriving request its prefix cache holds (0 without prefix caching).

    ``tokens_left`` and ``cached_tokens`` are computed on first use, so a router that ignores them costs nothing.
    """

    __slots__ = ("index", "_scheduler", "_request", "_tokens_left", "_cached")

    def __init__(self, index: int, scheduler, request=None):
        self.index = index
        self._scheduler = scheduler
        self._request = request
        self._tokens_left = None
        self._cached = None

    @property
    def num_requests(self) -> int:
        return len(self._scheduler.requests)

    @property
    def free_kv_blocks(self) -> int:
        return self._scheduler.kv.num_free

    @property
    def total_kv_blocks(self) -> int:
        return self._scheduler.kv.num_blocks

    @property
    def tokens_left(self) -> int:
        if self._tokens_left is None:
            self._tokens_left = sum(max(0, r.prompt_tokens - r.num_computed_tokens) + r.output_tokens - r.num_generated
                                    for r in self._scheduler.requests.values())
        return self._tokens_left

    @property
    def cached_tokens(self) -> int:
        if self._cached is None:
            kv, r = self._scheduler.kv, self._request
            self._cached = kv.lookup(r)[0] if (r is not None and kv.prefix_caching) else 0
        return self._cached

    def __repr__(self) -> str:
        return f"ReplicaLoad(index={self.index}, num_requests={self.num_requests})"
