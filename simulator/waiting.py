"""The waiting queue of a replica whose tail may stay unmade: requests that arrived while the queue was long.

Under overload the queue of a replica grows with every arrival — a Request object each (some 400 bytes with its id
entry), which made a run's memory grow with its request count. Schedulers only ever look at the head of the queue
(FCFS: ``waiting[0]``, a fast-forwarded stretch a few entries further), so past ``WaitingQueue.backlog_after``
queued requests an arriving request is only counted (``backlog``): the ``Cluster`` remembers the stream positions,
and the request is made and queued (``make_next``, its admission as at its arrival) when the queue reaches it.
Everything a scheduler reads is the same as with every request queued: ``len``, truth, indexing and ``popleft``
count and make the backlog as needed, so results do not change (a test runs both and compares every output byte).
"""
from __future__ import annotations

from collections import deque


class WaitingQueue(deque):
    """A deque of the queued requests, followed by ``backlog`` requests not made yet; ``make_next(k)`` makes the
    first ``k`` of them and appends them (through the replica's ``add``). ``num_made``: the queued requests made."""

    #: queued requests beyond which arrivals wait as stream positions (a few hundred KiB of Request objects)
    backlog_after = 1024
    #: backlog requests made at once when the queue reaches its backlog
    batch = 64

    def __init__(self, items=(), make_next=None):
        super().__init__(items)
        self.backlog = 0
        self.make_next = make_next

    @property
    def num_made(self) -> int:
        return deque.__len__(self)

    def _make(self, n: int) -> None:
        """Make backlog requests until ``n`` are made (or the backlog is empty), ``batch`` at a time."""
        while self.backlog and deque.__len__(self) < n:
            k = min(self.backlog, max(self.batch, n - deque.__len__(self)))
            self.backlog -= k
            self.make_next(k)

    def make_all(self) -> None:
        self._make(deque.__len__(self) + self.backlog)

    def __len__(self) -> int:
        return deque.__len__(self) + self.backlog

    def __bool__(self) -> bool:
        return self.backlog > 0 or deque.__len__(self) > 0

    def __getitem__(self, i):
        if self.backlog:
            self._make(i + 1 if i >= 0 else deque.__len__(self) + self.backlog)
        return deque.__getitem__(self, i)

    def popleft(self):
        if self.backlog and not deque.__len__(self):
            self._make(1)
        return deque.popleft(self)

    def __iter__(self):
        self.make_all()
        return deque.__iter__(self)

    def __repr__(self) -> str:
        return f"WaitingQueue({list(deque.__iter__(self))!r}, backlog={self.backlog})"
