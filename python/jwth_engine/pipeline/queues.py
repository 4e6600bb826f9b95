"""A bounded, closable queue that records how full it got.

`queue.Queue` cannot wake a producer blocked on a full queue when the consumer gives up, so
pipelines built on it poll with timeouts. Here `close()` wakes every waiter at once: a blocked
`put` returns False and a blocked `get` raises `Closed` once the queue is empty. `high_water` is the
most items it ever held, which the tests use to check that memory stays bounded.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any


class Closed(Exception):
    """The queue was closed and holds nothing more."""


class BoundedQueue:
    def __init__(self, capacity: int, name: str = "queue"):
        if capacity < 1:
            raise ValueError(f"{name}: capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self.name = name
        self._items: deque = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.high_water = 0
        self.put_wait_s = 0.0     # producer time blocked on a full queue (the consumer is the bottleneck)
        self.get_wait_s = 0.0     # consumer time blocked on an empty queue (the producer is the bottleneck)

    def put(self, item: Any) -> bool:
        """Block while full; False (item dropped) if the queue is or becomes closed."""
        with self._cond:
            if len(self._items) >= self.capacity and not self._closed:
                start = time.perf_counter()
                while len(self._items) >= self.capacity and not self._closed:
                    self._cond.wait()
                self.put_wait_s += time.perf_counter() - start
            if self._closed:
                return False
            self._items.append(item)
            self.high_water = max(self.high_water, len(self._items))
            self._cond.notify_all()
            return True

    def get(self) -> Any:
        """Block while empty; raise Closed when closed and drained."""
        with self._cond:
            if not self._items and not self._closed:
                start = time.perf_counter()
                while not self._items and not self._closed:
                    self._cond.wait()
                self.get_wait_s += time.perf_counter() - start
            if not self._items:
                raise Closed(self.name)
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def close(self) -> list:
        """Close; wake all waiters; return what was still queued (for the caller to release)."""
        with self._cond:
            self._closed = True
            left = list(self._items)
            self._items.clear()
            self._cond.notify_all()
            return left

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)
