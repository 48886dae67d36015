"""Etalon's deadline accounting of a long run on another core: a helper process that runs
``recorder.deadline_misses_batch`` on the batches a ``Recorder`` sends it, in order, while the run goes on.

The accounting is a dozen numpy passes over every token time of the run (0.6 s of a 100k-request run, a tenth of
it). A thread cannot take it off the simulation's core: each numpy call gives the GIL back and takes it again, and
the hand-overs cost more than the work. So the batches go to ``python -m simulator.deadline_worker``, started with
``subprocess`` (not ``multiprocessing``, which would import the caller's main script again in the helper):

- the token times: in one of ``MAX_IN_FLIGHT + 1`` slots of ``SLOT_BYTES`` of memory the two processes share
  (``os.memfd_create``, Linux; a slot is used again once its batch is answered), written there by the recorder as
  it records (``slot``) or copied by ``submit``, or, on another system or for a batch larger than a slot, written
  after the header;
- through the helper's standard input, per batch: a header ``(m, T, offset, D)`` (three int64, one float64: the
  times' offset in the shared memory, or -1: they follow), its ``m`` requests' TTFT and first-token deadline (float64) and token count (int64); an
  ``m`` of -1 ends it;
- back through its standard output: ``m`` (int64), then ``missed`` and ``total`` (``m`` int64 each), or ``-n`` and
  the ``n`` bytes of the helper's traceback.

The results are the same numbers, computed by the same function on the same float64 values (native byte order:
the helper runs on the same machine). The recorder collects them in the order it sent the batches, at most
``MAX_IN_FLIGHT`` batches behind, so the answers wait in the pipe back, which never fills, and the rows the
recorder keeps stay bounded.
"""
from __future__ import annotations

import mmap
import os
import struct
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np

#: batches sent and not yet answered before the recorder waits for the oldest answer
MAX_IN_FLIGHT = 3
SLOT_BYTES = 1 << 21         # token times of a batch in shared memory (262,144 tokens; a batch is some 32k)
_HEAD = struct.Struct("=qqqd")


def _read(stream, n: int) -> bytes:
    """Exactly ``n`` bytes of ``stream`` (a pipe may give fewer at a time); EOFError if it ends first."""
    parts, left = [], n
    while left:
        part = stream.read(left)
        if not part:
            raise EOFError(f"{n - left} of {n} bytes")
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def _write(stream, data) -> None:
    """All of ``data`` to ``stream`` (a pipe may take less at a time)."""
    view = memoryview(data).cast("B")
    while view:
        view = view[stream.write(view):]


def serve(inbox, outbox, shared=None) -> None:
    """The helper's loop over binary streams (``shared``: the slots' memory): answer each batch until the end
    header (or the end of ``inbox``)."""
    import traceback

    from simulator.recorder import deadline_misses_batch

    while True:
        head = inbox.read(_HEAD.size)
        if len(head) < _HEAD.size:
            return
        m, T, offset, d = _HEAD.unpack(head)
        if m < 0:
            return
        try:
            cols = np.frombuffer(_read(inbox, 24 * m), dtype=np.float64)
            if offset < 0:
                times = np.frombuffer(_read(inbox, 8 * T), dtype=np.float64)
            else:
                times = np.frombuffer(shared, dtype=np.float64, count=T, offset=offset)
            missed, total = deadline_misses_batch(cols[:m], cols[m:2 * m], times, cols[2 * m:].view(np.int64), d)
            outbox.write(struct.pack("=q", m) + missed.astype(np.int64).tobytes() + total.astype(np.int64).tobytes())
            outbox.flush()
        except Exception:                                   # noqa: BLE001 (reported to the recorder)
            why = traceback.format_exc().encode()
            outbox.write(struct.pack("=q", -len(why)) + why)
            outbox.flush()
            return


def _end(process) -> None:
    """End the helper: the end header, then its exit (killed if it does not)."""
    if process.returncode is None:
        try:
            _write(process.stdin, _HEAD.pack(-1, 0, 0, 0.0))
        except (OSError, ValueError):
            pass
    for stream in (process.stdin, process.stdout):
        try:
            stream.close()
        except OSError:
            pass
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _stop(process, shared) -> None:
    """End the helper and unmap the shared memory (also a weakref finalizer: when the recorder is dropped without
    ``close``)."""
    _end(process)
    if shared is not None:
        shared.close()


class DeadlineWorker:
    """A helper process doing ``deadline_misses_batch`` for one recorder (see the module docstring).

    ``submit(ttft_s, ttft_deadline_s, lengths, times)`` sends a batch of ``m`` requests (``times``: their ``T``
    token times as float64 bytes, copied or kept); ``result()`` returns the oldest batch's ``(missed, total)``
    ((m,) int64 each) not yet returned, waiting for it; ``in_flight`` counts those, and ``submit`` raises
    RuntimeError when it is ``full``. ``close()`` ends the helper.

    The helper only saves time: if it cannot be reached or ends without answering (killed, or no Python able to
    run it), the batches it holds and all later ones are computed here, from the inputs kept until they are
    answered, with a ``RuntimeWarning`` (``failed`` says why). An error the helper meets in the accounting itself
    is raised here as it would be without it (the batch is computed again here).
    """

    def __init__(self, decode_deadline_s: float):
        self.decode_deadline_s = float(decode_deadline_s)
        self.failed: str | None = None
        root = str(Path(__file__).resolve().parents[1])          # (where this ``simulator`` package is)
        # (glibc: the helper keeps freed arrays instead of giving each batch's temporaries back to the system and
        # faulting them in again, which doubles its time)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])]),
                   MALLOC_MMAP_THRESHOLD_="16777216", MALLOC_TRIM_THRESHOLD_="67108864")
        slots = MAX_IN_FLIGHT + 1
        self._shared, fds, args = None, (), []
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("servesim-deadlines")
            try:
                os.ftruncate(fd, slots * SLOT_BYTES)
                self._shared = mmap.mmap(fd, slots * SLOT_BYTES)
            except OSError:
                os.close(fd)
            else:
                fds, args = (fd,), [str(fd), str(slots * SLOT_BYTES)]
        try:
            self._process = subprocess.Popen([sys.executable, "-m", "simulator.deadline_worker", *args],
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, bufsize=0,
                                             pass_fds=fds)
        finally:
            for fd in fds:
                os.close(fd)             # (the mapping and the helper keep the memory)
        # per batch in flight, oldest first: its inputs (the times as their offset in the shared memory, or the
        # bytes given), to compute it here if the helper fails
        self._batches: list = []
        self._sent = 0                   # batches sent (batch k uses slot k mod MAX_IN_FLIGHT + 1)
        self._stop = weakref.finalize(self, _stop, self._process, self._shared)

    @property
    def in_flight(self) -> int:
        return len(self._batches)

    @property
    def full(self) -> bool:
        """``MAX_IN_FLIGHT`` batches wait: take a result before sending another."""
        return len(self._batches) >= MAX_IN_FLIGHT

    def slot(self) -> tuple | None:
        """``(buffer, offset, size)``: the shared memory the next batch's token times go to (bytes ``offset`` to
        ``offset + size`` of ``buffer``, free until that batch is answered), for a caller that writes them there
        itself and then submits their size; None without shared memory."""
        if self._shared is None:
            return None
        return self._shared, self._sent % (MAX_IN_FLIGHT + 1) * SLOT_BYTES, SLOT_BYTES

    def submit(self, ttft_s, ttft_deadline_s, lengths, times) -> None:
        """Send a batch; ``times``: its token times as float64 bytes, or their size (an int) when they were
        written into ``slot()``."""
        if self.full:
            raise RuntimeError(f"deadline accounting helper: {MAX_IN_FLIGHT} batches in flight; take a result first")
        m, slot = len(lengths), self.slot()     # (a slot whose last batch was answered)
        offset = -1
        if type(times) is int:           # (already in the slot)
            n, offset = times, slot[1]
        else:
            n = len(times)
            if slot is not None and n <= SLOT_BYTES:
                offset = slot[1]
                self._shared[offset:offset + n] = times
        self._batches.append((ttft_s, ttft_deadline_s, lengths, n, offset, times if offset < 0 else None))
        self._sent += 1
        if self.failed is not None:
            return
        head = _HEAD.pack(m, n // 8, offset, self.decode_deadline_s) + \
            np.asarray(ttft_s, dtype=np.float64).tobytes() + np.asarray(ttft_deadline_s, dtype=np.float64).tobytes() \
            + np.asarray(lengths, dtype=np.int64).tobytes()
        try:
            _write(self._process.stdin, head)
            if offset < 0:
                _write(self._process.stdin, times)
        except OSError as e:
            self._fail(f"could not send a batch ({e})")

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        batch = self._batches[0]
        m = len(batch[2])
        if self.failed is None:
            out = self._process.stdout
            try:
                k = struct.unpack("=q", _read(out, 8))[0]
                if k == m:
                    values = np.frombuffer(_read(out, 16 * m), dtype=np.int64)
                    self._batches.pop(0)
                    return values[:m], values[m:]
                self._fail(_read(out, -k).decode(errors="replace") if k < 0 else
                           f"an answer for {k} requests, expected {m}")
            except (EOFError, OSError) as e:
                self._fail(f"it ended without answering ({e})")
        self._batches.pop(0)
        return self._here(batch)

    def _here(self, batch) -> tuple[np.ndarray, np.ndarray]:
        """A batch computed in this process."""
        from simulator.recorder import deadline_misses_batch

        ttft, dl, lengths, n, offset, times = batch
        if times is None:
            times = self._shared[offset:offset + n]
        return deadline_misses_batch(ttft, dl, np.frombuffer(times, dtype=np.float64), lengths,
                                     self.decode_deadline_s)

    def _fail(self, why: str) -> None:
        import warnings

        self.failed = why
        code = self._process.poll()
        warnings.warn(f"deadline accounting helper process (pid {self._process.pid}, exit code {code}) failed; "
                      f"the accounting goes on in this process (the same numbers): {why.strip()}", RuntimeWarning,
                      stacklevel=3)
        _end(self._process)              # (the shared memory stays: the batches in it are computed here)

    def close(self) -> None:
        self._stop()


def main(argv) -> None:
    """``python -m simulator.deadline_worker [FD SIZE]``: serve on standard input and output, the token times in
    the ``SIZE`` bytes of shared memory at file descriptor ``FD`` (or in the input). Ctrl-C is the recorder's to
    handle: the helper ends when its input does."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    shared = mmap.mmap(int(argv[0]), int(argv[1]), access=mmap.ACCESS_READ) if argv else None
    serve(sys.stdin.buffer, sys.stdout.buffer, shared)


if __name__ == "__main__":
    main(sys.argv[1:])
