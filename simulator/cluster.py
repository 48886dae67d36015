"""A cluster of replicas on one SimPy clock: arrivals -> router -> replicas, and prefill/decode disaggregation.

**Colocated** (``--replicas N``): every arriving request is routed (``simulator.routers``) to one of N identical
replicas, which run independently on the shared clock.

**Disaggregated** (``--prefill-replicas P --decode-replicas D``; Splitwise, Patel et al., ISCA'24; DistServe, Zhong
et al., OSDI'24): a request is routed to a prefill replica, which computes its prompt and emits its first token;
its KV cache (``prompt tokens x kv_bytes_per_token`` of the whole model) is then sent over the prefill replica's
outgoing link (``SharedLink``: concurrent transfers share its bandwidth equally, processor sharing, after a fixed
latency), while the prefill replica keeps the blocks; when the transfer ends the prefill replica frees them and the
request joins the chosen decode replica's queue with its KV present (``num_computed_tokens`` = prompt,
one token generated), where the decode replica's scheduler admits it like any request whose next step is a decode.
The decode replica is chosen when the prefill ends (the router over the decode pool). Simplification, stated: a
decode replica does not reserve blocks before the transfer; a request whose KV arrived waits in its queue until
blocks are free (as if buffered in host memory).

**Closed loop** (``--concurrency N``, as ``vllm bench serve --max-concurrency`` and static-concurrency benchmarks):
N clients each send a request, and the next one when it completes (or is rejected); request ``i`` then arrives at
that moment, whatever its ``arrival_s`` was (it is overwritten). The first N arrive at time 0.

**Arrivals** come from a list of Requests or a ``RequestStream`` (made from the trace's columns when needed). Fed
from a stream, a lone entry replica keeps the tail of a long queue as stream positions (``simulator.waiting``), and
requests that a fast-forwarded stretch reads ahead are made early and kept until they arrive, so that the Request
objects alive do not grow with the length of the queue.

The cluster owns nothing global: ``Cluster.run`` builds one environment per call.
"""
from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import dataclass, field

import numpy as np
import simpy

from simulator.fast_forward import exact_delay
from simulator.replica import IterationLog, Replica
from simulator.request import RequestStream
from simulator.waiting import WaitingQueue


#: requests of the stream made at once when one is needed before its arrival or at it (``Cluster._made_at``)
READ_AHEAD = 32
#: arrival times held as Python floats for ``Cluster._next_arrival_from`` (a window, read again past its end)
ARRIVAL_WINDOW = 1024


class SharedLink:
    """A link whose bandwidth is shared equally by the transfers in progress (processor sharing).

    ``transfer(nbytes)`` returns an event that fires ``latency_s`` + the fair-share time later. Units: bytes,
    bytes/s, seconds. Deterministic: transfers are kept in start order.
    """

    def __init__(self, env: simpy.Environment, bandwidth_bytes_per_s: float, latency_s: float, name: str = "link"):
        self.env = env
        self.bandwidth = float(bandwidth_bytes_per_s)
        self.latency_s = float(latency_s)
        self.name = name
        self._active: dict[int, list] = {}       # key -> [remaining bytes, event]
        self._next_key = 0
        self._updated_s = 0.0
        self._generation = 0
        self.bytes_sent = 0.0
        self.busy_s = 0.0

    def transfer(self, nbytes: float) -> simpy.Event:
        done = self.env.event()
        start = self.env.timeout(self.latency_s)
        start.callbacks.append(lambda _: self._start(float(nbytes), done))
        return done

    def _advance(self) -> None:
        now = self.env.now
        if self._active:
            share = self.bandwidth / len(self._active) * (now - self._updated_s)
            for entry in self._active.values():
                entry[0] -= share
            self.busy_s += now - self._updated_s
        self._updated_s = now

    def _start(self, nbytes: float, done: simpy.Event) -> None:
        self._advance()
        self.bytes_sent += nbytes
        if nbytes <= 0:
            done.succeed()
            return
        self._active[self._next_key] = [nbytes, done]
        self._next_key += 1
        self._reschedule()

    def _reschedule(self) -> None:
        self._generation += 1
        if not self._active:
            return
        least = min(entry[0] for entry in self._active.values())
        wait = max(0.0, least * len(self._active) / self.bandwidth)
        timer = self.env.timeout(wait)
        generation = self._generation
        timer.callbacks.append(lambda _: self._on_timer(generation))

    def _on_timer(self, generation: int) -> None:
        if generation != self._generation:
            return                               # superseded by a later start
        self._advance()
        eps = 1e-9 * self.bandwidth
        for key in [k for k, e in self._active.items() if e[0] <= eps]:
            self._active.pop(key)[1].succeed()
        self._reschedule()


@dataclass
class Pool:
    """Replicas that share a router: ``replicas`` (all of ``Replica``), the router function and its arrival count."""

    name: str
    replicas: list
    router: object
    seq: int = 0

    def route(self, request):
        if len(self.replicas) == 1:          # (a router only chooses: with one replica, nothing to choose)
            self.seq += 1
            return self.replicas[0]
        from simulator.routers import ReplicaLoad

        loads = [ReplicaLoad(i, rep.scheduler, request) for i, rep in enumerate(self.replicas)]
        index = self.router(request, loads, self.seq)
        self.seq += 1
        return self.replicas[index]


@dataclass
class Transfer:
    """KV hand-off settings of a disaggregated cluster: bytes per token of the whole model's KV cache and the link
    (bandwidth bytes/s, latency s) from each prefill replica."""

    kv_bytes_per_token: int
    bandwidth_bytes_per_s: float
    latency_s: float


@dataclass
class Cluster:
    """Pools of replicas on one clock (see the module docstring). ``pools``: ``{"replicas": Pool}`` colocated, or
    ``{"prefill": Pool, "decode": Pool}`` with ``transfer`` set when disaggregated."""

    env: simpy.Environment
    pools: dict
    log: IterationLog
    transfer: Transfer | None = None
    on_finish: object = None
    concurrency: int | None = None
    fast_forward: bool = False
    links: dict = field(default_factory=dict)
    num_in_transfer: int = 0
    next_arrival_s: float = math.inf

    @property
    def replicas(self) -> list:
        return [rep for pool in self.pools.values() for rep in pool.replicas]

    @property
    def disaggregated(self) -> bool:
        return "prefill" in self.pools

    def entry_pool(self) -> Pool:
        return self.pools["prefill"] if self.disaggregated else self.pools["replicas"]

    def on_done(self, replica: Replica, done: list) -> None:
        """A replica finished requests: hand prefill-only ones on to the decode pool, report the others."""
        finished = []
        for r in done:
            if r.prefill_only and not r.is_finished:
                self._hand_off(replica, r)
            else:
                finished.append(r)
        if finished and self.on_finish is not None:
            self.on_finish(finished)
        if finished and self.concurrency:
            for _ in finished:
                self._release()

    def _hand_off(self, prefill: Replica, r) -> None:
        decode = self.pools["decode"].route(r)
        link = self.links.get(prefill.replica_id)
        if link is None:
            t = self.transfer
            link = self.links[prefill.replica_id] = SharedLink(self.env, t.bandwidth_bytes_per_s, t.latency_s,
                                                               f"kv link of replica {prefill.replica_id}")
        start = self.env.now
        self.num_in_transfer += 1
        event = link.transfer(r.num_computed_tokens * self.transfer.kv_bytes_per_token)

        def arrived(_):
            self.num_in_transfer -= 1
            prefill.scheduler.kv.free(r)
            r.kv_transfer_s = self.env.now - start
            r.prefill_only = False
            r.decode_replica_id = decode.replica_id
            decode.add(r)
            self._maybe_close()

        event.callbacks.append(arrived)

    def _maybe_close(self) -> None:
        """Close the decode pool once nothing more can reach it: arrivals over, prefill replicas idle, no transfer."""
        if not (self.disaggregated and self._arrivals_done and self.num_in_transfer == 0):
            return
        if all(rep.process.triggered for rep in self.pools["prefill"].replicas):
            for rep in self.pools["decode"].replicas:
                rep.close()

    def _admit(self, r) -> bool:
        """Route an arriving request into the entry pool; False if it was rejected."""
        if self.disaggregated:
            r.prefill_only = True
        return self.entry_pool().route(r).add(r)

    def _release(self) -> None:
        """Closed loop: the next client request arrives now (a rejected one frees its client at once)."""
        while self._pending:
            r = self._pending.pop()
            r.arrival_s = self.env.now
            if self._admit(r):
                break
            if self.on_finish is not None:
                self.on_finish([])
        if not self._pending and not self._arrivals_done:
            self._arrivals_done = True
            for rep in self.entry_pool().replicas:
                rep.close()
            self._maybe_close()

    def _made_at(self, p: int):
        """The request at stream position ``p`` (< N), made with the next ones (``READ_AHEAD`` at once) if it was
        not; kept in ``_made`` until it arrives (a stretch may admit it before)."""
        r = self._made.get(p)
        if r is None:
            made = self._made
            for q, req in zip(range(p, p + READ_AHEAD), self._make_range(p, p + READ_AHEAD)):
                made.setdefault(q, req)              # (one made before stays: a stretch may have admitted it)
            r = made[p]
        return r

    def _pending_arrival(self, i: int):
        """The ``i``-th request of the open-loop stream not yet arrived (0: the one the arrivals wait for), or
        None."""
        p = self._pos + i
        return self._made_at(p) if p < self._num else None

    def _next_arrival_from(self, t: float) -> float:
        """The earliest arrival at or after ``t`` seconds of a request not yet arrived (``math.inf`` if none)
        (arrivals are sorted)."""
        if self.next_arrival_s >= t:
            return self.next_arrival_s
        # the window starts at the answer to an earlier t: for a t as late, none before it comes after t (a stretch
        # asks in increasing t, and the position only moves on: mostly a hit)
        window, k = self._window, self._pos - self._window_lo
        if t >= self._window_t and k < len(window) and window[-1] >= t:
            return window[bisect_left(window, t, k if k > 0 else 0)]
        i = max(int(self._arrival_s.searchsorted(t)), self._pos)
        if i >= self._num:
            return math.inf
        self._window_lo, self._window_t = i, t
        self._window = self._arrival_s[i:i + ARRIVAL_WINDOW].tolist()
        return self._window[0]

    def _make_backlog(self, k: int) -> None:
        """Queue the first ``k`` requests of the entry replica's backlog (``WaitingQueue``), admitted as at their
        arrival (positions admitted or rejected at their arrival while a backlog waited are skipped)."""
        p, positions, skip = self._backlog_pos, [], self._not_deferred
        while len(positions) < k:
            if p in skip:
                skip.discard(p)
            else:
                positions.append(p)
            p += 1
        self._backlog_pos = p
        lo = positions[0]
        made = self._make_range(lo, p)
        for q in positions:
            self._admit(made[q - lo])

    def _take_admitted(self) -> None:
        """Take now, as their arrivals would, the requests from the next position on that a stretch admitted ahead
        of their arrival (``pre_admitted``); the arrivals process then skips them: one event for all. Only for a
        lone replica whose run nothing can stop or observe in between (``Replica.take_arrivals``)."""
        pre = self._lone.scheduler.pre_admitted
        while self._pos < self._num:
            p = self._pos
            r = self._made.get(p)
            if r is None or r.request_id not in pre:
                return
            self._pos = p + 1
            self._arrived(p, r)

    def _arrived(self, p: int, r) -> None:
        """The request ``r`` at stream position ``p`` (made, not yet dropped from ``_made``) arrives now: it joins
        the backlog (``_defers``) or is routed into the entry pool."""
        del self._made[p]
        backlog = self._backlog
        if backlog is not None:
            if self._defers(r):
                backlog.backlog += 1          # (r is dropped: made again when the queue reaches it)
                return
            if backlog.backlog:
                self._not_deferred.add(p)
            else:
                self._backlog_pos = p + 1
        self._admit(r)

    def _defers(self, r) -> bool:
        """Whether the arriving ``r`` joins the backlog instead of the queue: the queue is long or has a backlog,
        and ``r`` was not admitted ahead of its arrival and will not be rejected."""
        waiting = self._backlog
        if waiting is None or not (waiting.backlog or waiting.num_made >= waiting.backlog_after):
            return False
        sched = self._lone.scheduler
        return r.request_id not in sched.pre_admitted and sched.rejection_reason(r) is None

    def run(self, requests, until_s: float | None = None) -> None:
        """Replay ``requests`` (sorted by ``arrival_s``: a list, a ``RequestStream``, or an iterable, which is
        listed) to the end (or until ``until_s``)."""
        env = self.env
        self._arrivals_done = False
        entry = self.entry_pool()
        ff = self.fast_forward and not self.disaggregated and until_s is None
        for rep in self.replicas:
            rep.fast_forward = ff
            rep.horizon = lambda: self.next_arrival_s
            rep.stop_at_completion = bool(self.concurrency)
            rep.spans_arrivals = len(entry.replicas) == 1
            if ff and rep.spans_arrivals and not self.concurrency:
                rep.next_arrival_from = self._next_arrival_from
                rep.pending_arrival = self._pending_arrival
                # completions only recorded (no callback of the caller's, which might read the clock or stop the
                # run, unless it says it does neither: ``clock_free``, a progress bar's)
                recorder = getattr(self, "recorder", None)
                rep.completions_at_once = rep.on_done == self.on_done and recorder is not None and \
                    self.on_finish == recorder.finish and \
                    (recorder.on_finish is None or getattr(recorder.on_finish, "clock_free", False))
                if rep.completions_at_once and rep.on_iteration is None:     # (nothing can stop the run)
                    rep.take_arrivals = self._take_admitted
        if self.disaggregated:
            for rep in self.pools["prefill"].replicas:
                rep.scheduler.hold_kv_after_prefill = True
                rep.process.callbacks.append(lambda _: self._maybe_close())

        stream = isinstance(requests, RequestStream) and not self.concurrency
        if not stream:
            requests = list(requests)
        # requests by stream position: made from the columns, or (a list) the listed ones, the same objects
        self._make_range = requests.make if stream else (lambda lo, hi: requests[lo:hi])
        self._arrival_s = np.asarray(requests.arrival_s if stream else [r.arrival_s for r in requests], dtype=float)
        self._num, self._pos, self._made = len(requests), 0, {}
        # arrivals from _window_lo on as floats, read for a time _window_t (_next_arrival_from)
        self._window, self._window_lo, self._window_t = [], 0, math.inf
        # a lone entry replica fed from a stream keeps a long queue's tail as positions (WaitingQueue)
        self._lone = entry.replicas[0] if len(entry.replicas) == 1 else None
        self._backlog = None
        if stream and self._lone is not None and not self.disaggregated and not self.concurrency \
                and until_s is None:
            sched = self._lone.scheduler
            sched.waiting = self._backlog = WaitingQueue(sched.waiting, self._make_backlog)
            self._backlog_pos, self._not_deferred = 0, set()

        def arrivals():
            arrival_s = self._arrival_s
            # Requests a stretch took ahead of their arrival (_take_admitted) get no event; the clock still moves as
            # their events would have moved it (each timeout lands at now + (t - now)), so every later arrival
            # lands where it always did: ``clock`` is that clock, ``skipped`` the times taken since the last event.
            clock, skipped = env.now, []
            p = 0
            while p < self._num:
                t = arrival_s.item(p)
                if p < self._pos:            # taken ahead
                    if t > clock:
                        clock = clock + (t - clock)
                        skipped.append(t)
                    p += 1
                    continue
                self.next_arrival_s = t
                if t > clock or skipped:
                    if not skipped:
                        yield env.timeout(t - env.now)
                    else:
                        target = clock + (t - clock) if t > clock else clock
                        d = exact_delay(env.now, target)
                        if d is None:        # (no one delay lands there: the events the skipped ones had)
                            for tq in skipped:
                                yield env.timeout(tq - env.now)
                            if t > env.now:
                                yield env.timeout(t - env.now)
                        else:
                            yield env.timeout(d)
                    clock, skipped = env.now, []
                    if p < self._pos:        # taken while this waited for it: that was its event
                        p += 1
                        continue
                self._pos = p + 1
                self._arrived(p, self._made_at(p))
                p += 1
            self.next_arrival_s = math.inf
            for rep in entry.replicas:
                rep.close()
            self._arrivals_done = True
            self._maybe_close()

        if self.concurrency:
            self._pending = list(reversed(requests))       # pop() takes them in order
            for _ in range(min(self.concurrency, len(requests))):
                self._release()
        else:
            env.process(arrivals())
        if until_s is not None:
            env.run(until=until_s)
            return
        try:
            env.run(until=simpy.AllOf(env, [rep.process for rep in self.replicas]))
        except BaseException:
            if self._backlog is not None:     # a hook stopped the run: queue what arrived, as it would be
                self._backlog.make_all()
            raise
