"""Round-robin: the ``seq``-th arriving request goes to replica ``seq mod N`` (vLLM's and llm-d's default)."""


def route(request, loads, seq: int) -> int:
    return seq % len(loads)
