"""Group commit: batches under concurrency, one by one alone, a failing unit fails only itself."""

from __future__ import annotations

import threading
import time

import pytest

from scp_node.store.group_commit import GroupCommit


class Recorder:
    def __init__(self, slow: float = 0.0, bad: set[int] = frozenset()) -> None:
        self.batches: list[list[int]] = []
        self.committed: list[int] = []
        self.slow, self.bad = slow, bad
        self.lock = threading.Lock()
        self.inside = 0
        self.max_inside = 0

    def _enter(self) -> None:
        with self.lock:
            self.inside += 1
            self.max_inside = max(self.max_inside, self.inside)
        time.sleep(self.slow)

    def _leave(self) -> None:
        with self.lock:
            self.inside -= 1

    def batch(self, units: list[int]) -> None:
        self._enter()
        try:
            if self.bad & set(units):
                raise RuntimeError("bad unit in batch")
            self.batches.append(list(units))
            self.committed.extend(units)
        finally:
            self._leave()

    def one(self, unit: int) -> None:
        self._enter()
        try:
            if unit in self.bad:
                raise ValueError(f"unit {unit} is bad")
            self.batches.append([unit])
            self.committed.append(unit)
        finally:
            self._leave()


def _run_all(group: GroupCommit[int], units: list[int]) -> dict[int, BaseException | None]:
    results: dict[int, BaseException | None] = {}
    start = threading.Barrier(len(units))

    def store(u: int) -> None:
        start.wait()
        try:
            group.run(u)
            results[u] = None
        except BaseException as exc:  # noqa: BLE001
            results[u] = exc

    threads = [threading.Thread(target=store, args=(u,)) for u in units]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
        assert not t.is_alive()
    return results


def test_alone_each_store_commits_itself() -> None:
    rec = Recorder()
    group = GroupCommit(rec.batch, rec.one)
    for u in range(5):
        group.run(u)
    assert rec.batches == [[0], [1], [2], [3], [4]]
    assert (group.batches, group.units) == (5, 5)


def test_concurrent_stores_share_transactions_one_at_a_time() -> None:
    rec = Recorder(slow=0.02)
    group = GroupCommit(rec.batch, rec.one)
    results = _run_all(group, list(range(16)))
    assert all(r is None for r in results.values())
    assert sorted(rec.committed) == list(range(16))  # each exactly once
    assert group.batches < 16 and group.units == 16  # some shared a transaction
    assert rec.max_inside == 1  # never two commits at once


def test_a_failing_store_fails_alone() -> None:
    rec = Recorder(slow=0.02, bad={3})
    group = GroupCommit(rec.batch, rec.one)
    results = _run_all(group, list(range(8)))
    assert isinstance(results[3], ValueError)
    assert all(results[u] is None for u in range(8) if u != 3)
    assert sorted(rec.committed) == [0, 1, 2, 4, 5, 6, 7]


def test_batch_size_is_bounded() -> None:
    rec = Recorder(slow=0.05)
    group = GroupCommit(rec.batch, rec.one, max_batch=3)
    results = _run_all(group, list(range(10)))
    assert all(r is None for r in results.values())
    assert max(len(b) for b in rec.batches) <= 3
    assert sorted(rec.committed) == list(range(10))


def test_error_types_reach_the_caller() -> None:
    rec = Recorder(bad={1})
    group = GroupCommit(rec.batch, rec.one)
    with pytest.raises(ValueError, match="unit 1"):
        group.run(1)
    group.run(2)  # the group still works
    assert rec.committed == [2]
