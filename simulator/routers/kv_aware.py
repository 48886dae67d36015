"""KV-aware: the replica with the most free KV-cache blocks (fewest preemptions ahead)."""


def route(request, loads, seq: int) -> int:
    return min(loads, key=lambda x: (-x.free_kv_blocks, x.num_requests, x.index)).index
