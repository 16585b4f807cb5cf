"""Group commit: concurrent stores of one process share a transaction (and its fsync).

Every C-STORE waits for its index rows to be committed before it is answered, and a SQLite
commit is a write lock plus an fsync of the write-ahead log.  With several associations storing
at once, each commit waited for the others' (the lock is held across the fsync, and with a busy
CPU a holder is often descheduled while it holds it): measured with four senders on two cores,
the lock was held 3-4 ms per instance and was what set the pace.

Here the first store to arrive while no commit is running becomes the *leader*: it takes every
store waiting at that moment (its own first) and commits them in one transaction.  The others
wait; when the leader's batch is done it wakes them and hands the lead to the first one still
waiting.  There is no extra thread and, with a single association, no hand-over at all: a lone
store commits itself, exactly as before.  If a batch fails, each of its stores is committed on
its own, so one bad instance never fails another one's store.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, TypeVar

#: Most stores in one transaction (a bound on how long the leader's own store waits).
MAX_BATCH = 32


@dataclass(eq=False)
class Waiter:
    """One store's place in the queue."""

    unit: Any
    finished: bool = False
    error: BaseException | None = None
    lead: bool = False
    wake: threading.Event = field(default_factory=threading.Event)


T = TypeVar("T")


class GroupCommit(Generic[T]):
    """Runs ``commit_batch`` for batches of concurrent units, one batch at a time.

    ``commit_batch(units)`` commits all of its units or raises; ``commit_one(unit)`` commits one
    (it is used alone, and for each unit of a batch that failed).
    """

    def __init__(self, commit_batch: Callable[[list[T]], None], commit_one: Callable[[T], None],
                 max_batch: int = MAX_BATCH) -> None:
        self._commit_batch = commit_batch
        self._commit_one = commit_one
        self._max_batch = max_batch
        self._lock = threading.Lock()
        self._pending: deque[Waiter] = deque()
        self._busy = False
        #: Transactions run and units committed (``status`` and the benchmark read these).
        self.batches = 0
        self.units = 0

    def run(self, unit: T) -> None:
        """Commit ``unit`` (alone or with others); raise what its commit raised."""
        me = Waiter(unit)
        with self._lock:
            self._pending.append(me)
            leading = not self._busy
            self._busy = True
        if not leading:
            me.wake.wait()
        if not me.finished:  # we lead: commit the waiting stores, ours first
            self._lead(me)
        if me.error is not None:
            raise me.error

    def _lead(self, me: Waiter) -> None:
        with self._lock:
            batch = [self._pending.popleft() for _ in range(min(len(self._pending), self._max_batch))]
        try:
            self._run(batch)
        finally:
            with self._lock:
                if self._pending:
                    nxt = self._pending[0]
                    nxt.lead = True
                    nxt.wake.set()  # the first still waiting commits the next batch
                else:
                    self._busy = False
            for w in batch:
                if w is not me:
                    w.wake.set()

    def _run(self, batch: list[Waiter]) -> None:
        self.batches += 1
        self.units += len(batch)
        if len(batch) > 1:
            try:
                self._commit_batch([w.unit for w in batch])
            except Exception:  # noqa: BLE001 - retried one by one below, where each error is kept
                pass
            else:
                for w in batch:
                    w.finished = True
                return
        for w in batch:
            try:
                self._commit_one(w.unit)
            except BaseException as exc:  # noqa: BLE001 - handed to the store it belongs to
                w.error = exc
            w.finished = True
